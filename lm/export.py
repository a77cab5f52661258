"""Serving functions that run without the model's Python code: `jax.export`.

    python -m lm.export --checkpoint DIR --out DIR [--platforms cpu,cuda] [--format jax|onnx]

writes, into OUT:
    prefill.jaxexport   (params, tokens [b, p], lengths [b]) -> (logits [b, V] of each row's last
                        prompt token, KV cache); b and p are symbolic: any batch, any prompt length
    decode.jaxexport    (params, tokens [b], positions [b], cache) -> (logits [b, V], cache)
    params.npz          the parameters, as the flat list the functions take
    export.json         model size facts (max_len, vocab, layers, kv heads, head dim), tokenizer
    the tokenizer file (BPE `tokenizer.json`), when the run had one

and for an encoder (model.style 'bert') or a fine-tuned head (task classify / span, any style)
instead of prefill and decode:
    encoder.jaxexport   (params, tokens [b, t], token_types [b, t], lengths [b]) -> {"pooled"
                        [b, D], "probs" [b, C] (classify) or "start" / "end" [b, t] (span)}
                        (lm.finetune.encoder_function; b and t symbolic), with export.json's
                        "task", "labels" and "seq_len" (what the head was trained on)

With `--format onnx` (default `jax`) it writes standalone ONNX files instead (prefill.onnx and
decode.onnx, or encoder.onnx, weights inside) and a Triton model repository: lm.onnx_export.

`lm.export.load(OUT)` returns an `Exported` whose `prefill` and `decode_step` call the
deserialized functions, and whose `slots` (continuous batching, `lm.generate.DecodeSlots`) and
greedy `generate` (built on them, for checks) run them: nothing of lm.model is imported.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import ConfigError
from lm.data import tokenizer as tokenizers
from lm.generate import DecodeSlots, Engine, SamplingParams
from lm.sharding import KV_CACHE_BATCH_AXIS

PREFILL, DECODE, PARAMS, META = "prefill.jaxexport", "decode.jaxexport", "params.npz", "export.json"
ENCODER = "encoder.jaxexport"
FORMATS = ("jax", "onnx")  # --format


def _is_encoder(checkpoint: str) -> bool:
    from lm.checkpoint import checkpoint_config
    saved, _ = checkpoint_config(checkpoint)
    return bool(saved) and (saved.get("model", {}).get("style") == "bert" or
                            saved.get("task", {}).get("name") in ("classify", "span"))


def export_encoder(checkpoint: str, out: str, platforms: tuple[str, ...] | None = None) -> dict:
    """Writes an encoder's or fine-tuned head's function (module docstring) into `out`."""
    from lm.finetune import encoder_function
    from lm.predict import load_checkpoint
    run, params, tok = load_checkpoint(checkpoint)
    leaves, treedef = jax.tree.flatten(params)
    fn = encoder_function(run)
    b, t = jax.export.symbolic_shape("b, t")
    int_bt, int_b = jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32)
    exported = jax.export.export(
        jax.jit(lambda flat_params, *args: fn(treedef.unflatten(flat_params), *args)),
        platforms=platforms or None)(
        [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves], int_bt, int_bt, int_b)
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ENCODER).write_bytes(exported.serialize())
    np.savez(out_dir / PARAMS, *[np.asarray(x) for x in leaves])
    meta = {"kind": "encoder", "task": run.task.name, "labels": run.task.label_list,
            "max_len": run.model.max_len, "seq_len": run.train.seq_len,
            "d_model": run.model.d_model, "platforms": list(exported.platforms),
            "tokenizer": tok.save(out) if tok is not None else None}
    (out_dir / META).write_text(json.dumps(meta, indent=1))
    return meta


def export(checkpoint: str, out: str, platforms: tuple[str, ...] | None = None) -> dict:
    """Writes the serving functions of `checkpoint` into `out`; returns export.json's facts."""
    if _is_encoder(checkpoint):
        return export_encoder(checkpoint, out, platforms)
    engine = Engine.from_checkpoint(checkpoint)
    cfg = engine.cfg
    leaves, treedef = jax.tree.flatten(engine.params)

    def flat(fn):  # the functions take the parameters as a flat list: params.npz holds no tree
        return jax.jit(lambda flat_params, *args: fn(treedef.unflatten(flat_params), *args))

    b, p = jax.export.symbolic_shape("b, p")
    abstract_leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    int_b, int_bp = jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, p), jnp.int32)
    from lm.model import init_cache
    cache = jax.eval_shape(lambda: init_cache(cfg, b, cfg.max_len, engine.cache_dtype))
    export_ = functools.partial(jax.export.export, platforms=platforms or None)
    exported_prefill = export_(flat(engine.prefill_fn))(abstract_leaves, int_bp, int_b)
    exported_decode = export_(flat(engine.decode_fn))(abstract_leaves, int_b, int_b, cache)
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PREFILL).write_bytes(exported_prefill.serialize())
    (out_dir / DECODE).write_bytes(exported_decode.serialize())
    np.savez(out_dir / PARAMS, *[np.asarray(x) for x in leaves])
    meta = {"max_len": cfg.max_len, "vocab_size": cfg.vocab_size, "num_layers": cfg.num_layers,
            "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "cache_dtype": engine.cache_dtype, "platforms": list(exported_prefill.platforms),
            "tokenizer": engine.tokenizer.save(out) if engine.tokenizer is not None else None}
    (out_dir / META).write_text(json.dumps(meta, indent=1))
    return meta


class Exported:
    """The deserialized serving functions of an export directory."""

    def __init__(self, directory: str):
        d = pathlib.Path(directory)
        self.meta = json.loads((d / META).read_text())
        if self.meta.get("kind") == "encoder":
            self._encoder = jax.export.deserialize((d / ENCODER).read_bytes())
        else:
            self._prefill = jax.export.deserialize((d / PREFILL).read_bytes())
            self._decode = jax.export.deserialize((d / DECODE).read_bytes())
        with np.load(d / PARAMS) as z:
            self.params = [jnp.asarray(z[f"arr_{i}"]) for i in range(len(z.files))]
        tok = self.meta.get("tokenizer")
        self.tokenizer = tokenizers.load(tok, directory) if tok is not None else None
        self.max_len = self.meta["max_len"]

    def encode(self, tokens_bt, types_bt, lengths_b) -> dict:
        """An encoder export's outputs (module docstring) for right-padded rows."""
        return self._encoder.call(self.params, *(jnp.asarray(x, jnp.int32) for x in (
            tokens_bt, types_bt, lengths_b)))

    def prefill(self, tokens_bp, lengths_b):
        return self._prefill.call(self.params, jnp.asarray(tokens_bp, jnp.int32),
                                  jnp.asarray(lengths_b, jnp.int32))

    def decode_step(self, tokens_b, positions_b, cache):
        return self._decode.call(self.params, jnp.asarray(tokens_b, jnp.int32),
                                 jnp.asarray(positions_b, jnp.int32), cache)

    def slots(self, num_slots: int) -> DecodeSlots:
        """`num_slots` decode rows for continuous batching (no model is built)."""
        # The cache as the exported decode function takes it (its 4th argument), num_slots rows.
        cache_tree = self._decode.in_tree.children()[0].children()[3]
        avals = self._decode.in_avals[len(self.params) + 2:]
        rows = lambda shape: tuple(num_slots if i == KV_CACHE_BATCH_AXIS else d
                                   for i, d in enumerate(shape))
        return DecodeSlots(self._prefill.call, self._decode.call, self.params,
                           lambda: jax.tree.unflatten(cache_tree, [
                               jnp.zeros(rows(a.shape), a.dtype) for a in avals]))

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt by max_new_tokens tokens (one slot each)."""
        if any(len(ids) + max_new_tokens > self.max_len for ids in prompts):
            raise ValueError(f"prompt + max_new_tokens exceed the context ({self.max_len})")
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        slots = self.slots(len(prompts))
        greedy = SamplingParams(max_new_tokens=max_new_tokens)
        out = [[slots.insert(i, ids, greedy)] for i, ids in enumerate(prompts)]
        for _ in range(max_new_tokens - 1):
            for ids, token in zip(out, slots.step().token_b):
                ids.append(int(token))
        return out


def load(directory: str) -> Exported:
    return Exported(directory)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lm.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a training workdir (its latest checkpoint) or one checkpoint dir")
    p.add_argument("--out", required=True)
    p.add_argument("--platforms", help="comma-separated, e.g. cpu,cuda (default: this backend; "
                   "--format jax only)")
    p.add_argument("--format", default="jax", choices=FORMATS,
                   help="jax: jax.export artifacts (lm.export.load runs them); onnx: standalone "
                   "ONNX files and a Triton model repository (lm.onnx_export)")
    args = p.parse_args(argv)
    if args.format == "onnx" and args.platforms:
        p.error("--platforms applies to --format jax (an ONNX file runs on any backend its "
                "runtime has)")
    try:
        if args.format == "onnx":
            from lm import onnx_export
            meta = onnx_export.export(args.checkpoint, args.out)
        else:
            meta = export(args.checkpoint, args.out,
                          tuple(args.platforms.split(",")) if args.platforms else None)
    except ConfigError as e:
        print(f"lm.export: error: {e}", file=sys.stderr)
        sys.exit(2)
    what = "the encoder" if meta.get("kind") == "encoder" else "prefill and decode step"
    where = "ONNX" if args.format == "onnx" else ", ".join(meta["platforms"])
    print(f"exported {what} ({where}) to {args.out}")


if __name__ == "__main__":
    main()
