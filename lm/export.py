"""Serving functions that run without the model's Python code: `jax.export`.

    python -m lm.export --checkpoint DIR --out DIR [--platforms cpu,cuda]

writes, into OUT:
    prefill.jaxexport   (params, tokens [b, p], lengths [b]) -> (logits [b, V] of each row's last
                        prompt token, KV cache); b and p are symbolic: any batch, any prompt length
    decode.jaxexport    (params, tokens [b], positions [b], cache) -> (logits [b, V], cache)
    params.npz          the parameters, as the flat list the functions take
    export.json         model size facts (max_len, vocab, layers, kv heads, head dim), tokenizer
    the tokenizer file (BPE `tokenizer.json`), when the run had one

`lm.export.load(OUT)` returns an `Exported` whose `prefill`, `decode_step` and `generate`
(greedy, for checks) call the deserialized functions: nothing of lm.model is imported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

PREFILL, DECODE, PARAMS, META = "prefill.jaxexport", "decode.jaxexport", "params.npz", "export.json"


def export(checkpoint: str, out: str, platforms: tuple[str, ...] | None = None) -> dict:
    from flax import nnx

    from lm.generate import Engine, decode_step, prefill
    from lm.model import init_cache
    engine = Engine.from_checkpoint(checkpoint)
    cfg = engine.cfg
    leaves, treedef = jax.tree.flatten(engine.params)
    graphdef = engine.graphdef

    def model_of(param_leaves):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, param_leaves))

    def prefill_fn(param_leaves, tokens_bp, lengths_b):
        cache = init_cache(cfg, tokens_bp.shape[0], cfg.max_len)
        return prefill(model_of(param_leaves), tokens_bp, lengths_b, cache)

    def decode_fn(param_leaves, tokens_b, positions_b, cache):
        return decode_step(model_of(param_leaves), tokens_b, positions_b, cache)

    b, p = jax.export.symbolic_shape("b, p")
    abstract_leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    cache_shape = (cfg.num_layers, b, cfg.max_len, cfg.num_kv_heads, cfg.head_dim)
    cache = {k: jax.ShapeDtypeStruct(cache_shape, jnp.dtype(cfg.compute_dtype)) for k in "kv"}
    kwargs = {"platforms": platforms} if platforms else {}
    exported_prefill = jax.export.export(jax.jit(prefill_fn), **kwargs)(
        abstract_leaves, jax.ShapeDtypeStruct((b, p), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32))
    exported_decode = jax.export.export(jax.jit(decode_fn), **kwargs)(
        abstract_leaves, jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32), cache)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, PREFILL), "wb") as f:
        f.write(exported_prefill.serialize())
    with open(os.path.join(out, DECODE), "wb") as f:
        f.write(exported_decode.serialize())
    np.savez(os.path.join(out, PARAMS), *[np.asarray(x) for x in leaves])
    meta = {"max_len": cfg.max_len, "vocab_size": cfg.vocab_size, "num_layers": cfg.num_layers,
            "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "cache_dtype": cfg.compute_dtype, "platforms": list(exported_prefill.platforms),
            "tokenizer": engine.tokenizer.save(out) if engine.tokenizer is not None else None}
    with open(os.path.join(out, META), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


class Exported:
    """The deserialized serving functions of an export directory."""

    def __init__(self, directory: str):
        with open(os.path.join(directory, META)) as f:
            self.meta = json.load(f)
        with open(os.path.join(directory, PREFILL), "rb") as f:
            self._prefill = jax.export.deserialize(f.read())
        with open(os.path.join(directory, DECODE), "rb") as f:
            self._decode = jax.export.deserialize(f.read())
        with np.load(os.path.join(directory, PARAMS)) as z:
            self.params = [jnp.asarray(z[f"arr_{i}"]) for i in range(len(z.files))]
        self.tokenizer = None
        if self.meta.get("tokenizer") is not None:
            from lm.data import tokenizer as tokenizers
            self.tokenizer = tokenizers.load(self.meta["tokenizer"], directory)
        self.max_len = self.meta["max_len"]

    def prefill(self, tokens_bp, lengths_b):
        return self._prefill.call(self.params, jnp.asarray(tokens_bp, jnp.int32),
                                  jnp.asarray(lengths_b, jnp.int32))

    def decode_step(self, tokens_b, positions_b, cache):
        return self._decode.call(self.params, jnp.asarray(tokens_b, jnp.int32),
                                 jnp.asarray(positions_b, jnp.int32), cache)

    def slots(self, num_slots: int):
        """`num_slots` decode rows for continuous batching (`lm.generate.DecodeSlots`; this
        imports lm.generate, but builds no model)."""
        from lm.generate import DecodeSlots
        m = self.meta
        shape = (m["num_layers"], num_slots, m["max_len"], m["num_kv_heads"], m["head_dim"])
        return DecodeSlots(lambda params, t, n: self._prefill.call(params, t, n),
                           lambda params, t, pos, c: self._decode.call(params, t, pos, c),
                           self.params,
                           lambda: {k: jnp.zeros(shape, m["cache_dtype"]) for k in "kv"})

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt (a host loop over `decode_step`)."""
        lengths = np.array([len(x) for x in prompts], np.int32)
        if (lengths + max_new_tokens > self.max_len).any():
            raise ValueError(f"prompt + max_new_tokens exceed the context ({self.max_len})")
        tokens = np.zeros((len(prompts), lengths.max()), np.int32)
        for i, ids in enumerate(prompts):
            tokens[i, :len(ids)] = ids
        logits, cache = self.prefill(tokens, lengths)
        out = []
        for step in range(max_new_tokens):
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            out.append(np.asarray(nxt))
            logits, cache = self.decode_step(nxt, jnp.asarray(lengths + step), cache)
        return np.stack(out, axis=1).tolist()


def load(directory: str) -> Exported:
    return Exported(directory)


def main(argv: list[str] | None = None) -> None:
    from lm.config import ConfigError
    p = argparse.ArgumentParser(prog="python -m lm.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a training workdir (its latest checkpoint) or one checkpoint dir")
    p.add_argument("--out", required=True)
    p.add_argument("--platforms", help="comma-separated, e.g. cpu,cuda (default: this backend)")
    args = p.parse_args(argv)
    try:
        meta = export(args.checkpoint, args.out,
                      tuple(args.platforms.split(",")) if args.platforms else None)
    except ConfigError as e:
        print(f"lm.export: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported prefill and decode step ({', '.join(meta['platforms'])}) to {args.out}")


if __name__ == "__main__":
    main()
