"""The demo: a 4-layer byte-level model on the Python standard library's source, on a laptop CPU.

    python -m lm.train --config configs/tiny.py --workdir /tmp/tiny          # GPT-2 style
    python -m lm.train --config configs/tiny.py:llama --workdir /tmp/tiny    # Llama style (GQA)
    python -m lm.train --config configs/tiny.py:nvlamb --workdir /tmp/tiny   # 4x the batch, NVLAMB
    python -m lm.train --config configs/tiny.py:bert --workdir /tmp/tiny-bert # BERT, MLM + NSP

Expected on 2 CPU cores: about 5.5 minutes; the loss falls from ~5.9 to ~1.6 nats/byte and the
final sample looks like Python (`def ...`, `self.assertEqual(` and the like).
"""
from lm.config import defaults
from lm.optim import scale_lr


def get_config(arg=None):
    c = defaults()
    c.model.update(num_layers=4, d_model=256, num_heads=4, num_kv_heads=4, mlp_dim=1024,
                   vocab_size=384, max_len=256, scan_layers=False)
    c.train.update(steps=800, batch_size=16, seq_len=128, eval_every=100, log_every=20)
    c.optim.update(lr=3e-3, warmup_steps=50, weight_decay=0.1)
    if arg == "llama":
        c.model.update(style="llama", num_kv_heads=2, mlp_dim=768)
    elif arg == "nvlamb":
        # The large-batch recipe: 4x the batch in 4 microbatches, NVLAMB with NVIDIA's BERT
        # defaults, the learning rate by the square-root rule from one tuned at batch 16.
        c.train.update(batch_size=64, microbatches=4, steps=200)
        c.optim.update(name="nvlamb", lr=scale_lr(1e-2, 16, 64, "sqrt"), b2=0.999, eps=1e-6,
                       weight_decay=0.01, clip_norm=1.0)
    elif arg == "bert":
        # BERT's pretraining objective on the same corpus: a WordPiece vocabulary trained on it,
        # masked-LM + next-sentence prediction on sentence pairs, NVLAMB as NVIDIA trains BERT.
        c.model.update(style="bert", nsp_head=True, vocab_size=8192, max_len=128,
                       norm_eps=1e-12)
        c.data.tokenizer = "wordpiece:8192"
        c.task.update(name="mlm_nsp", max_predictions=20)
        c.train.update(steps=400, batch_size=32, seq_len=128)
        c.optim.update(name="nvlamb", lr=1e-2, b2=0.999, eps=1e-6, weight_decay=0.01,
                       clip_norm=1.0, warmup_steps=40, schedule="poly")
    elif arg not in (None, "gpt2"):
        raise ValueError(f"configs/tiny.py: unknown variant {arg!r}; valid: 'gpt2', 'llama', "
                         "'nvlamb', 'bert'")
    return c
