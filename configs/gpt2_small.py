"""GPT-2 small (124M parameters with tied embeddings), the GPT-2 paper's shape.

    python -m lm.train --config configs/gpt2_small.py --workdir /tmp/gpt2 \
        --config.precision.compute_dtype=bfloat16

Byte-level data (the embedded corpus) uses 258 of the 50,257 rows; the BPE data issue fills them.
"""
from lm.config import defaults


def get_config(arg=None):
    del arg
    c = defaults()
    c.model.update(style="gpt2", num_layers=12, d_model=768, num_heads=12, num_kv_heads=12,
                   mlp_dim=3072, vocab_size=50257, max_len=1024)
    c.train.update(steps=100_000, batch_size=512, seq_len=1024, eval_every=1000, log_every=50)
    c.optim.update(lr=6e-4, warmup_steps=2000, weight_decay=0.1)
    return c
