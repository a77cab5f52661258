"""Fused projections for serving: q, k, v as one matmul weight and SwiGLU's gate and up as one.

A checkpoint trained with `model.fused_projections` False (the default) holds `wq`, `wk`, `wv`
(and gpt2's biases `bq`, `bk`, `bv`) and, llama style, `wg` and `wi`. `fuse` rewrites such a
parameter State into the fused layout that `model.fused_projections=True` builds, and `unfuse`
back; `Engine.from_checkpoint(path, fuse=True)` (`python -m lm.generate --fuse`,
`python -m lm.serve --fuse`) fuses at load time. The maths is the same, so is every logit (up
to float rounding).

    wqkv [D, K, G + 2, H]  ("embed", "kv_heads", None, "head_dim"), G = N / K query heads per
                           kv group: wqkv[:, j, :G] = wq's heads j*G .. j*G+G-1, then wk's and
                           wv's head j (Megatron's grouping: a tensor-parallel shard of kv heads
                           holds whole groups, so nothing moves between devices)
    bqkv [K, G + 2, H]     ("kv_heads", None, "head_dim"), the biases alike (gpt2)
    wgi  [D, 2, F]         ("embed", None, "mlp"): [:, 0] = wg (gate), [:, 1] = wi (up)

All stacked over the leading `layers` axis, as every block parameter is. Whether the fused
matmuls are faster, and whether XLA merges sibling matmuls by itself, is measured by
bench/fuse.py (bench/RESULTS.md).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import sharding
from lm.config import ConfigError
from lm.model import abstract_model


def fuse(graphdef, params, mesh=None, rules=sharding.RULES):
    """(graphdef, parameters) of the same model with fused projections; unchanged if they are
    fused already. With a `mesh` the new parameters are placed by `rules` (lm.sharding) from
    their logical names, as `Engine.from_checkpoint` places a checkpoint's."""
    return _convert(graphdef, params, True, mesh, rules)


def unfuse(graphdef, params, mesh=None, rules=sharding.RULES):
    """`fuse`'s inverse: separate wq, wk, wv (bq, bk, bv) and wg, wi again (e.g. to convert a
    model trained fused to Hugging Face's format with lm.convert)."""
    return _convert(graphdef, params, False, mesh, rules)


def fuse_blocks(cfg, blocks: dict) -> dict:
    """The blocks' parameters (a pure dict, arrays [..., D, N, H] etc., any leading axes) with
    wq, wk, wv -> wqkv, bq, bk, bv -> bqkv and wg, wi -> wgi."""
    attn, mlp = dict(blocks["attn"]), dict(blocks["mlp"])
    k, g = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads

    def group(q, k_, v):  # q [..., N, H], k_ and v [..., K, H] -> [..., K, G + 2, H]
        q = q.reshape(q.shape[:-2] + (k, g, q.shape[-1]))
        return jnp.concatenate([q, k_[..., None, :], v[..., None, :]], axis=-2)

    attn["wqkv"] = group(attn.pop("wq"), attn.pop("wk"), attn.pop("wv"))
    if "bq" in attn:
        attn["bqkv"] = group(attn.pop("bq"), attn.pop("bk"), attn.pop("bv"))
    if "wg" in mlp:
        mlp["wgi"] = jnp.stack([mlp.pop("wg"), mlp.pop("wi")], axis=-2)
    return {**blocks, "attn": attn, "mlp": mlp}


def unfuse_blocks(cfg, blocks: dict) -> dict:
    """`fuse_blocks`' inverse."""
    attn, mlp = dict(blocks["attn"]), dict(blocks["mlp"])
    g = cfg.num_heads // cfg.num_kv_heads

    def ungroup(qkv):  # [..., K, G + 2, H] -> q [..., N, H], k [..., K, H], v [..., K, H]
        q = qkv[..., :g, :]
        return q.reshape(q.shape[:-3] + (cfg.num_heads, q.shape[-1])), qkv[..., g, :], \
            qkv[..., g + 1, :]

    attn["wq"], attn["wk"], attn["wv"] = ungroup(attn.pop("wqkv"))
    if "bqkv" in attn:
        attn["bq"], attn["bk"], attn["bv"] = ungroup(attn.pop("bqkv"))
    if "wgi" in mlp:
        wgi = mlp.pop("wgi")
        mlp["wg"], mlp["wi"] = wgi[..., 0, :], wgi[..., 1, :]
    return {**blocks, "attn": attn, "mlp": mlp}


def _convert(graphdef, params, fused: bool, mesh, rules):
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    if cfg.fused_projections == fused:
        return graphdef, params
    new_cfg = dataclasses.replace(cfg, fused_projections=fused)
    new_graphdef, new_params = abstract_model(new_cfg, model.precision, model.task)
    pure = nnx.to_pure_dict(params)
    odd = {f"{part}/{name}": type(w).__name__ for part in ("attn", "mlp")
           for name, w in pure["blocks"][part].items()
           if not isinstance(w, (jax.Array, np.ndarray))}
    if odd:
        raise ConfigError(f"lm.fuse converts floating-point weights, not {odd}: fuse before "
                          "quantizing (an int8 checkpoint loads as it was saved)")
    convert = fuse_blocks if fused else unfuse_blocks
    out_shardings = None
    if mesh is not None:
        out_shardings = nnx.to_pure_dict(
            sharding.param_shardings(new_params, mesh, rules))["blocks"]
    pure["blocks"] = jax.jit(lambda b: convert(cfg, b), out_shardings=out_shardings)(
        pure["blocks"])
    nnx.replace_by_pure_dict(new_params, pure)
    return new_graphdef, new_params
