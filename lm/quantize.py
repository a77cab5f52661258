"""int8 weight-only quantization for generation: per output channel, symmetric.

Each matmul weight of the layers (attention q, k, v, o and the MLP's in, gate and out
projections) becomes an `Int8Array`: int8 values and one float32 scale per output channel
(max |w| / 127 over the weight's input axes). The model is unchanged: `lm.model.dense` casts
its weight to the compute dtype, which for an Int8Array is `q * scale`, done inside the
layer scan, so only one layer's weights exist in floating point at a time. Embeddings and
norms stay as they are (the input embedding is a lookup; the output head reads it too).

    engine = Engine(graphdef, quantize(params))     # python -m lm.generate --quantize int8
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

# name -> input axes of the per-layer weight (the stacked [layers, ...] axis comes first)
QUANTIZED = {"wq": 1, "wk": 1, "wv": 1, "wo": None, "wi": 1, "wg": 1}


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


def quantize_weight(w: jax.Array, input_axes: tuple[int, ...]) -> Int8Array:
    scale = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=input_axes, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)
    return Int8Array(q, scale)


def quantize(params: Any) -> Any:
    """The parameter State with the layers' matmul weights as Int8Array."""
    def visit(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "blocks" not in names:
            return leaf
        name = next((n for n in reversed(names) if n in QUANTIZED), None)
        if name is None or leaf.ndim < 3:
            return leaf
        # Stacked [layers, ...]: the attention output projection (heads, head_dim, embed)
        # contracts two axes, every other weight its first.
        parent = names[names.index(name) - 1] if names.index(name) else ""
        input_axes = (1, 2) if (name == "wo" and parent == "attn") else (1,)
        return quantize_weight(leaf, input_axes)
    return jax.tree_util.tree_map_with_path(visit, params)


def weight_bytes(params: Any) -> int:
    """Bytes of all parameters (an Int8Array counts its int8 values and scales)."""
    return sum(x.nbytes for x in jax.tree.leaves(params))
