"""int8 for inference: weight-only (the memory option) and calibrated weights + activations.

Both act on the layer matmuls only (attention q, k, v, o and the MLP's in, gate and out
projections, fused or not); embeddings, norms, the output head and BERT's heads stay in
floating point, and so do attention's q.k and p.v products (their operands change with every
token; TensorRT keeps them in fp16 too).

Weight-only (`quantize`, `lm.generate --quantize int8`): each weight becomes an `Int8Array`,
int8 values and one float32 scale per output channel (max |w| / 127 over its input axes). The
model casts it back (`q * scale`) inside the layer scan before the matmul: a quarter of the
float32 bytes, not faster.

Weights + activations (`python -m lm.quantize`, TensorRT's post-training recipe): the float
model runs over a calibration set while `Observed` weights record each matmul input's |x|
(pass 1: the maximum; pass 2: a 2,048-bin histogram up to it), one figure per layer and
matmul. `amax` turns them into a clipping threshold by `--method`: `max`, `percentile` (of |x|)
or `entropy` (TensorRT's calibration: the threshold whose 128-level quantization of the
histogram has the least KL divergence from it). Each weight becomes an `Int8Matmul`: int8
values, per-output-channel scales and the static activation scale amax / 127; the layer
computes round(x / x_scale) as int8, int8 x int8 -> int32 on the matmul unit, then one float
multiply by x_scale * w_scale. The result is a checkpoint with `model.quantized = 'int8'` that
`lm.generate`, `lm.serve`, `lm.predict` and `lm.export` load like any other:

    python -m lm.quantize --checkpoint runs/x --calibrate data/mine --method entropy --out runs/x8
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import ConfigError

# Layer matmul weights (stacked [layers, ...]); every one contracts its input axis 1 but the
# attention output projection [layers, heads, head_dim, embed], which contracts (1, 2).
LAYER_MATMULS = frozenset({"wq", "wk", "wv", "wo", "wi", "wg", "wqkv", "wgi"})
METHODS = ("max", "percentile", "entropy")
BINS, LEVELS = 2048, 128  # histogram bins; int8's positive levels for |x| (TensorRT's 128)
REPORT = "quantization.json"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Array:
    q: jax.Array  # int8, the weight's shape
    scale: jax.Array  # float32, 1 on the input axes

    def astype(self, dtype) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)

    def __getitem__(self, index):  # nnx.Param's `w[...]`
        if index is Ellipsis:
            return self
        return Int8Array(self.q[index], self.scale[index])

    @property
    def shape(self):
        return self.q.shape

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Matmul(Int8Array):
    """A weight for int8 x int8 -> int32 matmuls: `Int8Array`'s values and per-output-channel
    scales plus the calibrated scale of its input activation (one per layer: [layers] when
    stacked, a scalar in a layer)."""
    x_scale: jax.Array = None  # float32

    def __getitem__(self, index):
        if index is Ellipsis:
            return self
        return Int8Matmul(self.q[index], self.scale[index], self.x_scale[index])

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.x_scale.nbytes

    def matmul(self, x, n_in: int):
        """x @ w contracting x's last `n_in` axes with w's first, in int8 (static x_scale;
        |x| beyond 127 x_scale is clipped), returned in x's dtype."""
        x_q = jnp.clip(jnp.round(x.astype(jnp.float32) / self.x_scale), -127, 127
                       ).astype(jnp.int8)
        dims = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        acc = jax.lax.dot_general(x_q, self.q, (dims, ((), ())),
                                  preferred_element_type=jnp.int32)
        out_scale = self.scale.reshape(self.q.shape[n_in:]) * self.x_scale
        return (acc.astype(jnp.float32) * out_scale).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Observed:
    """A layer weight that reports its matmul input to `recorder` (calibration): site ids and
    histogram ranges are [layers] arrays, so that the layer scan slices them with the weight."""
    w: jax.Array
    site: jax.Array  # int32
    hist_max: jax.Array  # float32; the histogram's range (pass 2)
    recorder: Callable = dataclasses.field(default=None)
    histogram: bool = False

    def __getitem__(self, index):
        if index is Ellipsis:
            return self
        return dataclasses.replace(self, w=self.w[index], site=self.site[index],
                                   hist_max=self.hist_max[index])

    def astype(self, dtype):
        return self.w.astype(dtype)

    def record(self, x) -> None:
        a = jnp.abs(x.astype(jnp.float32)).reshape(-1)
        hist = None
        if self.histogram:
            top = jnp.where(self.hist_max > 0, self.hist_max, 1.0)
            bins = jnp.clip(jnp.floor(a / top * BINS), 0, BINS - 1).astype(jnp.int32)
            hist = jnp.bincount(bins, length=BINS)
        jax.debug.callback(self.recorder, self.site, jnp.max(a), hist)


jax.tree_util.register_dataclass(Observed, data_fields=["w", "site", "hist_max"],
                                 meta_fields=["recorder", "histogram"])
_ANY = (Int8Array, Observed)  # leaves of the trees below (Int8Matmul is an Int8Array)


def quantize_weight(w: jax.Array, input_axes: tuple[int, ...]) -> Int8Array:
    scale = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=input_axes, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)
    return Int8Array(q, scale)


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def layer_matmul(path) -> tuple[str, tuple[int, ...]] | None:
    """(the weight's path 'blocks/attn/wq', its input axes) for a stacked layer matmul weight,
    else None."""
    names = _names(path)
    if "blocks" not in names:
        return None
    i = max((j for j, n in enumerate(names) if n in LAYER_MATMULS), default=None)
    if i is None:
        return None
    input_axes = (1, 2) if (names[i] == "wo" and i and names[i - 1] == "attn") else (1,)
    return "/".join(names[:i + 1]), input_axes


def map_matmuls(params: Any, fn: Callable[[str, Any, tuple[int, ...]], Any]) -> Any:
    """`params` with each stacked layer matmul weight w replaced by fn(path, w, input axes)."""
    def visit(path, leaf):
        found = None if isinstance(leaf, _ANY) else layer_matmul(path)
        return leaf if found is None else fn(found[0], leaf, found[1])
    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: isinstance(x, _ANY))


def matmul_paths(params: Any) -> list[str]:
    found = []
    map_matmuls(params, lambda path, w, _: found.append(path) or w)
    return found


def quantize(params: Any) -> Any:
    """The parameter State with the layers' matmul weights as Int8Array (weight-only int8)."""
    return map_matmuls(params, lambda _, w, axes: quantize_weight(w, axes))


def weight_bytes(params: Any) -> int:
    """Bytes of all parameters (an Int8Array counts its int8 values and scales)."""
    return sum(x.nbytes for x in jax.tree.leaves(params))


# -- calibration -----------------------------------------------------------------------------


class Recorder:
    """Host side of `Observed`: per site, the largest |x| and the summed histogram."""

    def __init__(self):
        self.amax: dict[int, float] = {}
        self.hist: dict[int, np.ndarray] = {}

    def __call__(self, site, amax, hist) -> None:
        site = int(site)
        self.amax[site] = max(self.amax.get(site, 0.0), float(amax))
        if hist is not None:
            self.hist[site] = self.hist.get(site, 0) + np.asarray(hist, np.int64)


def observe(params: Any, recorder: Recorder, hist_max: dict[str, np.ndarray] | None = None
            ) -> tuple[Any, list[str]]:
    """(params with every layer matmul weight `Observed`, the weights' paths: site = index in
    that list x layers + layer). `hist_max` (path -> [layers]): histograms up to it."""
    paths = matmul_paths(params)

    def wrap(path, w, _):
        layers = w.shape[0]
        top = np.zeros(layers, np.float32) if hist_max is None else hist_max[path]
        return Observed(w, jnp.arange(layers, dtype=jnp.int32) + paths.index(path) * layers,
                        jnp.asarray(top, jnp.float32), recorder, hist_max is not None)
    return map_matmuls(params, wrap), paths


def calibrate(forward: Callable[[Any, np.ndarray], Any], params: Any,
              batches: list[np.ndarray], method: str, percentile: float = 99.99
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the clipping threshold of each layer matmul's input, path -> [layers]; the observed
    maxima, the same way). `forward(params, tokens_bt)` runs the float model's layers."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    run = jax.jit(forward)
    recorder = Recorder()
    observed, paths = observe(params, recorder)
    for batch in batches:
        run(observed, batch)
    jax.effects_barrier()  # the recorder's callbacks have all run
    layers = {p: leaf.shape[0] for p, leaf in zip(paths, _weights(params, paths))}
    by_path = lambda per_site: {p: np.array([per_site(i * layers[p] + l) for l in range(
        layers[p])], np.float32) for i, p in enumerate(paths)}
    maxima = by_path(lambda s: recorder.amax[s])
    if method == "max":
        return maxima, maxima
    recorder = Recorder()
    observed, _ = observe(params, recorder, maxima)
    for batch in batches:
        run(observed, batch)
    jax.effects_barrier()  # the recorder's callbacks have all run
    threshold = (lambda h, top: percentile_amax(h, top, percentile)) if method == "percentile" \
        else entropy_amax
    return by_path(lambda s: threshold(recorder.hist[s], recorder.amax[s])), maxima


def _weights(params: Any, paths: list[str]) -> list[Any]:
    found = {}
    map_matmuls(params, lambda path, w, _: found.setdefault(path, w))
    return [found[p] for p in paths]


def percentile_amax(hist: np.ndarray, top: float, percentile: float) -> float:
    """The |x| below which `percentile` % of the histogram's values lie (a bin's upper edge)."""
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    return float(min(np.searchsorted(cdf, percentile / 100.0) + 1, len(hist)) * top / len(hist))


def entropy_amax(hist: np.ndarray, top: float, levels: int = LEVELS) -> float:
    """TensorRT's entropy calibration: over thresholds of `levels`..len(hist) bins, the one
    whose reference distribution (the bins below it, the outliers folded into its last bin)
    is closest in KL divergence to that same range quantized into `levels` levels (each level's
    count spread over its non-empty bins)."""
    hist = np.asarray(hist, np.float64)
    if hist.sum() == 0:
        return top
    best, best_i = np.inf, len(hist)
    for i in range(levels, len(hist) + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        src = hist[:i]
        starts = np.linspace(0, i, levels + 1).astype(np.int64)[:-1]
        nonzero = src > 0
        sums, counts = np.add.reduceat(src, starts), np.add.reduceat(nonzero, starts)
        widths = np.diff(np.append(starts, i))
        q = np.repeat(np.divide(sums, counts, out=np.zeros(levels), where=counts > 0),
                      widths) * nonzero
        kl = _kl(p, q)
        if kl < best:
            best, best_i = kl, i
    return float(best_i * top / len(hist))


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / max(q.sum(), 1e-30)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


# -- the int8 model --------------------------------------------------------------------------


def quantize_static(params: Any, amax: dict[str, np.ndarray]) -> Any:
    """The parameter State with each layer matmul weight an `Int8Matmul` whose activation
    scale is amax[path] / 127 (per layer)."""
    def to_int8(path, w, axes):
        x_scale = jnp.maximum(jnp.asarray(amax[path], jnp.float32), 1e-30) / 127.0
        weight = quantize_weight(w, axes)
        return Int8Matmul(weight.q, weight.scale, x_scale)
    return map_matmuls(params, to_int8)


def abstract_int8(abstract: Any) -> Any:
    """`quantize_static`'s output as shapes, dtypes and shardings, for restoring an int8
    checkpoint: the values sharded as the float weight was, the scales along its output axes,
    the activation scales along the layers."""
    def shaped(path, w, axes):
        scale_shape = tuple(1 if i in axes else d for i, d in enumerate(w.shape))
        s = getattr(w, "sharding", None)
        return Int8Matmul(jax.ShapeDtypeStruct(w.shape, jnp.int8, sharding=s),
                          jax.ShapeDtypeStruct(scale_shape, jnp.float32,
                                               sharding=_keep(s, w.ndim, set(range(w.ndim)) - set(axes))),
                          jax.ShapeDtypeStruct(w.shape[:1], jnp.float32, sharding=_keep(s, w.ndim, {0})))
    return map_matmuls(abstract, shaped)


def _keep(sharding, ndim: int, axes: set[int]):
    """`sharding` split along `axes` only (a NamedSharding's other entries replicated), on an
    array of the same rank, or of rank 1 when `axes` is {0}."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    if axes == {0}:
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0]))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
        *(s if i in axes else None for i, s in enumerate(spec))))


def for_model(model_cfg, abstract: Any) -> Any:
    """The abstract parameters a checkpoint of `model_cfg` stores (int8 when
    model.quantized says so)."""
    return abstract_int8(abstract) if model_cfg.quantized == "int8" else abstract


# -- calibration data and the command line ---------------------------------------------------


def calibration_batches(source: list[str], tokenizer, seq_len: int, samples: int,
                        batch_size: int, text_field: str = "text") -> list[np.ndarray]:
    """Up to `samples` windows of `seq_len` tokens, in batches: from a prepared data directory
    (its train split) or from text / JSONL files (and their .gz; JSONL: `text_field`),
    documents joined end to end."""
    if len(source) == 1 and os.path.isfile(os.path.join(source[0], "manifest.json")):
        from lm.data.dataset import Dataset
        stream = Dataset(source[0]).split("train")  # the val split stays held out
        tokens = np.asarray(stream.read(0, min(len(stream), samples * seq_len)), np.int32)
    else:
        tokens = np.concatenate([tokenizer.encode(t) for t in _texts(source, text_field)]
                                or [np.zeros(0, np.int32)]).astype(np.int32)
    windows = len(tokens) // seq_len
    if windows == 0:
        raise ConfigError(f"--calibrate {' '.join(source)}: {len(tokens)} tokens, fewer than one "
                          f"window of --seq-len {seq_len}; give more text or a shorter --seq-len")
    rows = tokens[:min(windows, samples) * seq_len].reshape(-1, seq_len)
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def _texts(patterns: list[str], text_field: str) -> list[str]:
    files = sorted({f for p in patterns for f in (glob.glob(p) or [p])})
    texts = []
    for path in files:
        if not os.path.isfile(path):
            raise ConfigError(f"--calibrate: {path} is not a file or a prepared data directory "
                              "(expected text or JSONL files, .gz too, or a directory made by "
                              "python -m lm.data.prepare)")
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            if path.removesuffix(".gz").endswith(".jsonl"):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        texts.append(_jsonl_text(line, text_field, f"{path}:{n}"))
            else:
                texts.append(f.read())
    return texts


def _jsonl_text(line: str, field: str, where: str) -> str:
    try:
        text = json.loads(line).get(field)
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError(f"{where}: not a JSON object") from None
    if not isinstance(text, str):
        raise ConfigError(f"{where}: no string field {field!r} (--text-field)")
    return text


def quantize_checkpoint(checkpoint: str, source: list[str], out: str, method: str,
                        seq_len: int | None = None, samples: int = 64, batch_size: int = 8,
                        percentile: float = 99.99, text_field: str = "text") -> dict:
    """Calibrates `checkpoint` on `source` and writes the int8 checkpoint into `out` (a new
    workdir: step 0, the config with model.quantized = 'int8', the tokenizer and chat
    template, and REPORT); returns REPORT's contents."""
    from flax import nnx

    from lm.checkpoint import Checkpointer
    from lm.predict import load_checkpoint
    if os.path.isdir(os.path.join(out, "checkpoints")):
        raise ConfigError(f"{out} already holds checkpoints; choose a new --out")
    run, params, tok = load_checkpoint(checkpoint)
    if run.model.quantized != "none":
        raise ConfigError(f"{checkpoint} is already quantized (model.quantized = "
                          f"{run.model.quantized!r}); calibrate its float checkpoint")
    if tok is None and not (len(source) == 1 and os.path.isdir(source[0])):
        raise ConfigError(f"{checkpoint} has no tokenizer to read text with; give a prepared "
                          "data directory as --calibrate")
    seq_len = seq_len or run.train.seq_len
    if seq_len > run.model.max_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's max_len {run.model.max_len}")
    batches = calibration_batches(source, tok, seq_len, samples, batch_size, text_field)
    from lm.model import abstract_model
    graphdef, _ = abstract_model(run.model, run.precision, run.task)
    forward = lambda p, tokens: nnx.merge(graphdef, p).hidden(tokens)
    amax, maxima = calibrate(forward, params, batches, method, percentile)
    qparams = quantize_static(params, amax)
    config = run.to_dict()
    config["model"]["quantized"] = "int8"
    os.makedirs(out, exist_ok=True)
    ckpt = Checkpointer(out, async_save=False)
    ckpt.save(0, {"params": qparams}, None, config)
    ckpt.wait()
    ckpt.close()
    _carry_tokenizer(checkpoint, tok, out)
    report = {"method": method, "percentile": percentile if method == "percentile" else None,
              "calibration_tokens": int(sum(b.size for b in batches)), "seq_len": seq_len,
              "int8": sorted(amax), "float": FLOAT_PARTS,
              "amax": {p: v.tolist() for p, v in amax.items()},
              "observed_max": {p: v.tolist() for p, v in maxima.items()},
              "bytes": {"float": weight_bytes(params), "int8": weight_bytes(qparams)}}
    with open(os.path.join(out, REPORT), "w") as f:
        json.dump(report, f, indent=1)
    return report


FLOAT_PARTS = ["embeddings", "norms", "biases", "output head", "attention q.k and p.v",
               "BERT's pooler, masked-LM and fine-tuning heads"]


def _carry_tokenizer(checkpoint: str, tok, out: str) -> None:
    from lm.chat import ChatTemplate
    from lm.checkpoint import checkpoint_config
    from lm.data.tokenizer import DATA_FILE
    if tok is not None:
        with open(os.path.join(out, DATA_FILE), "w") as f:
            json.dump({"tokenizer": tok.save(out), "quantized_from": os.path.abspath(checkpoint)},
                      f, indent=1)
    _, workdir = checkpoint_config(checkpoint)
    chat = ChatTemplate.from_directory(workdir)
    if chat is not None:
        chat.save(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lm.quantize", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a float checkpoint (workdir or step dir)")
    p.add_argument("--calibrate", required=True, nargs="+", metavar="DATA",
                   help="text or JSONL files (globs, .gz too) or a prepared data directory")
    p.add_argument("--method", choices=METHODS, default="entropy")
    p.add_argument("--out", required=True, help="a new workdir for the int8 checkpoint")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: train.seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--percentile", type=float, default=99.99, help="for --method percentile")
    p.add_argument("--text-field", default="text", help="the JSONL field holding the text")
    args = p.parse_args(argv)
    if not 0 < args.percentile <= 100:
        p.error(f"--percentile {args.percentile}: expected a number in (0, 100]")
    if args.samples < 1 or args.batch_size < 1 or (args.seq_len is not None and args.seq_len < 2):
        p.error("--samples and --batch-size must be >= 1, --seq-len >= 2")
    try:
        report = quantize_checkpoint(args.checkpoint, args.calibrate, args.out, args.method,
                                     args.seq_len, args.samples, args.batch_size,
                                     args.percentile, args.text_field)
    except ConfigError as e:
        print(f"lm.quantize: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"int8 ({args.method}, {report['calibration_tokens']:,} calibration tokens): "
          f"{len(report['int8'])} layer matmuls, {report['bytes']['float']:,} -> "
          f"{report['bytes']['int8']:,} parameter bytes; written to {args.out}")


if __name__ == "__main__":
    # Run as lm.quantize, not __main__: lm.model checks its classes (Observed, Int8Matmul).
    from lm.quantize import main as module_main
    module_main()
