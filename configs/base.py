"""Defaults for every run. Other files in configs/ start from this one and override keys.

    python -m lm.train --config configs/base.py --workdir /tmp/base
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dict(
        style="gpt2",        # 'gpt2' | 'llama'
        num_layers=4,
        d_model=256,
        num_heads=4,
        num_kv_heads=4,      # < num_heads: grouped-query attention (llama style)
        mlp_dim=1024,
        vocab_size=384,      # >= the tokenizer's vocabulary (byte tokenizer: 258)
        max_len=256,
        rope_theta=10000.0,
        norm_eps=1e-5,
        scan_layers=True,    # False unrolls the layers: faster steps for shallow models, slower compiles
        remat=False,
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        batch_size=16,       # global batch, split over data x fsdp devices and hosts
        seq_len=128,
        seed=0,
        eval_every=100,
        eval_batches=4,
        log_every=10,
        sample_tokens=200,   # tokens generated from the final model (0 = none)
        progress=True,
    ))
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw",
        lr=3e-4,
        warmup_steps=100,
        decay_steps=0,       # cosine decay length; 0 = train.steps
        min_lr_ratio=0.1,
        weight_decay=0.1,
        clip_norm=1.0,       # global gradient norm; 0 disables
        b1=0.9,
        b2=0.95,
        eps=1e-8,
    ))
    c.precision = ml_collections.ConfigDict(dict(param_dtype="float32", compute_dtype="float32"))
    # Device mesh sizes; -1 fills with the devices the other axes leave.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1, pipeline=1))
    # data.path: a directory from `python -m lm.data.prepare`; "" trains on the embedded corpus
    # (the stdlib's sources, prepared into WORKDIR/data with val_fraction held out).
    c.data = ml_collections.ConfigDict(dict(path="", val_fraction=0.02, shuffle=True, prefetch=2))
    c.checkpoint = ml_collections.ConfigDict(dict(every=0, keep=2))
    return c
