"""Fine-tuning heads on labelled JSONL (lm/finetune.py, docs/finetuning.md).

    python -m lm.train --config configs/finetune.py:classify --workdir W \\
        --config.train.init_from=PRETRAINED --config.data.path=TRAIN.jsonl \\
        --config.data.eval_path=DEV.jsonl
    python -m lm.train --config configs/finetune.py:span ...   # SQuAD v1.1 rows

With train.init_from the model section is the checkpoint's (any lm or `lm.convert from-hf`
checkpoint); the one below (configs/tiny.py:bert's shape) applies only without it, from random
initialisation (give data.tokenizer a tokenizer.json then). The optimizer is BERT's fine-tuning
recipe: AdamW (b2 0.999, eps 1e-6, weight decay 0.01), 10% linear warmup and linear decay to 0,
at a learning rate for a model of this size (BERT-base: 2e-5 - 5e-5).
"""
from lm.config import defaults


def get_config(arg=None):
    if arg not in (None, "classify", "span"):
        raise ValueError(f"configs/finetune.py: unknown variant {arg!r}; valid: 'classify', "
                         "'span'")
    c = defaults()
    c.model.update(style="bert", num_layers=4, d_model=256, num_heads=4, num_kv_heads=4,
                   mlp_dim=1024, vocab_size=8192, max_len=128, norm_eps=1e-12,
                   scan_layers=False)
    c.task.name = arg or "classify"
    c.train.update(steps=300, batch_size=32, seq_len=128, eval_every=100, log_every=10,
                   sample_tokens=0)
    c.optim.update(name="adamw", lr=1e-4, b2=0.999, eps=1e-6, weight_decay=0.01,
                   warmup_steps=30, schedule="linear", min_lr_ratio=0.0, clip_norm=1.0)
    if arg == "span":
        c.task.update(max_query_len=32, doc_stride=64, max_answer_len=30)
    return c
