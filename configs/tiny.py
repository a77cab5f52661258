"""The demo: a 4-layer byte-level model on the Python standard library's source, on a laptop CPU.

    python -m lm.train --config configs/tiny.py --workdir /tmp/tiny          # GPT-2 style
    python -m lm.train --config configs/tiny.py:llama --workdir /tmp/tiny    # Llama style (GQA)

Expected on 2 CPU cores: about 5.5 minutes; the loss falls from ~5.9 to ~1.6 nats/byte and the
final sample looks like Python (one run: `def test_list(self._ostr))` ... `self.assertEqual(`).
"""
from configs import base


def get_config(arg=None):
    c = base.get_config()
    c.model.update(num_layers=4, d_model=256, num_heads=4, num_kv_heads=4, mlp_dim=1024,
                   vocab_size=384, max_len=256, scan_layers=False)
    c.train.update(steps=800, batch_size=16, seq_len=128, eval_every=100, log_every=20)
    c.optim.update(lr=3e-3, warmup_steps=50, weight_decay=0.1)
    if arg == "llama":
        c.model.update(style="llama", num_kv_heads=2, mlp_dim=768)
    elif arg not in (None, "gpt2"):
        raise ValueError(f"configs/tiny.py: unknown variant {arg!r}; valid: 'gpt2', 'llama'")
    return c
