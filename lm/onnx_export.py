"""ONNX export (`python -m lm.export --format onnx`): the serving functions of lm.export as
standalone ONNX files that onnxruntime, Triton Inference Server or any ONNX runtime runs
without JAX or this package.

checkpoint -> the same functions as the jax format (`Engine.prefill_fn` / `decode_fn`, or
`lm.finetune.encoder_function`), their parameters closed over, so that jax2onnx embeds the
weights -> OUT/*.onnx, export.json, the tokenizer file, and a Triton model repository:

    prefill.onnx   tokens [B, P] int32, lengths [B] int32 -> logits [B, V] float32 (each row's
                   last prompt token), present_k_0 .. present_k_{L-1}, present_v_0 .. (each
                   [B, K, S, H] float32, S = max_len: the cache `Engine.prefill_fn` returns)
    decode.onnx    tokens [B], positions [B], past_k_0 .., past_v_0 .. -> logits [B, V],
                   present_k_0 .., present_v_0 .. (`Engine.decode_fn`: one token per row; the
                   caller feeds each present_* back as the next step's past_*)
    encoder.onnx   tokens [B, T], token_types [B, T], lengths [B] -> pooled [B, D] and probs
                   [B, C] (classify) or start / end [B, T] (span)
    triton/<model>/config.pbtxt, triton/<model>/1/model.onnx   (docs/serving.md)

B, P and T are dynamic. The export computes in float32 (a bfloat16 / float16 checkpoint is
cast up), as onnxruntime's CPU kernels do.

What jax2onnx (0.13) is not handed, and why; none changes the model's arithmetic:
- call-like primitives (jit, `jax.checkpoint`, the steering custom VJPs, `checkpoint_name`)
  are inlined (`_inlined`): its remat lowering reuses one inner graph for two calls of the same
  checkpointed function (`_norm`) and fails;
- `jnp.arange` of a dynamic size is traced as plain `iota`: jax2onnx's own replacement gives a
  dimension that cannot broadcast against the input's symbolic ones;
- the KV cache update is a one-hot select instead of a scatter (`_write_cache_by_select`): the
  values written are the same, but jax2onnx's scatter lowering leaves a cached constant that a
  later broadcast picks up, and onnxruntime then fails on a Reshape;
- the encoder's layers run unrolled (`model.scan_layers` False): no ONNX Loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from lm.config import ConfigError

PREFILL, DECODE, ENCODER = "prefill.onnx", "decode.onnx", "encoder.onnx"
META = "export.json"
TRITON = "triton"
# ONNX opset: jax2onnx writes ReduceMean with its axes as an input (opset 18) and GELU as the
# Gelu op (opset 20); 21 runs on onnxruntime >= 1.20 (Triton 24.12 and later).
OPSET = 21
# Primitives whose sub-jaxpr `_inlined` evaluates in place of the call.
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
                    "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_jvp_call"})
_ONNX_TO_TRITON = {"tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64",
                   "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16",
                   "tensor(bfloat16)": "TYPE_BF16", "tensor(bool)": "TYPE_BOOL"}


# ---------------------------------------------------------------------------------------------
# Tracing for jax2onnx


def _sub_jaxpr(eqn) -> tuple:
    """(jaxpr, consts) that a call-like equation runs."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            j = eqn.params[key]
            return (j.jaxpr, j.consts) if hasattr(j, "consts") else (j, [])
    raise NotImplementedError(f"{eqn.primitive.name}: no sub-jaxpr among {list(eqn.params)}")


def _eval_inlined(jaxpr, consts, *args) -> list:
    """`jaxpr` evaluated by binding its primitives again, call-like ones replaced by their
    bodies (so each call gets fresh values) and `checkpoint_name` dropped (an identity)."""
    env = {}
    read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]  # noqa: E731
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _CALLS:
            body, body_consts = _sub_jaxpr(eqn)
            outs = _eval_inlined(body, body_consts, *invals)
        elif name == "name":
            outs = invals
        else:
            outs = eqn.primitive.bind(*invals, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


@contextlib.contextmanager
def _plain_arange():
    """jnp.arange as jax defines it (iota), while jax2onnx has replaced it."""
    from jax2onnx.plugins.jax.numpy import arange as j2o_arange
    patched = jnp.arange
    jnp.arange = j2o_arange._JNP_ARANGE_ORIG
    try:
        yield
    finally:
        jnp.arange = patched


def _write_cache_by_select(cache_bksh, positions_bt, new_btkh):
    """`lm.model.write_cache` without a scatter: the new keys (or values) [B, T, K, H] at
    `positions_bt`, the rest of the cache [B, K, S, H] as it was. A one-hot [B, T, S]
    contraction moves each new row to its position (x * 1 + 0s: exact), a select keeps it."""
    from lm.quantize import Int8Array
    if isinstance(cache_bksh, Int8Array):
        raise ConfigError("the ONNX export keeps a float32 KV cache; an int8 cache is not "
                          "supported")
    s = cache_bksh.shape[2]
    onehot_bts = positions_bt[:, :, None] == jnp.arange(s)[None, None, :]
    moved_bksh = jnp.einsum("bts,btkh->bksh", onehot_bts.astype(cache_bksh.dtype),
                            new_btkh.astype(cache_bksh.dtype))
    written_bs = jnp.any(onehot_bts, axis=1)
    return jnp.where(written_bs[:, None, :, None], moved_bksh, cache_bksh)


@contextlib.contextmanager
def _export_tracing():
    """The model's functions as the export traces them (module docstring)."""
    from lm import model
    original = model.write_cache
    model.write_cache = _write_cache_by_select
    try:
        with _plain_arange():
            yield
    finally:
        model.write_cache = original


def _inlined(fn):
    """`fn` of arrays -> flat tuple of arrays, traced under `_export_tracing` and re-bound by
    `_eval_inlined`: what jax2onnx is given."""
    def traced(*args):
        with _export_tracing():
            closed = jax.make_jaxpr(fn)(*args)
        return tuple(_eval_inlined(closed.jaxpr, closed.consts, *args))
    return traced


def _convert(fn, inputs: list, input_names: list[str], output_names: list[str], path):
    """Writes `fn` (its weights closed over) as the ONNX file `path`; returns the model."""
    import jax2onnx
    import onnx
    # jax2onnx logs a warning for each of its optional plugins (dm_pix) that fails to import.
    # onnx_ir warns for each untyped shape constant it writes.
    for name in ("jax2onnx", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with jax.default_device(jax.devices("cpu")[0]):
        model = jax2onnx.to_onnx(_inlined(fn), inputs, model_name=pathlib.Path(path).stem,
                                 opset=OPSET, input_names=input_names,
                                 output_names=output_names)
    onnx.save(model, str(path))
    return model


def _io(model) -> dict:
    """{"inputs": [...], "outputs": [...]} of an ONNX model: name, dtype ('tensor(float)'...)
    and shape (ints, or names for the dynamic dims)."""
    import onnx

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            out.append({"name": v.name,
                        "dtype": onnx.helper.tensor_dtype_to_string(t.elem_type)
                        .replace("TensorProto.", "").lower(),
                        "shape": [d.dim_param or d.dim_value for d in t.shape.dim]})
        return out
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


# ---------------------------------------------------------------------------------------------
# The functions exported


def _float32(graphdef, params):
    """The model in float32 (parameters and compute), as the export runs it."""
    from flax import nnx

    from lm.config import PrecisionConfig
    from lm.model import abstract_model
    model = nnx.merge(graphdef, params)
    if (model.precision.param_dtype, model.precision.compute_dtype) == ("float32", "float32"):
        return graphdef, params
    graphdef, _ = abstract_model(model.cfg, PrecisionConfig(), model.task)
    cast = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa
    return graphdef, jax.tree.map(cast, params)


def cache_names(num_layers: int, prefix: str) -> list[str]:
    """`prefix`_k_0 .. _k_{L-1}, then `prefix`_v_0 ..: the cache as the ONNX files name it
    (prefix 'past' for decode's inputs, 'present' for outputs)."""
    return [f"{prefix}_{kv}_{i}" for kv in "kv" for i in range(num_layers)]


def export_decoder(checkpoint: str, out: str) -> dict:
    """prefill.onnx and decode.onnx of a decoder checkpoint (module docstring)."""
    from lm.generate import Engine
    engine = Engine.from_checkpoint(checkpoint)
    engine = Engine(*_float32(engine.graphdef, engine.params), engine.tokenizer,
                    cache_dtype="float32")
    cfg, params = engine.cfg, engine.params
    layers = cfg.num_layers

    def prefill(tokens_bp, lengths_b):
        logits_bv, cache = engine.prefill_fn(params, tokens_bp, lengths_b)
        return (logits_bv, *cache["k"], *cache["v"])

    def decode(tokens_b, positions_b, *cache):
        logits_bv, cache = engine.decode_fn(params, tokens_b, positions_b,
                                            {"k": cache[:layers], "v": cache[layers:]})
        return (logits_bv, *cache["k"], *cache["v"])

    b, p = jax.export.symbolic_shape("B, P")
    int32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    kv = [jax.ShapeDtypeStruct((b, cfg.num_kv_heads, cfg.max_len, cfg.head_dim), jnp.float32)
          ] * (2 * layers)
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    present = ["logits"] + cache_names(layers, "present")
    models = {
        "prefill": _convert(prefill, [int32(b, p), int32(b)], ["tokens", "lengths"], present,
                            out_dir / PREFILL),
        "decode": _convert(decode, [int32(b), int32(b), *kv],
                           ["tokens", "positions"] + cache_names(layers, "past"), present,
                           out_dir / DECODE)}
    meta = {"format": "onnx", "kind": "decoder", "opset": OPSET, "dtype": "float32",
            "files": {"prefill": PREFILL, "decode": DECODE},
            "max_len": cfg.max_len, "vocab_size": cfg.vocab_size, "num_layers": layers,
            "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "cache_dtype": "float32", "cache_shape": ["B", cfg.num_kv_heads, cfg.max_len,
                                                      cfg.head_dim],
            "functions": {name: _io(m) for name, m in models.items()},
            "tokenizer": engine.tokenizer.save(out) if engine.tokenizer is not None else None}
    meta["triton"] = write_triton(out_dir, meta)
    (out_dir / META).write_text(json.dumps(meta, indent=1))
    return meta


ENCODER_OUTPUTS = {"classify": ("pooled", "probs"), "span": ("pooled", "start", "end"),
                   "mlm": ("pooled",), "mlm_nsp": ("pooled",)}


def export_encoder(checkpoint: str, out: str) -> dict:
    """encoder.onnx of an encoder or fine-tuned head (module docstring)."""
    from lm.finetune import encoder_function
    from lm.predict import load_checkpoint
    run, params, tok = load_checkpoint(checkpoint)
    from lm.config import PrecisionConfig
    from lm.model import abstract_model
    graphdef, params = _float32(abstract_model(run.model, run.precision, run.task)[0], params)
    run = dataclasses.replace(run, model=dataclasses.replace(run.model, scan_layers=False),
                              precision=PrecisionConfig())
    fn, names = encoder_function(run), ENCODER_OUTPUTS[run.task.name]

    def encoder(tokens_bt, types_bt, lengths_b):
        got = fn(params, tokens_bt, types_bt, lengths_b)
        return tuple(got[n] for n in names)

    b, t = jax.export.symbolic_shape("B, T")
    int32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _convert(encoder, [int32(b, t), int32(b, t), int32(b)],
                     ["tokens", "token_types", "lengths"], list(names), out_dir / ENCODER)
    meta = {"format": "onnx", "kind": "encoder", "opset": OPSET, "dtype": "float32",
            "files": {"encoder": ENCODER}, "task": run.task.name,
            "labels": run.task.label_list, "max_len": run.model.max_len,
            "seq_len": run.train.seq_len, "d_model": run.model.d_model,
            "functions": {"encoder": _io(model)},
            "tokenizer": tok.save(out) if tok is not None else None}
    meta["triton"] = write_triton(out_dir, meta)
    (out_dir / META).write_text(json.dumps(meta, indent=1))
    return meta


def export(checkpoint: str, out: str) -> dict:
    """The ONNX files of `checkpoint` (module docstring) in `out`; returns export.json's facts."""
    try:
        import jax2onnx  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--format onnx needs jax2onnx and onnx ({e}); install them with "
                          "`pip install -e '.[dev]'`") from e
    from lm.checkpoint import checkpoint_config
    from lm.export import _is_encoder
    saved, _ = checkpoint_config(checkpoint)
    if (saved or {}).get("model", {}).get("quantized", "none") != "none":
        # jax2onnx writes an int8 Einsum, which onnxruntime has no kernel for (MatMulInteger /
        # QDQ nodes would be needed).
        raise ConfigError(f"{checkpoint} is an int8 checkpoint (lm.quantize): --format onnx "
                          "exports float checkpoints only; export its float checkpoint, or "
                          "this one with --format jax")
    return (export_encoder if _is_encoder(checkpoint) else export_decoder)(checkpoint, out)


# ---------------------------------------------------------------------------------------------
# Triton Inference Server


def _dims(shape, batched: bool) -> str:
    dims = [d if isinstance(d, int) else -1 for d in shape][1 if batched else 0:]
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _onnx_dtype_to_triton(dtype: str) -> str:
    key = dtype if dtype.startswith("tensor(") else \
        {"int32": "tensor(int32)", "int64": "tensor(int64)", "float": "tensor(float)",
         "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)", "bool": "tensor(bool)"
         }.get(dtype, dtype)
    return _ONNX_TO_TRITON[key]


def triton_config(name: str, io: dict, max_batch_size: int, comment: str) -> str:
    """A Triton config.pbtxt for the ONNX model `name` whose inputs and outputs are `io`
    (`_io`). max_batch_size > 0: Triton batches requests along the first dimension, which the
    dims then leave out (a [B] tensor becomes dims [ 1 ] reshaped to [ ])."""
    batched = max_batch_size > 0
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f'name: "{name}"', 'platform: "onnxruntime_onnx"',
              f"max_batch_size: {max_batch_size}"]
    for kind in ("input", "output"):
        entries = []
        for v in io[f"{kind}s"]:
            one_dim = batched and len(v["shape"]) == 1
            entry = (f'  {{\n    name: "{v["name"]}"\n'
                     f'    data_type: {_onnx_dtype_to_triton(v["dtype"])}\n'
                     f'    dims: {"[ 1 ]" if one_dim else _dims(v["shape"], batched)}\n')
            if one_dim:
                entry += "    reshape: { shape: [ ] }\n"
            entries.append(entry + "  }")
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    if batched:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


TRITON_NOTES = {
    "encoder": "lm encoder export: stateless, so Triton's dynamic batcher merges requests along\n"
               "the batch dimension (requests of one batch must share the sequence length T:\n"
               "pad to a few buckets client-side, as lm.predict does).",
    "prefill": "lm prefill: one client request is a batch of right-padded prompts [B, P];\n"
               "rows of different P cannot be merged, so Triton does not batch (max_batch_size\n"
               "0). Its present_* outputs are the KV cache the client passes to `decode`.",
    "decode": "lm decode step: stateless on the server, the client holds the KV cache and\n"
              "sends it back as past_* each step (the present_* outputs). Triton's sequence\n"
              "batcher with implicit state could keep it server-side instead; that needs a\n"
              "graph that reads START/READY controls, which this export does not have.",
}


def write_triton(out_dir: pathlib.Path, meta: dict) -> dict:
    """OUT/triton/<model>/config.pbtxt and 1/model.onnx for each exported function; returns
    {model name: its directory, relative to OUT}."""
    models = {}
    for name, file in meta["files"].items():
        model_dir = out_dir / TRITON / name
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / file, model_dir / "1" / "model.onnx")
        max_batch = 8 if name == "encoder" else 0
        (model_dir / "config.pbtxt").write_text(
            triton_config(name, meta["functions"][name], max_batch, TRITON_NOTES[name]))
        models[name] = str(model_dir.relative_to(out_dir))
    return models


# ---------------------------------------------------------------------------------------------
# Running an export (tests, bench)


def sessions(directory: str, threads: int | None = None) -> dict:
    """{function name: onnxruntime.InferenceSession} of an ONNX export directory."""
    import onnxruntime as ort
    meta = json.loads((pathlib.Path(directory) / META).read_text())
    if meta.get("format") != "onnx":
        raise ConfigError(f"{directory} is not an ONNX export (its export.json has no "
                          "format 'onnx')")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # constant folding warns about shapes it cannot fold
    if threads:
        options.intra_op_num_threads = threads
    return {name: ort.InferenceSession(str(pathlib.Path(directory) / file), options,
                                       providers=["CPUExecutionProvider"])
            for name, file in meta["files"].items()}


def empty_cache(meta: dict, batch: int) -> dict[str, np.ndarray]:
    """decode.onnx's past_* inputs for `batch` rows, all zeros (what prefill's cache is past
    its prompts)."""
    shape = (batch, *meta["cache_shape"][1:])
    return {name: np.zeros(shape, np.float32) for name in cache_names(meta["num_layers"],
                                                                       "past")}
