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
        remat="none",        # per layer: 'none' | 'full' | 'dots' (keep matmul outputs) | 'minimal' (keep attention)
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
        microbatches=1,      # gradient accumulation: microbatches per step (must divide batch_size)
        skip_nonfinite=False,  # skip updates with non-finite gradients (always on with loss
                               # scaling); off, a non-finite loss stops the run
        init_from="",        # start from these parameters: a checkpoint dir or a workdir
    ))
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw",        # 'adamw' | 'lamb' | 'lars' | 'nvlamb' | 'sgd' (momentum)
        lr=3e-4,             # peak; lm.optim.scale_lr applies the linear / sqrt batch-size rules
        schedule="cosine",   # after the warmup: 'cosine' | 'linear' | 'constant' | 'inverse_sqrt'
        warmup_steps=100,
        decay_steps=0,       # end of the cosine/linear decay; 0 = train.steps
        min_lr_ratio=0.1,
        weight_decay=0.1,
        clip_norm=1.0,       # global gradient norm; 0 disables (nvlamb: its max_grad_norm, > 0)
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        momentum=0.9,        # sgd, lars
        nesterov=False,      # sgd, lars
        trust_coefficient=0.001,  # lars
    ))
    c.precision = ml_collections.ConfigDict(dict(
        param_dtype="float32",    # 'float32' | 'bfloat16' | 'float16'
        compute_dtype="float32",  # logits and loss are always float32
        master_weights=False,     # float32 master weights in the optimizer state (half params)
        loss_scale="auto",        # 'auto' = dynamic when a dtype is float16 | 'dynamic' | 'none'
        initial_scale=2.0 ** 16,  # dynamic loss scaling, Megatron semantics:
        growth_factor=2.0,        #   x growth_factor after growth_interval clean steps
        growth_interval=1000,
        backoff_factor=0.5,       #   x backoff_factor once `hysteresis` overflows have been seen
        hysteresis=2,
        min_scale=1.0,
    ))
    # Device mesh sizes; -1 fills with the devices the other axes leave.
    # rules: what each axis splits, presets joined by '+': dp (replicate parameters), zero1
    # (optimizer state over data x fsdp), zero2 (+ gradients), zero3 (+ parameters), fsdp
    # (parameters and optimizer state over fsdp only), tp (Megatron tensor slicing), sp
    # (sequence parallelism of the residual stream over tensor); see lm/sharding.py.
    # dcn_*: ways across nodes (DCN / InfiniBand); an axis's total size is its ICI size x its DCN
    # size (e.g. tensor 8 in a node, dcn_data = the nodes).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1, pipeline=1,
                                            rules="fsdp+tp", dcn_data=1, dcn_fsdp=1,
                                            dcn_pipeline=1))
    # data.path: a directory from `python -m lm.data.prepare`; "" trains on the embedded corpus
    # (the stdlib's sources, prepared into WORKDIR/data with val_fraction held out).
    c.data = ml_collections.ConfigDict(dict(path="", val_fraction=0.02, shuffle=True, prefetch=2))
    # checkpoint: every N steps (0: only at the end), asynchronously; the `keep` most recent and
    # every multiple of `keep_every` stay. A workdir with checkpoints resumes from the latest.
    c.checkpoint = ml_collections.ConfigDict(dict(every=0, keep=2, keep_every=0, async_save=True))
    # With mesh.pipeline > 1: schedule 'gpipe' or 'interleaved' (virtual_stages layer chunks per
    # stage), microbatches per step a multiple of the stages; see lm/pipeline.py.
    c.pipeline = ml_collections.ConfigDict(dict(schedule="gpipe", microbatches=1,
                                                virtual_stages=1))
    return c
