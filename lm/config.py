"""Run configuration: ConfigDict (from `configs/*.py`) -> validated, frozen dataclasses.

Config files are Python (`get_config(arg) -> ml_collections.ConfigDict`). The entry point calls
`from_config_dict` once, before anything compiles; every module below it receives only the small
dataclass it needs (`ModelConfig` for the model, `OptimConfig` for the optimizer, ...). Every
check here names the offending key and what would be valid, so a typo never surfaces as an XLA
traceback.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

STYLES = ("gpt2", "llama")
OPTIMIZERS = ("adamw", "lamb", "lars", "nvlamb", "sgd")
SCHEDULES = ("cosine", "linear", "constant", "inverse_sqrt")
REMAT = ("none", "full", "dots", "minimal")
LOSS_SCALE = ("auto", "dynamic", "none")
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("data", "fsdp", "tensor", "sequence", "pipeline")
PIPELINE_SCHEDULES = ("gpipe", "interleaved")
# mesh.rules: presets joined with '+' (lm.sharding.layout): dp, zero1, zero2, zero3, fsdp, tp, sp.
RULE_PARTS = ("dp", "zero1", "zero2", "zero3", "fsdp", "tp", "sp")


class ConfigError(ValueError):
    """A config value a user can fix; the message names the key."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    style: str = "gpt2"  # 'gpt2': learned positions, LayerNorm, GELU, tied; 'llama': RoPE, RMSNorm, SwiGLU, GQA
    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int = 4
    mlp_dim: int = 1024
    vocab_size: int = 384
    max_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    scan_layers: bool = True  # lax.scan over the stacked layers (fast compiles) or unroll them
    # Recomputed in the backward pass, per layer: 'none'; 'full' (save only the layer input);
    # 'dots' (save matmul outputs); 'minimal' (save only the attention output).
    remat: str = "none"
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def tied_embeddings(self) -> bool:
        return self.style == "gpt2"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # global, over all hosts and devices
    seq_len: int = 128
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    sample_tokens: int = 200
    progress: bool = True
    microbatches: int = 1  # gradient accumulation: the batch is split into this many, in one jit
    skip_nonfinite: bool = False  # skip an update whose gradients are not finite (always on
                                  # with dynamic loss scaling); off: a non-finite loss stops the run
    init_from: str = ""  # parameters only, from a checkpoint directory or a training workdir


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | lamb | lars | nvlamb | sgd
    lr: float = 3e-4
    schedule: str = "cosine"  # after linear warmup: cosine | linear | constant | inverse_sqrt
    warmup_steps: int = 100
    decay_steps: int = 0  # cosine decay length; 0 = until train.steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9  # sgd, lars
    nesterov: bool = False  # sgd, lars
    trust_coefficient: float = 0.001  # lars


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    """Numerics beyond the dtypes (`precision.param_dtype` / `compute_dtype` live in
    ModelConfig, which the model is built from)."""
    master_weights: bool = False  # float32 master copy in the optimizer state
    loss_scale: str = "auto"  # 'auto' (dynamic when a dtype is float16) | 'dynamic' | 'none'
    initial_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    growth_interval: int = 1000  # clean steps before the scale grows
    backoff_factor: float = 0.5
    hysteresis: int = 2  # overflows tolerated before the scale backs off
    min_scale: float = 1.0

    def dynamic(self, model: ModelConfig) -> bool:
        return self.loss_scale == "dynamic" or (
            self.loss_scale == "auto" and "float16" in (model.param_dtype, model.compute_dtype))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    pipeline: int = 1
    rules: str = "fsdp+tp"  # what is split over which axis: presets joined by '+' (see sharding)
    # Across nodes (DCN / InfiniBand): each axis's total size is its ICI size x its DCN size.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_pipeline: int = 1

    def dcn_shape(self) -> dict[str, int]:
        return {a: getattr(self, f"dcn_{a}", 1) for a in MESH_AXES}

    def shape(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How the layers run over the `mesh.pipeline` stages (see lm.pipeline); unused when
    mesh.pipeline is 1."""
    schedule: str = "gpipe"  # 'gpipe' | 'interleaved'
    microbatches: int = 1  # M per step (per train.microbatches slice): a multiple of the stages
    virtual_stages: int = 1  # v layer chunks per stage (interleaved); 1 for gpipe


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""              # a `python -m lm.data.prepare` directory; "" = the embedded corpus
    val_fraction: float = 0.02  # embedded corpus: share of documents held out for evaluation
    shuffle: bool = True        # a seeded permutation of the sequences each epoch
    prefetch: int = 2           # batches built ahead by a background thread; 0 = none


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # 0 = only the final checkpoint
    keep: int = 2  # the most recent ones kept
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    async_save: bool = True  # write in the background while training goes on


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig
    optim: OptimConfig
    precision: PrecisionConfig
    mesh: MeshConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    pipeline: PipelineConfig = PipelineConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading config files


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:arg]` the way `--config` does (for tests, notebooks, benches)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg=None)")
    return module.get_config(arg or None)


def override(cfg: ml_collections.ConfigDict, **flat: Any) -> ml_collections.ConfigDict:
    """Returns a copy with dotted keys replaced (`override(c, **{"train.steps": 2})`).

    Unknown keys raise ConfigError, as `--config.x.y=` does on the command line.
    """
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            if p not in node:
                raise ConfigError(f"unknown config key {key!r}: no section {p!r}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(node.keys())}")
        try:
            node[leaf] = value
        except TypeError as e:  # ConfigDict keeps each key's type
            raise ConfigError(f"{key!r}: {e}") from None
    return cfg


# ---------------------------------------------------------------------------------------------
# ConfigDict -> dataclasses


def _section(cd: ml_collections.ConfigDict, name: str, cls: type, rename=None) -> Any:
    """Builds dataclass `cls` from section `name`, rejecting unknown keys and wrong types."""
    rename = rename or {}
    if name not in cd:
        return None
    raw = cd[name].to_dict() if isinstance(cd[name], ml_collections.ConfigDict) else dict(cd[name])
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        field = rename.get(key, key)
        if field not in fields:
            valid = sorted(set(fields) - set(rename.values()) | set(rename))
            raise ConfigError(f"unknown config key '{name}.{key}'; valid keys: {valid}")
        default = fields[field].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"'{name}.{key}' must be true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"'{name}.{key}' must be an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"'{name}.{key}' must be a number, got {value!r}")
            value = float(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"'{name}.{key}' must be a string, got {value!r}")
        kwargs[field] = value
    return cls(**kwargs)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' {message}")


def from_config_dict(cd: ml_collections.ConfigDict) -> RunConfig:
    """Validates `cd` and returns the frozen RunConfig every module is built from."""
    known = {"model", "train", "optim", "precision", "mesh", "data", "checkpoint", "pipeline"}
    for key in cd.keys():
        if key not in known:
            raise ConfigError(f"unknown config section {key!r}; valid sections: {sorted(known)}")
    # `precision` is its own section for users but travels inside ModelConfig.
    model = _section(cd, "model", ModelConfig) or ModelConfig()
    if "precision" in cd:
        prec = dict(cd.precision)
        dtypes = {k: prec.pop(k) for k in ("param_dtype", "compute_dtype") if k in prec}
        for k, v in dtypes.items():
            if not isinstance(v, str):
                raise ConfigError(f"'precision.{k}' must be a string, got {v!r}")
        model = dataclasses.replace(model, **dtypes)
        try:
            precision = _section({"precision": prec}, "precision", PrecisionConfig)
        except ConfigError as e:
            raise ConfigError(str(e).replace("valid keys: [", "valid keys: ['compute_dtype', "
                                             "'param_dtype', ")) from None
    else:
        precision = PrecisionConfig()
    run = RunConfig(
        model=model,
        train=_section(cd, "train", TrainConfig) or TrainConfig(),
        optim=_section(cd, "optim", OptimConfig) or OptimConfig(),
        precision=precision,
        mesh=_section(cd, "mesh", MeshConfig) or MeshConfig(),
        data=_section(cd, "data", DataConfig) or DataConfig(),
        checkpoint=_section(cd, "checkpoint", CheckpointConfig) or CheckpointConfig(),
        pipeline=_section(cd, "pipeline", PipelineConfig) or PipelineConfig(),
    )
    validate(run)
    return run


def validate(run: RunConfig) -> None:
    m, t, o = run.model, run.train, run.optim
    _check(m.style in STYLES, "model.style", f"must be one of {list(STYLES)}, got {m.style!r}")
    for key in ("num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim", "vocab_size",
                "max_len"):
        _check(getattr(m, key) > 0, f"model.{key}", f"must be positive, got {getattr(m, key)}")
    _check(m.d_model % m.num_heads == 0, "model.num_heads",
           f"({m.num_heads}) must divide model.d_model ({m.d_model})")
    _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"({m.num_kv_heads}) must divide model.num_heads ({m.num_heads})")
    if m.style == "gpt2":
        _check(m.num_kv_heads == m.num_heads, "model.num_kv_heads",
               f"must equal model.num_heads ({m.num_heads}) for style 'gpt2'")
    else:
        _check(m.head_dim % 2 == 0, "model.d_model",
               f"/ model.num_heads must be even for RoPE, got head_dim {m.head_dim}")
    for key in ("param_dtype", "compute_dtype"):
        _check(getattr(m, key) in DTYPES, f"precision.{key}",
               f"must be one of {list(DTYPES)}, got {getattr(m, key)!r}")

    for key in ("steps", "batch_size", "seq_len", "eval_every", "log_every", "eval_batches"):
        _check(getattr(t, key) > 0, f"train.{key}", f"must be positive, got {getattr(t, key)}")
    _check(t.sample_tokens >= 0, "train.sample_tokens", f"must be >= 0, got {t.sample_tokens}")
    _check(t.seq_len <= m.max_len, "train.seq_len",
           f"({t.seq_len}) must be <= model.max_len ({m.max_len})")

    _check(m.remat in REMAT, "model.remat", f"must be one of {list(REMAT)}, got {m.remat!r}")
    _check(t.microbatches >= 1, "train.microbatches", f"must be >= 1, got {t.microbatches}")
    _check(t.batch_size % t.microbatches == 0, "train.microbatches",
           f"({t.microbatches}) must divide train.batch_size ({t.batch_size})")

    _check(o.name in OPTIMIZERS, "optim.name", f"must be one of {list(OPTIMIZERS)}, got {o.name!r}")
    _check(o.schedule in SCHEDULES, "optim.schedule",
           f"must be one of {list(SCHEDULES)}, got {o.schedule!r}")
    _check(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    _check(o.trust_coefficient > 0, "optim.trust_coefficient",
           f"must be positive, got {o.trust_coefficient}")
    _check(o.name != "nvlamb" or o.clip_norm > 0, "optim.clip_norm",
           "must be positive for nvlamb: it is NVLAMB's max_grad_norm, the global gradient-norm "
           "pre-normalisation (NVIDIA's default 1.0)")
    _check(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _check(o.decay_steps >= 0, "optim.decay_steps", f"must be >= 0, got {o.decay_steps}")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(o.clip_norm >= 0, "optim.clip_norm", f"must be >= 0 (0 disables), got {o.clip_norm}")
    _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1/b2", f"must be in [0, 1), got {o.b1}, {o.b2}")

    for axis, size in run.mesh.shape().items():
        _check(size == -1 or size >= 1, f"mesh.{axis}", f"must be >= 1 or -1 (fill), got {size}")
    _check(sum(s == -1 for s in run.mesh.shape().values()) <= 1, "mesh",
           "may have at most one axis set to -1")
    for axis in ("data", "fsdp", "pipeline"):
        size = getattr(run.mesh, f"dcn_{axis}")
        _check(size >= 1, f"mesh.dcn_{axis}", f"must be >= 1, got {size}")
    parts = run.mesh.rules.split("+")
    _check(all(p in RULE_PARTS for p in parts) and len(set(parts)) == len(parts), "mesh.rules",
           f"must be presets from {list(RULE_PARTS)} joined by '+' (e.g. 'zero3+tp+sp'), got "
           f"{run.mesh.rules!r}")

    pp = run.pipeline
    _check(pp.schedule in PIPELINE_SCHEDULES, "pipeline.schedule",
           f"must be one of {list(PIPELINE_SCHEDULES)}, got {pp.schedule!r}")
    _check(pp.microbatches >= 1, "pipeline.microbatches", f"must be >= 1, got {pp.microbatches}")
    _check(pp.virtual_stages >= 1, "pipeline.virtual_stages",
           f"must be >= 1, got {pp.virtual_stages}")
    _check(pp.schedule == "interleaved" or pp.virtual_stages == 1, "pipeline.virtual_stages",
           f"must be 1 for schedule 'gpipe' (got {pp.virtual_stages}); use "
           "pipeline.schedule=interleaved for virtual stages")
    _check((t.batch_size // t.microbatches) % pp.microbatches == 0, "pipeline.microbatches",
           f"({pp.microbatches}) must divide the batch of each step (train.batch_size / "
           f"train.microbatches = {t.batch_size // t.microbatches})")

    _check(0 < run.data.val_fraction < 0.5, "data.val_fraction",
           f"must be in (0, 0.5), got {run.data.val_fraction}")
    _check(run.data.prefetch >= 0, "data.prefetch", f"must be >= 0, got {run.data.prefetch}")
    _check(run.checkpoint.every >= 0, "checkpoint.every", f"must be >= 0, got {run.checkpoint.every}")
    _check(run.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {run.checkpoint.keep}")
    _check(run.checkpoint.keep_every >= 0, "checkpoint.keep_every",
           f"must be >= 0 (0: none), got {run.checkpoint.keep_every}")

    p = run.precision
    _check(p.loss_scale in LOSS_SCALE, "precision.loss_scale",
           f"must be one of {list(LOSS_SCALE)}, got {p.loss_scale!r}")
    _check(p.initial_scale >= p.min_scale > 0, "precision.initial_scale",
           f"must be >= precision.min_scale > 0, got {p.initial_scale} and {p.min_scale}")
    _check(p.growth_factor > 1, "precision.growth_factor", f"must be > 1, got {p.growth_factor}")
    _check(0 < p.backoff_factor < 1, "precision.backoff_factor",
           f"must be in (0, 1), got {p.backoff_factor}")
    _check(p.growth_interval >= 1, "precision.growth_interval",
           f"must be >= 1, got {p.growth_interval}")
    _check(p.hysteresis >= 1, "precision.hysteresis", f"must be >= 1, got {p.hysteresis}")
    _check(m.param_dtype != "float16" or p.master_weights, "precision.param_dtype",
           "float16 parameters need precision.master_weights=True: Adam's second moment and "
           "small updates vanish in float16 (bfloat16 parameters work without)")
    _check(not p.master_weights or m.param_dtype != "float32", "precision.master_weights",
           "needs precision.param_dtype bfloat16 or float16 (float32 parameters are their own "
           "master weights)")
