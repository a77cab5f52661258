"""The ZeRO paper's 7.5B example (Rajbhandari et al. 2019, section 5): a GPT-2-style model of
~7.5B parameters trained in fp16 with fp32 master weights and Adam, for `lm.plan`.

    python -m lm.plan --config configs/zero_7b5.py --devices 64 --config.mesh.rules=zero1
"""
from lm.config import defaults


def get_config(arg=None):
    del arg
    c = defaults()
    c.model.update(style="gpt2", num_layers=36, d_model=4096, num_heads=32, num_kv_heads=32,
                   mlp_dim=16384, vocab_size=50257, max_len=1024, remat="full")
    c.train.update(batch_size=512, seq_len=1024)
    c.precision.update(param_dtype="float16", compute_dtype="float16", master_weights=True)
    c.mesh.update(data=-1, rules="dp")
    return c
