"""2:4 structured sparsity: NVIDIA's ASP recipe (prune a trained dense model, retrain with the
masks fixed) and the compressed storage of the pruned weights.

Every matmul weight of the layers (attention q, k, v, o; the MLP's in, gate and out; their
fused forms wqkv / wgi) keeps the 2 largest magnitudes of each group of 4 consecutive entries
along its *input* (contraction) axis: the pattern sparse tensor cores (A100 and later) run at
twice the dense rate. The stacked weights are [L, input..., output...]: attention's wo
[L, N, H, D] contracts (N, H), flattened, every other one its axis 1 (D or F). Embeddings,
norms, biases and the heads stay dense.

    masks = mask(params)          # True where kept (`True` for a weight that is not pruned)
    params = prune(params)        # the pruned weights; the rest unchanged
    small = compress(params)      # Sparse24: half the values + 2-bit positions (uint8)
    params == decompress(small)   # exactly

Training (`train.sparsity=2:4`, lm/train.py): the state is pruned once at the start and each
step masks the gradients before the optimizer (so the optimizer's moments of pruned entries
stay 0) and the updated weights after it (`constrain`). The masks are not stored: a pruned
weight's non-zeros *are* its mask (`mask` of a pruned weight returns the same positions),
because `prune` and `constrain` never leave a kept entry at exactly 0 (one that lands there is
nudged to the dtype's smallest normal number). Checkpoints are those of a dense run, and a
resumed run recovers exactly the masks it had.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lm.quantize import layer_matmul

GROUP, KEEP = 4, 2  # N:M = 2:4


def input_axes(path, leaf) -> int:
    """How many of `leaf`'s axes after the layers axis are contracted (0: not a pruned weight;
    which weights are the layer matmuls, and their input axes: lm.quantize.layer_matmul)."""
    found = layer_matmul(path) if getattr(leaf, "ndim", 0) >= 3 else None
    return 0 if found is None else len(found[1])


def _grouped(shape: tuple[int, ...], n_in: int) -> tuple[tuple[int, ...], int]:
    """(shape with the input axes split into [groups, 4], the axis of the 4). The last input
    axis alone is split where it divides (attention's wo: groups stay inside a head, and a
    sharded heads axis is not reshaped), else all input axes flattened."""
    last = n_in  # the last input axis (the layers axis is 0)
    if shape[last] % GROUP == 0:
        return shape[:last] + (shape[last] // GROUP, GROUP) + shape[last + 1:], last + 1
    k = math.prod(shape[1:1 + n_in])
    if k % GROUP:
        raise ValueError(f"2:4 sparsity: a weight of shape {shape} has {k} inputs, not a "
                         f"multiple of {GROUP}")
    return shape[:1] + (k // GROUP, GROUP) + shape[1 + n_in:], 2


def keep_mask(w: jax.Array, n_in: int) -> jax.Array:
    """bool, w's shape: the 2 largest |w| of each 4 consecutive entries along the input axes
    (the first `n_in` after the layers axis); of equal magnitudes the lower position wins."""
    shape, g = _grouped(w.shape, n_in)
    a = jnp.abs(w.astype(jnp.float32)).reshape(shape)
    parts = [jax.lax.index_in_dim(a, i, g) for i in range(GROUP)]
    # rank_i: entries that beat entry i (larger, or as large and earlier); kept if < 2.
    ranks = [sum((parts[j] >= parts[i] if j < i else parts[j] > parts[i]).astype(jnp.int32)
                 for j in range(GROUP) if j != i) for i in range(GROUP)]
    return (jnp.concatenate(ranks, axis=g) < KEEP).reshape(w.shape)


def mask(params: Any) -> Any:
    """The keep-masks of `params` (its tree): a bool array per pruned weight, `True` for every
    other leaf. For pruned weights (`prune`, a sparse run's state) these are their non-zeros."""
    def visit(path, leaf):
        n_in = input_axes(path, leaf)
        return keep_mask(leaf, n_in) if n_in else True
    return jax.tree_util.tree_map_with_path(visit, params)


def _zero_pruned(m, x):
    return x if m is True else jnp.where(m, x, jnp.zeros((), x.dtype))


def apply(masks: Any, tree: Any) -> Any:
    """`tree` (parameters, gradients, an optimizer moment: the parameters' structure) with the
    pruned entries set to 0."""
    return jax.tree.map(_zero_pruned, masks, tree)


def _constrain_leaf(m, x):
    if m is True:
        return x
    tiny = jnp.asarray(jnp.finfo(x.dtype).tiny, x.dtype)
    return jnp.where(m, jnp.where(x == 0, tiny, x), jnp.zeros((), x.dtype))


def constrain(masks: Any, params: Any) -> Any:
    """`apply` for weights: pruned entries 0, and a kept entry that is exactly 0 (an update
    cancelled it, or a group had fewer than 2 non-zeros) becomes the dtype's smallest normal
    number, so that `mask` of the result is `masks` again: the weights carry their own masks
    (through checkpoints too). Its effect on any product is below rounding."""
    return jax.tree.map(_constrain_leaf, masks, params)


def prune_weight(w: jax.Array, n_in: int) -> jax.Array:
    """One stacked weight [L, input..., output...] pruned (`prune`)."""
    return _constrain_leaf(keep_mask(w, n_in), w)


def prune(params: Any) -> Any:
    """`params` with every layer matmul weight pruned to 2 of each 4 along its input axes
    (magnitude); the rest unchanged. Idempotent: pruning pruned weights changes nothing."""
    return constrain(mask(params), params)


def is_2_4(params: Any) -> bool:
    """Whether every pruned weight has at most 2 non-zeros in each group of 4 (a check)."""
    def ok(path, leaf):
        n_in = input_axes(path, leaf)
        if not n_in:
            return True
        return bool(jnp.all((leaf != 0) <= keep_mask(leaf, n_in)))
    return all(jax.tree.leaves(jax.tree_util.tree_map_with_path(ok, params)))


# ---------------------------------------------------------------------------------------------
# Compressed storage


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sparse24:
    """A 2:4 weight stored as its kept values and their positions (cuSPARSELt's idea: 2 bits
    of metadata per kept value). For a weight [..., K, *rest] with K inputs (flattened input
    axes): `values` [..., K / 2, *rest], the 2 kept entries of each group of 4 in order;
    `meta` uint8 [..., ceil(K / 8), *rest], each group's two 2-bit positions (first | second
    << 2), two groups per byte (even group in the low 4 bits). Leading axes (the layers) may
    be sliced: the static fields describe only the trailing ones."""
    values: jax.Array
    meta: jax.Array
    in_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # the input axes
    n_rest: int = dataclasses.field(metadata=dict(static=True))  # the output axes

    def astype(self, dtype) -> jax.Array:  # what lm.model.dense asks of a weight
        return decompress_weight(self).astype(dtype)

    def __getitem__(self, index):  # nnx.Param's `w[...]`
        if index is Ellipsis:
            return self
        return Sparse24(self.values[index], self.meta[index], self.in_shape, self.n_rest)

    @property
    def shape(self) -> tuple[int, ...]:
        lead = self.values.shape[:self.values.ndim - 1 - self.n_rest]
        return lead + self.in_shape + self.values.shape[self.values.ndim - self.n_rest:]

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values) + _nbytes(self.meta)


def compress_weight(w: jax.Array, n_in: int) -> Sparse24:
    """`w` [L, input..., output...] (the first `n_in` axes after L contracted) as Sparse24,
    keeping `keep_mask`'s entries: exact for a pruned weight (its at most 2 non-zeros per group
    are kept), a magnitude pruning of a dense one."""
    in_shape = w.shape[1:1 + n_in]
    k = math.prod(in_shape)
    rest = w.shape[1 + n_in:]
    w_g4r = w.reshape(w.shape[:1] + (k // GROUP, GROUP) + rest)
    keep = keep_mask(w, n_in).reshape(w_g4r.shape)
    # The first kept position counts from the front, the second from the back.
    first = jnp.argmax(keep, axis=2)
    second = GROUP - 1 - jnp.argmax(jnp.flip(keep, axis=2), axis=2)
    pos = jnp.stack([first, second], axis=2)  # [L, G, 2, *rest]
    values = jnp.take_along_axis(w_g4r, pos, axis=2).reshape(w.shape[:1] + (k // 2,) + rest)
    code = (first | (second << 2)).astype(jnp.uint8)  # [L, G, *rest], 4 bits a group
    if code.shape[1] % 2:  # an odd number of groups: a zero nibble pads the last byte
        code = jnp.concatenate([code, jnp.zeros_like(code[:, :1])], axis=1)
    pairs = code.reshape(code.shape[:1] + (code.shape[1] // 2, 2) + rest)
    meta = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
    return Sparse24(values, meta, tuple(in_shape), len(rest))


def decompress_weight(s: Sparse24) -> jax.Array:
    """The dense weight of `s` (zeros at the pruned positions), exactly."""
    k = math.prod(s.in_shape)
    groups = k // GROUP
    axis = s.values.ndim - 1 - s.n_rest  # the values' input axis
    lead, rest = s.values.shape[:axis], s.values.shape[axis + 1:]
    nibbles = jnp.stack([s.meta & 0xF, s.meta >> 4], axis=axis + 1)
    code = nibbles.reshape(lead + (-1,) + rest)
    code = jax.lax.slice_in_dim(code, 0, groups, axis=axis)
    v = s.values.reshape(lead + (groups, 2) + rest)
    first, second = code & 3, code >> 2
    v0, v1 = (jax.lax.index_in_dim(v, i, axis + 1, keepdims=False) for i in range(2))
    zero = jnp.zeros((), s.values.dtype)
    dense = jnp.stack([jnp.where(first == j, v0, jnp.where(second == j, v1, zero))
                       for j in range(GROUP)], axis=axis + 1)
    return dense.reshape(lead + s.in_shape + rest)


def compress(params: Any) -> Any:
    """`params` with every layer matmul weight as a Sparse24 (pruning it if it is not 2:4)."""
    def visit(path, leaf):
        n_in = input_axes(path, leaf)
        return compress_weight(leaf, n_in) if n_in else leaf
    return jax.tree_util.tree_map_with_path(visit, params)


def decompress(params: Any) -> Any:
    """The dense parameters of `compress`'s output: equal to `prune(params)` bit for bit."""
    return jax.tree.map(lambda x: decompress_weight(x) if isinstance(x, Sparse24) else x,
                        params, is_leaf=lambda x: isinstance(x, Sparse24))


def _nbytes(x) -> int:  # arrays and jax.eval_shape's ShapeDtypeStructs
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def weight_bytes(params: Any) -> int:
    """Bytes of all parameters (a Sparse24 counts its values and metadata); abstract ones
    (jax.eval_shape) too."""
    return sum(x.nbytes if isinstance(x, Sparse24) else _nbytes(x) for x in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, Sparse24)))
