"""A 1.1B Llama-style model (TinyLlama's shape: 22 layers, d 2048, 32 heads, 4 KV heads, SwiGLU
5632, untied 32k vocabulary).

    python -m lm.train --config configs/llama_1b.py --workdir /tmp/llama1b \
        --config.precision.compute_dtype=bfloat16 --config.mesh.fsdp=-1 --config.mesh.data=1
"""
from lm.config import defaults


def get_config(arg=None):
    del arg
    c = defaults()
    c.model.update(style="llama", num_layers=22, d_model=2048, num_heads=32, num_kv_heads=4,
                   mlp_dim=5632, vocab_size=32000, max_len=2048, remat="full")
    c.train.update(steps=100_000, batch_size=1024, seq_len=2048, eval_every=1000, log_every=50)
    c.optim.update(lr=4e-4, warmup_steps=2000, weight_decay=0.1)
    return c
