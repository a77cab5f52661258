"""The configuration reference (docs/configuration.md), generated from the code.

    python -m lm.config_reference > docs/configuration.md

Keys and defaults come from `configs/base.py`, types from the dataclasses in `lm.config`, and
the one-line meaning of each key from `DOCS` below. tests/test_config.py fails when a key has
no entry here (a key added without documentation), when an entry names no key, or when
docs/configuration.md is not the current output.
"""
from __future__ import annotations

import dataclasses

SECTIONS = {
    "model": "The network (`lm/model.py`). One definition, two styles.",
    "train": "The training loop (`lm/train.py`).",
    "optim": "The optimizer and learning-rate schedule (`lm/optim.py`).",
    "precision": "Number formats and dynamic loss scaling (docs/numerics.md).",
    "mesh": "The device mesh and what is split over it (docs/parallelism.md, `lm/sharding.py`).",
    "pipeline": "Pipeline schedules over `mesh.pipeline` stages (`lm/pipeline.py`).",
    "data": "Training data (docs/data.md).",
    "checkpoint": "Orbax checkpoints in WORKDIR/checkpoints (docs/checkpoints.md).",
}

DOCS = {
    "model.style": "'gpt2' (learned positions, LayerNorm, GELU, tied output head) or 'llama' "
                   "(RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head)",
    "model.num_layers": "transformer layers",
    "model.d_model": "width of the residual stream",
    "model.num_heads": "query heads; head_dim = d_model / num_heads",
    "model.num_kv_heads": "key/value heads; fewer than num_heads is grouped-query attention "
                          "(must divide num_heads)",
    "model.mlp_dim": "hidden width of the MLP (SwiGLU: of each of its two input projections)",
    "model.vocab_size": "embedding rows; at least the tokenizer's vocabulary",
    "model.max_len": "longest sequence (learned positions, KV cache length when serving)",
    "model.rope_theta": "RoPE base frequency (llama style)",
    "model.norm_eps": "epsilon of LayerNorm / RMSNorm",
    "model.scan_layers": "lax.scan over the stacked layers (fast compiles, less memory with "
                         "remat) or unroll them (often faster steps for shallow models)",
    "model.remat": "what a layer keeps for the backward pass: 'none', 'full' (its input), "
                   "'dots' (matmul outputs), 'minimal' (the attention output)",
    "train.steps": "optimizer steps of the run",
    "train.batch_size": "global batch in sequences, over all hosts and devices",
    "train.seq_len": "tokens per training sequence",
    "train.seed": "parameter initialization and data order",
    "train.eval_every": "steps between evaluations on the held-out split",
    "train.eval_batches": "batches per evaluation",
    "train.log_every": "steps between logged metrics (JSONL, TensorBoard)",
    "train.sample_tokens": "tokens sampled from the final model (0: none)",
    "train.progress": "show a progress bar",
    "train.microbatches": "gradient accumulation: microbatches per step, in one jit (divides "
                          "batch_size)",
    "train.skip_nonfinite": "skip updates whose gradients are not finite (always on with "
                            "dynamic loss scaling); off, a non-finite loss stops the run",
    "train.init_from": "start from these parameters (a checkpoint directory, a workdir, or an "
                       "lm.convert from-hf directory); fresh optimizer state",
    "optim.name": "'adamw', 'lamb', 'lars', 'nvlamb' or 'sgd' (momentum)",
    "optim.lr": "peak learning rate (lm.optim.scale_lr: linear / sqrt batch-size rules)",
    "optim.schedule": "after the linear warmup: 'cosine', 'linear', 'constant', 'inverse_sqrt'",
    "optim.warmup_steps": "linear warmup from 0 to lr",
    "optim.decay_steps": "end of the cosine / linear decay; 0 = train.steps",
    "optim.min_lr_ratio": "floor of the decay, as a fraction of lr",
    "optim.weight_decay": "decoupled weight decay (not on norms and biases)",
    "optim.clip_norm": "clip the global gradient norm to this; 0 disables (nvlamb: its "
                       "max_grad_norm, > 0)",
    "optim.b1": "first-moment decay (Adam family)",
    "optim.b2": "second-moment decay (Adam family)",
    "optim.eps": "denominator epsilon (Adam family)",
    "optim.momentum": "momentum (sgd, lars)",
    "optim.nesterov": "Nesterov momentum (sgd, lars)",
    "optim.trust_coefficient": "LARS trust ratio coefficient",
    "precision.param_dtype": "stored parameters: 'float32', 'bfloat16' or 'float16'",
    "precision.compute_dtype": "activations and matmuls; logits and the loss are always "
                               "float32",
    "precision.master_weights": "keep a float32 master copy in the optimizer state (with "
                                "half-precision parameters)",
    "precision.loss_scale": "'auto' (dynamic when a dtype is float16), 'dynamic' or 'none'",
    "precision.initial_scale": "dynamic loss scaling: the starting scale",
    "precision.growth_factor": "scale multiplier after growth_interval clean steps",
    "precision.growth_interval": "clean steps before the scale grows",
    "precision.backoff_factor": "scale multiplier once hysteresis overflows have been seen",
    "precision.hysteresis": "overflows tolerated before the scale backs off (Megatron)",
    "precision.min_scale": "the scale never falls below this",
    "mesh.data": "data-parallel ways (-1: the devices the other axes leave)",
    "mesh.fsdp": "fully sharded data-parallel ways (parameters, gradients and optimizer state "
                 "split; ZeRO-3)",
    "mesh.tensor": "tensor-parallel ways (Megatron slicing of heads, MLP and vocabulary)",
    "mesh.sequence": "sequence-parallel ways (the length axis of activations)",
    "mesh.pipeline": "pipeline stages (contiguous blocks of layers)",
    "mesh.rules": "what each axis splits: presets joined by '+': dp, zero1, zero2, zero3, "
                  "fsdp, tp, sp",
    "mesh.dcn_data": "across nodes (DCN / InfiniBand): data ways; an axis's total size is its "
                     "ICI size x its DCN size",
    "mesh.dcn_fsdp": "across nodes: fsdp ways",
    "mesh.dcn_pipeline": "across nodes: pipeline stages",
    "pipeline.schedule": "'gpipe' or 'interleaved' (virtual_stages layer chunks per stage)",
    "pipeline.microbatches": "micro-batches per step; a multiple of the stages",
    "pipeline.virtual_stages": "layer chunks per stage (interleaved); 1 for gpipe",
    "data.path": "a `python -m lm.data.prepare` directory; '' = the embedded corpus (the "
                 "stdlib's sources, prepared into WORKDIR/data)",
    "data.val_fraction": "embedded corpus: share of documents held out for evaluation",
    "data.shuffle": "a seeded permutation of the sequences each epoch",
    "data.prefetch": "batches built ahead by a background thread; 0 = none",
    "checkpoint.every": "steps between checkpoints (0: only the final one)",
    "checkpoint.keep": "the most recent checkpoints kept",
    "checkpoint.keep_every": "also keep every checkpoint whose step is a multiple of this "
                             "(0: none)",
    "checkpoint.async_save": "write checkpoints in the background while training goes on",
}


def config_keys() -> dict[str, object]:
    """Every key of configs/base.py ('section.key') with its default."""
    from configs.base import get_config
    base = get_config()
    return {f"{section}.{key}": value for section in base.keys()
            for key, value in base[section].items()}


def _types() -> dict[str, str]:
    from lm import config
    classes = {"model": config.ModelConfig, "train": config.TrainConfig,
               "optim": config.OptimConfig, "precision": config.PrecisionConfig,
               "mesh": config.MeshConfig, "pipeline": config.PipelineConfig,
               "data": config.DataConfig, "checkpoint": config.CheckpointConfig}
    types = {f"{s}.{f.name}": str(f.type) for s, cls in classes.items()
             for f in dataclasses.fields(cls)}
    for name in ("param_dtype", "compute_dtype"):  # stored on the model, set under precision
        types[f"precision.{name}"] = types.pop(f"model.{name}")
    return types


def check() -> None:
    """ValueError naming keys without documentation or documentation without a key."""
    keys = set(config_keys())
    missing, stale = sorted(keys - set(DOCS)), sorted(set(DOCS) - keys)
    if missing or stale:
        raise ValueError(f"lm/config_reference.py DOCS: undocumented keys {missing}, entries "
                         f"for keys that do not exist {stale}")


def markdown() -> str:
    check()
    keys, types = config_keys(), _types()
    out = ["# Configuration reference", "",
           "Generated by `python -m lm.config_reference > docs/configuration.md` from "
           "`configs/base.py` (keys, defaults), `lm/config.py` (types) and "
           "`lm/config_reference.py` (meanings); tests/test_config.py fails when it is out of "
           "date or a key is undocumented.", "",
           "A run is a config file (`--config configs/NAME.py[:ARG]`, a `get_config` that starts "
           "from `configs/base.py`) plus overrides `--config.SECTION.KEY=VALUE`; every key is "
           "checked (`ConfigError` names the key and what would be valid).", ""]
    for section, about in SECTIONS.items():
        out += [f"## {section}", "", about, "", "| key | type | default | meaning |",
                "|---|---|---|---|"]
        for key in DOCS:  # in DOCS's order: related keys together
            if key.startswith(section + "."):
                default = keys[key]
                shown = f"'{default}'" if isinstance(default, str) else repr(default)
                out.append(f"| `{key}` | {types.get(key, '')} | `{shown}` | {DOCS[key]} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
