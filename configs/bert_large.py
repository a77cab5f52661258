"""BERT-large pretraining as NVIDIA trains it (DeepLearningExamples, 8 x A100, LAMB), in two phases:

    python -m lm.train --config configs/bert_large.py:phase1 --workdir W --config.data.path=D
    python -m lm.train --config configs/bert_large.py:phase2 --workdir W --config.data.path=D

Phase 1: sequences of 128 (20 predictions each), global batch 65,536, lr 6e-3, 7,038 steps, 28.43%
warmup. Phase 2 resumes the same workdir from phase 1's last checkpoint (step 7,038, the LAMB
moments kept; `train.phase_start` restarts the schedule there and lets the loader change its
sequence length and batch): sequences of 512 (80 predictions), global batch 32,768, lr 4e-3,
1,563 more steps, 12.8% warmup. The global batch is reached by gradient accumulation
(`train.microbatches`), sized for 8 devices: 65,536 / 128 = 512 sequences per step (64 per
device), 32,768 / 256 = 128 (16 per device at 512). With more devices, lower microbatches in
proportion. D: a `python -m lm.data.prepare --wordpiece-vocab-size 30522` directory (or a
converted BERT vocabulary). Differences from NVIDIA's: no dropout; phase 2 keeps the step count,
so Adam's bias correction does not restart (NVIDIA's resets the step to 0).
"""
from lm.config import defaults

SIZES = {"base": dict(num_layers=12, d_model=768, num_heads=12, num_kv_heads=12, mlp_dim=3072),
         "large": dict(num_layers=24, d_model=1024, num_heads=16, num_kv_heads=16, mlp_dim=4096)}
PHASE1_STEPS, PHASE2_STEPS = 7038, 1563


def bert(size: str, arg):
    c = defaults()
    # Vocabulary 30,522 padded to a multiple of 8 as NVIDIA does.
    c.model.update(style="bert", nsp_head=True, vocab_size=30528, max_len=512, norm_eps=1e-12,
                   type_vocab_size=2, remat="dots", **SIZES[size])
    c.task.update(name="mlm_nsp", mask_prob=0.15)
    c.precision.update(param_dtype="float32", compute_dtype="bfloat16")
    c.optim.update(name="nvlamb", b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, clip_norm=1.0,
                   schedule="poly", poly_power=0.5)
    c.train.update(eval_every=500, log_every=10, sample_tokens=0)
    c.checkpoint.update(every=200, keep=3)
    if arg in (None, "phase1"):  # phase 1 is the default
        c.train.update(steps=PHASE1_STEPS, batch_size=65536, microbatches=128, seq_len=128)
        c.task.max_predictions = 20
        c.optim.update(lr=6e-3, warmup_steps=round(0.2843 * PHASE1_STEPS))
    elif arg == "phase2":
        c.train.update(steps=PHASE1_STEPS + PHASE2_STEPS, phase_start=PHASE1_STEPS,
                       batch_size=32768, microbatches=256, seq_len=512)
        c.task.max_predictions = 80
        c.optim.update(lr=4e-3, warmup_steps=round(0.128 * PHASE2_STEPS))
    else:
        raise ValueError(f"configs/bert_{size}.py: unknown variant {arg!r}; valid: 'phase1', "
                         "'phase2'")
    return c


def get_config(arg=None):
    return bert("large", arg)
