"""GPT-3 175B (Brown et al. 2020) with the layout the talk cites for 1,024 GPUs (128 nodes of
8): tensor 8 within a node (NVLink), pipeline 16 x data 8 across nodes (InfiniBand),
Megatron-style (distributed optimizer = zero1, tensor slicing),
fp16 with fp32 master weights, full remat, batch 1,536 x 2,048 tokens in 192 pipeline micro-batches
of one sequence per data replica (GPipe schedule, bubble 15 / 207 = 7.2%). For `lm.plan`:

    python -m lm.plan --config configs/gpt3_175b.py
"""
from lm.config import defaults


def get_config(arg=None):
    del arg
    c = defaults()
    c.model.update(style="gpt2", num_layers=96, d_model=12288, num_heads=96, num_kv_heads=96,
                   mlp_dim=49152, vocab_size=50257, max_len=2048, remat="full")
    c.train.update(batch_size=1536, seq_len=2048)
    c.pipeline.update(schedule="gpipe", microbatches=192)
    c.precision.update(param_dtype="float16", compute_dtype="float16", master_weights=True)
    c.optim.update(lr=6e-5, warmup_steps=375)
    c.mesh.update(data=1, fsdp=1, tensor=8, sequence=1, pipeline=1, rules="zero1+tp",
                  dcn_data=8, dcn_pipeline=16)
    return c
