"""Run configuration: the schema, and ConfigDict (from `configs/*.py`) -> frozen dataclasses.

The sections below are the only declaration of the config: each key's type, default, one-line
meaning and allowed values (`key(...)`). `defaults()` builds the ConfigDict that every file in
`configs/` starts from, and `python -m lm.config_reference` writes docs/configuration.md from the
same fields, so a key is added in one place.

Config files are Python (`get_config(arg) -> ml_collections.ConfigDict`). The entry point calls
`from_config_dict` once, before anything compiles; every module below it receives only the small
dataclass it needs (`ModelConfig` for the model, `OptimConfig` for the optimizer, ...). Every
check here names the offending key and what would be valid, so a typo never surfaces as an XLA
traceback.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from typing import Any

import ml_collections

STYLES = ("gpt2", "llama", "bert")
TASKS = ("lm", "mlm", "mlm_nsp", "classify", "span")
MASKED_TASKS = ("mlm", "mlm_nsp")
FINETUNE_TASKS = ("classify", "span")  # labelled data (lm/finetune.py), any style
OPTIMIZERS = ("adamw", "lamb", "lars", "nvlamb", "sgd")
SCHEDULES = ("cosine", "linear", "constant", "inverse_sqrt", "poly")
REMAT = ("none", "full", "dots", "minimal")
ATTENTION = ("auto", "xla", "cudnn")
LOSS_SCALE = ("auto", "dynamic", "none")
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("data", "fsdp", "tensor", "sequence", "pipeline")
PIPELINE_SCHEDULES = ("gpipe", "interleaved", "1f1b")
# mesh.rules: presets joined with '+' (lm.sharding.layout): dp, zero1, zero2, zero3, fsdp, tp, sp.
RULE_PARTS = ("dp", "zero1", "zero2", "zero3", "fsdp", "tp", "sp")
SPARSITY = ("", "none", "2:4")  # train.sparsity (lm/sparsity.py)


class ConfigError(ValueError):
    """A config value a user can fix; the message names the key."""


def key(default: Any, doc: str, choices: tuple[str, ...] | None = None, **bounds: float) -> Any:
    """A config key: its default, its one-line meaning (docs/configuration.md) and the values
    it may take: a string's `choices`, a number's bounds `ge`, `gt`, `le`, `lt` (checked by
    `from_config_dict`; relations between keys are checked in `validate`)."""
    return dataclasses.field(default=default,
                             metadata={"doc": doc, "choices": choices, "bounds": bounds})


BOUNDS = {"ge": (">=", lambda x, b: x >= b), "gt": (">", lambda x, b: x > b),
          "le": ("<=", lambda x, b: x <= b), "lt": ("<", lambda x, b: x < b)}


def allowed(field: dataclasses.Field) -> str:
    """The values a key may take, in words ('' where any value of its type is valid)."""
    if field.metadata.get("choices"):
        return "one of " + ", ".join(f"'{c}'" for c in field.metadata["choices"])
    return " and ".join(f"{BOUNDS[k][0]} {v}" for k, v in field.metadata.get("bounds", {}).items())


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network (`lm/model.py`). One definition, three styles."""
    style: str = key("gpt2", "'gpt2' (learned positions, LayerNorm, GELU, tied output head), "
                     "'llama' (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head) or "
                     "'bert' (a bidirectional post-LN encoder: token types, exact GELU, the "
                     "masked-LM head; task.name 'mlm' or 'mlm_nsp')", STYLES)
    num_layers: int = key(4, "transformer layers", gt=0)
    d_model: int = key(256, "width of the residual stream", gt=0)
    num_heads: int = key(4, "query heads; head_dim = d_model / num_heads", gt=0)
    num_kv_heads: int = key(4, "key/value heads; fewer than num_heads is grouped-query attention "
                            "(must divide num_heads)", gt=0)
    mlp_dim: int = key(1024, "hidden width of the MLP (SwiGLU: of each of its two input "
                       "projections)", gt=0)
    vocab_size: int = key(384, "embedding rows; at least the tokenizer's vocabulary (byte "
                          "tokenizer: 258)", gt=0)
    max_len: int = key(256, "longest sequence (learned positions, KV cache length when "
                       "serving)", gt=0)
    rope_theta: float = key(10000.0, "RoPE base frequency (llama style)")
    norm_eps: float = key(1e-5, "epsilon of LayerNorm / RMSNorm (BERT: 1e-12)")
    type_vocab_size: int = key(2, "bert: rows of the token-type (segment) embedding", gt=0)
    nsp_head: bool = key(False, "bert: the pooler (dense + tanh on [CLS]) and the 2-way "
                         "next-sentence head (needed by task.name 'mlm_nsp')")
    scan_layers: bool = key(True, "lax.scan over the stacked layers (fast compiles, less memory "
                            "with remat) or unroll them (often faster steps for shallow models)")
    remat: str = key("none", "what a layer keeps for the backward pass: 'none', 'full' (its "
                     "input), 'dots' (matmul outputs), 'minimal' (the attention output)", REMAT)
    attention: str = key("auto", "'cudnn' (fused flash attention: NVIDIA SM80+, bf16/fp16, "
                         "head_dim <= 128, multiple of 8), 'xla' (jax.nn.dot_product_attention's "
                         "XLA path) or 'auto' (cudnn where it runs, else lm's own: "
                         "lm.model.causal_attention)", ATTENTION)
    fused_projections: bool = key(False, "one matmul weight for attention's q, k and v (wqkv "
                                  "[embed, kv_heads, num_heads / num_kv_heads + 2, head_dim]: "
                                  "each kv group's query heads, then its k and v; biases bqkv) "
                                  "and one for SwiGLU's gate and up (wgi [embed, 2, mlp]); the "
                                  "same maths, other parameters (lm.fuse converts; lm.generate "
                                  "and lm.serve --fuse fuse an unfused checkpoint when loading)")

    quantized: str = key("none", "'int8': the layer matmuls are stored as int8 weights with "
                         "calibrated int8 activation scales and run as int8 x int8 -> int32 "
                         "(a checkpoint written by `python -m lm.quantize`; inference only)",
                         ("none", "int8"))

    # Keys that change how the layers run, not the parameters: a run may resume with others.
    EXECUTION_KEYS = ("scan_layers", "remat", "attention")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    # What each style is made of (the model and lm.convert ask these, not the style's name).
    @property
    def tied_embeddings(self) -> bool:
        return self.style in ("gpt2", "bert")

    @property
    def causal(self) -> bool:
        return self.style != "bert"

    @property
    def post_norm(self) -> bool:
        """Each sub-layer's residual sum is normalized (BERT) rather than its input."""
        return self.style == "bert"

    @property
    def biases(self) -> bool:
        return self.style in ("gpt2", "bert")

    @property
    def learned_positions(self) -> bool:
        return self.style in ("gpt2", "bert")

    @property
    def rope(self) -> bool:
        return self.style == "llama"

    @property
    def gelu_approximate(self) -> bool:
        """GPT-2's tanh GELU; BERT's is exact (erf)."""
        return self.style == "gpt2"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop (`lm/train.py`)."""
    steps: int = key(1000, "optimizer steps of the run", gt=0)
    batch_size: int = key(16, "global batch in sequences, over all hosts and devices", gt=0)
    seq_len: int = key(128, "tokens per training sequence", gt=0)
    seed: int = key(0, "parameter initialization and data order")
    eval_every: int = key(100, "steps between evaluations on the held-out split", gt=0)
    eval_batches: int = key(4, "batches per evaluation", gt=0)
    log_every: int = key(10, "steps between logged metrics (JSONL, TensorBoard)", gt=0)
    sample_tokens: int = key(200, "tokens sampled from the final model (0: none)", ge=0)
    progress: bool = key(True, "show a progress bar")
    microbatches: int = key(1, "gradient accumulation: microbatches per step, in one jit "
                            "(divides batch_size)", ge=1)
    skip_nonfinite: bool = key(False, "skip updates whose gradients are not finite (always on "
                               "with dynamic loss scaling); off, a non-finite loss stops the run")
    max_skipped_steps: int = key(50, "that many consecutive skipped steps (skip_nonfinite, dynamic "
                                 "loss scaling) stop the run with exit status 3 (0: no limit)",
                                 ge=0)
    init_from: str = key("", "start from these parameters (a checkpoint directory, a workdir, "
                         "or an lm.convert from-hf directory); fresh optimizer state")
    phase_start: int = key(0, "the step at which this phase's learning-rate schedule starts "
                           "(BERT's phase 2: resumed from phase 1's last checkpoint at this step, "
                           "the data loader may change seq_len and batch and starts over)", ge=0)
    profile_steps: str = key("", "'START:STOP': a jax.profiler trace of steps START..STOP "
                             "(from 1, inclusive) into WORKDIR/tb (TensorBoard's profile tab); "
                             "'' = off")
    sparsity: str = key("", "'2:4': structured sparsity as NVIDIA's ASP (lm/sparsity.py): at "
                        "the start (after init or train.init_from, typically a trained dense "
                        "checkpoint) every layer matmul weight keeps the 2 largest of each 4 "
                        "consecutive entries along its input axis, and every update keeps those "
                        "masks (gradients masked before the optimizer, weights after); '' or "
                        "'none': dense", SPARSITY)

    @property
    def profile_window(self) -> tuple[int, int] | None:
        """(START, STOP) of profile_steps; None when off (its form is checked by `validate`)."""
        return steps_range(self.profile_steps)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer and learning-rate schedule (`lm/optim.py`)."""
    name: str = key("adamw", "'adamw', 'lamb', 'lars', 'nvlamb' or 'sgd' (momentum)", OPTIMIZERS)
    lr: float = key(3e-4, "peak learning rate (lm.optim.scale_lr: linear / sqrt batch-size "
                    "rules)", gt=0)
    schedule: str = key("cosine", "after the linear warmup: 'cosine', 'linear', 'constant', "
                        "'inverse_sqrt', 'poly' (NVIDIA's BERT: lr (1 - t / T)^poly_power)",
                        SCHEDULES)
    poly_power: float = key(0.5, "the exponent of the 'poly' schedule", gt=0)
    warmup_steps: int = key(100, "linear warmup from 0 to lr", ge=0)
    decay_steps: int = key(0, "end of the cosine / linear decay; 0 = train.steps", ge=0)
    min_lr_ratio: float = key(0.1, "floor of the decay, as a fraction of lr", ge=0, le=1)
    weight_decay: float = key(0.1, "decoupled weight decay (not on norms and biases)", ge=0)
    clip_norm: float = key(1.0, "clip the global gradient norm to this; 0 disables (nvlamb: its "
                           "max_grad_norm, > 0)", ge=0)
    b1: float = key(0.9, "first-moment decay (Adam family)", ge=0, lt=1)
    b2: float = key(0.95, "second-moment decay (Adam family)", ge=0, lt=1)
    eps: float = key(1e-8, "denominator epsilon (Adam family)")
    momentum: float = key(0.9, "momentum (sgd, lars)", ge=0, lt=1)
    nesterov: bool = key(False, "Nesterov momentum (sgd, lars)")
    trust_coefficient: float = key(0.001, "LARS trust ratio coefficient", gt=0)


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    """Number formats and dynamic loss scaling (docs/numerics.md). The model receives this
    section with its ModelConfig."""
    param_dtype: str = key("float32", "stored parameters: 'float32', 'bfloat16' or 'float16'",
                           DTYPES)
    compute_dtype: str = key("float32", "activations and matmuls; logits and the loss are "
                             "always float32", DTYPES)
    master_weights: bool = key(False, "keep a float32 master copy in the optimizer state (with "
                               "half-precision parameters)")
    loss_scale: str = key("auto", "'auto' (dynamic when a dtype is float16), 'dynamic' or "
                          "'none'", LOSS_SCALE)
    initial_scale: float = key(2.0 ** 16, "dynamic loss scaling: the starting scale", gt=0)
    growth_factor: float = key(2.0, "scale multiplier after growth_interval clean steps", gt=1)
    growth_interval: int = key(1000, "clean steps before the scale grows", ge=1)
    backoff_factor: float = key(0.5, "scale multiplier once hysteresis overflows have been "
                                "seen", gt=0, lt=1)
    hysteresis: int = key(2, "overflows tolerated before the scale backs off (Megatron)", ge=1)
    min_scale: float = key(1.0, "the scale never falls below this", gt=0)

    @property
    def dynamic(self) -> bool:
        """Whether the loss is scaled dynamically (and non-finite steps are skipped)."""
        return self.loss_scale == "dynamic" or (
            self.loss_scale == "auto" and "float16" in (self.param_dtype, self.compute_dtype))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh and what is split over it (docs/parallelism.md, `lm/sharding.py`)."""
    data: int = key(-1, "data-parallel ways (-1: the devices the other axes leave)")
    fsdp: int = key(1, "fully sharded data-parallel ways (parameters, gradients and optimizer "
                    "state split; ZeRO-3)")
    tensor: int = key(1, "tensor-parallel ways (Megatron slicing of heads, MLP and vocabulary)")
    sequence: int = key(1, "sequence-parallel ways (the length axis of activations)")
    pipeline: int = key(1, "pipeline stages (contiguous blocks of layers)")
    rules: str = key("fsdp+tp", "what each axis splits: presets joined by '+': dp, zero1, zero2, "
                     "zero3, fsdp, tp, sp")
    dcn_data: int = key(1, "across nodes (DCN / InfiniBand): data ways; an axis's total size is "
                        "its ICI size x its DCN size", ge=1)
    dcn_fsdp: int = key(1, "across nodes: fsdp ways", ge=1)
    dcn_pipeline: int = key(1, "across nodes: pipeline stages", ge=1)

    def dcn_shape(self) -> dict[str, int]:
        return {a: getattr(self, f"dcn_{a}", 1) for a in MESH_AXES}

    def shape(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Pipeline schedules over `mesh.pipeline` stages (`lm/pipeline.py`); unused when
    mesh.pipeline is 1."""
    schedule: str = key("gpipe", "'gpipe', 'interleaved' (virtual_stages layer chunks per "
                        "stage) or '1f1b' (one forward, one backward: at most 2 x stages x "
                        "virtual_stages micro-batch inputs kept, whatever "
                        "pipeline.microbatches; interleaved with virtual_stages > 1; task "
                        "'lm')", PIPELINE_SCHEDULES)
    microbatches: int = key(1, "micro-batches per step; a multiple of the stages", ge=1)
    virtual_stages: int = key(1, "layer chunks per stage: 1 for gpipe, >= 2 for interleaved, "
                              "either for 1f1b", ge=1)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data (docs/data.md)."""
    path: str = key("", "a `python -m lm.data.prepare` directory; '' = the embedded corpus (the "
                    "stdlib's sources, prepared into WORKDIR/data)")
    val_fraction: float = key(0.02, "embedded corpus: share of documents held out for "
                              "evaluation", gt=0, lt=0.5)
    shuffle: bool = key(True, "a seeded permutation of the sequences each epoch")
    prefetch: int = key(2, "batches built ahead by a background thread; 0 = none", ge=0)
    tokenizer: str = key("bytes", "embedded corpus: 'bytes' or 'wordpiece:N' (a WordPiece "
                         "vocabulary of N entries trained on it, with BERT's special tokens); "
                         "fine-tuning without train.init_from: 'bytes' or a tokenizer.json path")
    eval_path: str = key("", "fine-tuning (task classify / span): the labelled JSONL file "
                         "evaluated every train.eval_every steps (data.path: the training one)")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What a run trains (`lm/tasks.py`, `lm/finetune.py`): next-token prediction, BERT's
    masked-LM objectives, or a fine-tuning head on labelled data."""
    name: str = key("lm", "'lm' (causal next-token, the decoders), 'mlm' (masked-LM on packed "
                    "windows), 'mlm_nsp' (masked-LM + next-sentence prediction on sentence "
                    "pairs; needs model.nsp_head), 'classify' (sequence / pair classification) "
                    "or 'span' (SQuAD-style extractive QA); the last two on JSONL rows "
                    "(docs/finetuning.md), any model.style", TASKS)
    mask_prob: float = key(0.15, "mlm: share of each sequence's tokens chosen for prediction "
                           "(80% become [MASK], 10% a random token, 10% stay)", gt=0, lt=1)
    max_predictions: int = key(0, "mlm: at most this many predicted tokens per sequence (NVIDIA: "
                               "20 at seq_len 128, 80 at 512); 0 = seq_len", ge=0)
    whole_word_mask: bool = key(False, "mlm: choose whole words (a WordPiece word and its ## "
                                "pieces) rather than single tokens")
    nsp_random_prob: float = key(0.5, "mlm_nsp: share of pairs whose second segment is a random "
                                 "one (label 1)", ge=0, le=1)

    num_labels: int = key(0, "classify: outputs of the head; 0 = as many as task.labels", ge=0)
    labels: str = key("", "classify: the labels in the head's order, a JSON list of strings or "
                      "integers; '' = the sorted distinct labels of data.path (then stored in "
                      "the run's checkpoints)")
    max_query_len: int = key(64, "span: the question's tokens kept", gt=0)
    doc_stride: int = key(128, "span: tokens between the starts of consecutive windows of a "
                          "long context (Google's BERT)", gt=0)
    max_answer_len: int = key(30, "span: the longest answer (tokens) prediction considers", gt=0)

    @property
    def masked(self) -> bool:
        return self.name in MASKED_TASKS

    @property
    def finetune(self) -> bool:
        return self.name in FINETUNE_TASKS

    @property
    def label_list(self) -> list:
        """task.labels parsed ([] when unset; its form is checked by `validate`)."""
        return json.loads(self.labels) if self.labels else []


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in WORKDIR/checkpoints (docs/checkpoints.md)."""
    every: int = key(0, "steps between checkpoints (0: only the final one)", ge=0)
    keep: int = key(2, "the most recent checkpoints kept", ge=1)
    keep_every: int = key(0, "also keep every checkpoint whose step is a multiple of this "
                          "(0: none)", ge=0)
    async_save: bool = key(True, "write checkpoints in the background while training goes on")


# The schema: section name -> its dataclass, in the order the reference documents them.
SECTIONS: dict[str, type] = {
    "model": ModelConfig, "train": TrainConfig, "optim": OptimConfig,
    "precision": PrecisionConfig, "mesh": MeshConfig, "pipeline": PipelineConfig,
    "data": DataConfig, "checkpoint": CheckpointConfig, "task": TaskConfig,
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    precision: PrecisionConfig = PrecisionConfig()
    mesh: MeshConfig = MeshConfig()
    pipeline: PipelineConfig = PipelineConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    task: TaskConfig = TaskConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def defaults() -> ml_collections.ConfigDict:
    """Every key of every section with its default: what `configs/*.py` start from."""
    return ml_collections.ConfigDict({
        name: {f.name: f.default for f in dataclasses.fields(cls)}
        for name, cls in SECTIONS.items()})


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
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            if p not in node:
                raise ConfigError(f"unknown config key {dotted!r}: no section {p!r}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"unknown config key {dotted!r}; valid keys here: "
                              f"{sorted(node.keys())}")
        try:
            node[leaf] = value
        except TypeError as e:  # ConfigDict keeps each key's type
            raise ConfigError(f"{dotted!r}: {e}") from None
    return cfg


# ---------------------------------------------------------------------------------------------
# ConfigDict -> dataclasses


def _section(raw: Any, name: str, cls: type) -> Any:
    """Builds dataclass `cls` from section `name`, rejecting unknown keys, wrong types and
    values outside a key's choices."""
    raw = raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else dict(raw)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, value in raw.items():
        if k not in fields:
            raise ConfigError(f"unknown config key '{name}.{k}'; valid keys: {sorted(fields)}")
        kwargs[k] = _typed(f"{name}.{k}", value, fields[k].default)
        meta = fields[k].metadata
        ok = (value in meta["choices"] if meta.get("choices") else
              all(BOUNDS[b][1](value, v) for b, v in meta.get("bounds", {}).items()))
        _check(ok, f"{name}.{k}", f"must be {allowed(fields[k])}, got {value!r}")
    return cls(**kwargs)


def _typed(name: str, value: Any, default: Any) -> Any:
    """`value`, checked against the type of the key's default (an int is a valid float)."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    else:
        ok, kind = isinstance(value, str), "a string"
    if not ok:
        raise ConfigError(f"'{name}' must be {kind}, got {value!r}")
    return value


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"'{name}' {message}")


def from_config_dict(cd: ml_collections.ConfigDict) -> RunConfig:
    """Validates `cd` and returns the frozen RunConfig every module is built from."""
    for name in cd.keys():
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section {name!r}; valid sections: "
                              f"{sorted(SECTIONS)}")
    run = RunConfig(**{name: _section(cd[name], name, SECTIONS[name]) for name in cd.keys()})
    validate(run)
    return run


def steps_range(text: str) -> tuple[int, int] | None:
    """'START:STOP' -> (START, STOP) with 1 <= START <= STOP; None for '' or any other text."""
    match = re.fullmatch(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*", text)
    if match is None:
        return None
    start, stop = int(match[1]), int(match[2])
    return (start, stop) if 1 <= start <= stop else None


def _check_labels(k: TaskConfig) -> None:
    """task.labels is '' or a JSON list of distinct strings or integers that num_labels fits."""
    try:
        labels = k.label_list
    except json.JSONDecodeError as e:
        raise ConfigError(f"'task.labels' must be a JSON list such as '[\"neg\", \"pos\"]' or "
                          f"'[0, 1]', got {k.labels!r} ({e})") from None
    ok = isinstance(labels, list) and len(set(map(str, labels))) == len(labels) and all(
        isinstance(x, (str, int)) and not isinstance(x, bool) for x in labels)
    _check(ok, "task.labels", f"must list distinct strings or integers, got {k.labels!r}")
    _check(not labels or k.num_labels in (0, len(labels)), "task.num_labels",
           f"({k.num_labels}) must be 0 or the number of task.labels ({len(labels)})")


def validate(run: RunConfig) -> None:
    """The checks that relate keys to each other (types, choices and bounds are checked per
    key)."""
    m, t, o, p, pp = run.model, run.train, run.optim, run.precision, run.pipeline
    _check(m.d_model % m.num_heads == 0, "model.num_heads",
           f"({m.num_heads}) must divide model.d_model ({m.d_model})")
    _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"({m.num_kv_heads}) must divide model.num_heads ({m.num_heads})")
    if m.style != "llama":
        _check(m.num_kv_heads == m.num_heads, "model.num_kv_heads",
               f"must equal model.num_heads ({m.num_heads}) for style {m.style!r}")
    else:
        _check(m.head_dim % 2 == 0, "model.d_model",
               f"/ model.num_heads must be even for RoPE, got head_dim {m.head_dim}")
    k = run.task
    _check(k.finetune or (m.style == "bert") == k.masked, "task.name",
           f"({k.name!r}) must be 'mlm', 'mlm_nsp', 'classify' or 'span' for model.style 'bert' "
           f"(an encoder) and 'lm', 'classify' or 'span' for the decoders (model.style is "
           f"{m.style!r})")
    _check_labels(k)
    _check(k.name != "mlm_nsp" or m.nsp_head, "model.nsp_head",
           "must be True for task.name 'mlm_nsp' (the next-sentence head)")
    _check(k.max_predictions <= t.seq_len, "task.max_predictions",
           f"({k.max_predictions}) must be <= train.seq_len ({t.seq_len})")
    _check(not k.masked or t.seq_len >= 8, "train.seq_len",
           f"must be >= 8 for a masked-LM task, got {t.seq_len}")
    _check(t.phase_start < t.steps, "train.phase_start",
           f"({t.phase_start}) must be < train.steps ({t.steps})")
    _check(t.seq_len <= m.max_len, "train.seq_len",
           f"({t.seq_len}) must be <= model.max_len ({m.max_len})")
    _check(t.batch_size % t.microbatches == 0, "train.microbatches",
           f"({t.microbatches}) must divide train.batch_size ({t.batch_size})")
    _check(not t.profile_steps or t.profile_window, "train.profile_steps",
           f"must be 'START:STOP' with integers 1 <= START <= STOP (e.g. '10:12'), or '' (no "
           f"trace), got {t.profile_steps!r}")
    if t.sparsity == "2:4":  # groups of 4 along every input axis: D (and N x H = D), F
        for name, size in (("model.d_model", m.d_model), ("model.mlp_dim", m.mlp_dim)):
            _check(size % 4 == 0, name, f"({size}) must be a multiple of 4 for "
                   "train.sparsity '2:4' (groups of 4 along each matmul's input axis)")
    _check(o.name != "nvlamb" or o.clip_norm > 0, "optim.clip_norm",
           "must be positive for nvlamb: it is NVLAMB's max_grad_norm, the global gradient-norm "
           "pre-normalisation (NVIDIA's default 1.0)")

    for axis, size in run.mesh.shape().items():
        _check(size == -1 or size >= 1, f"mesh.{axis}", f"must be >= 1 or -1 (fill), got {size}")
    _check(sum(s == -1 for s in run.mesh.shape().values()) <= 1, "mesh",
           "may have at most one axis set to -1")
    parts = run.mesh.rules.split("+")
    _check(all(x in RULE_PARTS for x in parts) and len(set(parts)) == len(parts), "mesh.rules",
           f"must be presets from {list(RULE_PARTS)} joined by '+' (e.g. 'zero3+tp+sp'), got "
           f"{run.mesh.rules!r}")

    # Both keys name the schedule (lm.pipeline runs by virtual_stages): they must agree.
    _check(pp.schedule == "1f1b" or (pp.schedule == "interleaved") == (pp.virtual_stages > 1),
           "pipeline.virtual_stages", f"({pp.virtual_stages}) must be 1 for schedule 'gpipe' "
           f"and >= 2 for 'interleaved' (either for '1f1b'; pipeline.schedule is "
           f"{pp.schedule!r})")
    _check((t.batch_size // t.microbatches) % pp.microbatches == 0, "pipeline.microbatches",
           f"({pp.microbatches}) must divide the batch of each step (train.batch_size / "
           f"train.microbatches = {t.batch_size // t.microbatches})")

    _check(p.initial_scale >= p.min_scale, "precision.initial_scale",
           f"must be >= precision.min_scale, got {p.initial_scale} and {p.min_scale}")
    _check(p.param_dtype != "float16" or p.master_weights, "precision.param_dtype",
           "float16 parameters need precision.master_weights=True: Adam's second moment and "
           "small updates vanish in float16 (bfloat16 parameters work without)")
    _check(not p.master_weights or p.param_dtype != "float32", "precision.master_weights",
           "needs precision.param_dtype bfloat16 or float16 (float32 parameters are their own "
           "master weights)")
