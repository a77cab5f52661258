"""The transformer: a GPT-2 or Llama style decoder or a BERT style encoder, by config.

    style 'gpt2':  learned positions, LayerNorm (scale + bias), GELU MLP, biases, tied embeddings
    style 'llama': RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases, untied output
    style 'bert':  gpt2's parts, but bidirectional attention over the unpadded tokens (`lengths`),
                   token-type embeddings, a LayerNorm on the embeddings, post-norm blocks, exact
                   (erf) GELU, and the masked-LM head (dense, GELU, LayerNorm, the tied decoder
                   with its own bias), plus the pooler and next-sentence head (model.nsp_head)

The heads follow the task (`task.name`): the decoders' next-token head (lm), BERT's masked-LM
head (mlm, mlm_nsp), or a fine-tuning head in its place: `classifier` on the pooled sequence
(classify; BERT pools with its pooler on [CLS], a decoder takes its last real token, as Hugging
Face's *ForSequenceClassification do) or `span` start/end logits at every token (span).

The decoders are pre-norm residual stacks, BERT post-norm (`ModelConfig.post_norm`). The layers
are one `Block` whose parameters are stacked along a leading `layers` axis (built with
`nnx.vmap`) and applied with `lax.scan` (unrolled when `scan_layers` is False: faster steps for
shallow models, longer compiles for deep ones).

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `layers`, ...) and the residual stream is constrained to (`batch`, `length`, `embed`); the
rules in `lm.sharding` map them onto the mesh. Parameters are stored in `param_dtype` and cast to
`compute_dtype` where they are used; norms, softmax and the loss run in float32.

Three custom VJPs change nothing mathematically and only steer XLA (see their docstrings and
bench/RESULTS.md): `dense` spells out each weight gradient as x^T @ dy, `materialize_grad`
makes the residual stream's gradient be computed once per layer, and `_softmax_to` keeps the
attention probabilities once, in the compute dtype. `STEERING` says on which backends each runs.

Shapes: B batch, T length, D d_model, N heads, K kv heads, H head_dim, F mlp, V vocab, L layers.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from lm.config import ConfigError, ModelConfig, PrecisionConfig, TaskConfig
from lm.pipeline import Pipeline, loss_sums, run as run_pipeline
from lm.quantize import Int8Array, Int8Matmul, Observed, quantize_weight
from lm.sharding import KV_CACHE_AXES, REPLICATED, constrain

Initializer = jax.nn.initializers.Initializer
# model.remat: what a layer keeps for the backward pass (everything else is recomputed).
REMAT_POLICIES = {
    "full": None,  # only the layer's input
    "dots": jax.checkpoint_policies.save_only_these_names("dot", "attention"),
    "minimal": jax.checkpoint_policies.save_only_these_names("attention"),
}
# Per-feature vectors (biases, norm scales): no weight decay (see lm.optim.decay_mask).
VECTOR_PARAMS = frozenset({"scale", "bias", "bq", "bk", "bv", "bqkv", "bo", "bi",
                           "vocab_bias"})
# The custom VJPs that only steer XLA, and the backends (jax.default_backend()) that use each;
# elsewhere plain autodiff runs. Each was measured faster on XLA:CPU (bench/RESULTS.md). On GPUs
# and TPUs they are unmeasured and stay on for now: `bench/train_throughput.py --steering`
# times the model without each, one by one.
STEERING = {"dense": ("cpu", "gpu", "tpu"), "materialize_grad": ("cpu", "gpu", "tpu"),
            "softmax": ("cpu", "gpu", "tpu")}


def steers(name: str) -> bool:
    """Whether the steering custom VJP `name` (a STEERING key) runs on this backend."""
    return jax.default_backend() in STEERING[name]


def _param(rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], names: tuple[str, ...],
           dtype) -> nnx.Param:
    # Not eagerly sharded: the model also builds outside a mesh; `lm.train` places parameters by
    # jitting the constructor with out_shardings derived from these names.
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype),
                     eager_sharding=False)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: Float[Array, "... I"], w: Float[Array, "I O"], n_in: int = 1) -> Float[Array, "... O"]:
    """x @ w.astype(x.dtype), contracting x's last `n_in` axes with w's first `n_in`.

    `w` is the stored parameter, cast here: the backward keeps the parameter itself (a slice of
    the stacked layers, sharded as stored) rather than a cast or, under fsdp, an all-gathered
    copy of every layer's weights. It casts and gathers again, as ZeRO-3 does.

    The backward writes the weight gradient as x^T @ dy. Autodiff's own transpose leads XLA:CPU
    to transpose the activation *gradient* (often with its elementwise producers fused in,
    evaluated in strided order) for every weight gradient; spelling out x^T transposes the
    forward activation instead, a plain copy. Measured +28% on the llama-style bench model
    (bench/RESULTS.md). Mathematically identical.
    """
    return jnp.tensordot(x, w.astype(x.dtype), axes=n_in)


def dense_named(x, w, n_in: int = 1):
    """`dense` (plain autodiff where it does not steer) whose output the 'dots' remat policy
    keeps (a custom VJP hides its matmul from jax's own dot-finding policies). A calibrated
    int8 weight (`lm.quantize.Int8Matmul`) runs int8 x int8 -> int32; an `Observed` one
    (calibration) reports x first."""
    if isinstance(w, Observed):
        w.record(x)
        w = w.w
    if isinstance(w, Int8Matmul):
        y = w.matmul(x, n_in)
    else:
        y = dense(x, w, n_in) if steers("dense") else jnp.tensordot(x, w.astype(x.dtype), n_in)
    return checkpoint_name(y, "dot")


def _dense_fwd(x, w, n_in):
    return dense(x, w, n_in), (x, w)


def _dense_bwd(n_in, residuals, dy):
    x, w = residuals
    wc = w.astype(x.dtype)
    n_out = w.ndim - n_in
    x_ti = x.reshape(-1, math.prod(w.shape[:n_in]))
    dy_to = dy.reshape(-1, math.prod(w.shape[n_in:]))
    dw = jax.lax.dot_general(x_ti.T, dy_to, (((1,), (0,)), ((), ()))).reshape(w.shape)
    dx = jax.lax.dot_general(dy, wc, ((tuple(range(dy.ndim - n_out, dy.ndim)),
                                       tuple(range(n_in, w.ndim))), ((), ())))
    return dx, dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def materialize_grad(x: Array) -> Array:
    """Identity; in the backward pass its cotangent is computed once and stored.

    Multiplying by exp(0 * g) (exactly 1 for finite g) gives XLA an expensive elementwise op,
    which it will not duplicate into consumers. Without it XLA:CPU inlines the whole residual
    gradient chain of every layer above into each consumer (measured +13% on the gpt2-style
    bench model with it). `lax.optimization_barrier` does not work here: XLA:CPU removes
    barriers before fusion. A non-finite g stays non-finite (inf becomes nan), so loss-scaling
    overflow checks still see it.
    """
    return x


materialize_grad.defvjp(lambda x: (x, None), lambda _, g: (g * jnp.exp(g * 0),))


class Norm(nnx.Module):
    """LayerNorm (gpt2) or RMSNorm (llama), computed in float32."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.rms = cfg.style == "llama"
        self.eps = cfg.norm_eps
        self.scale = _param(rngs, jax.nn.initializers.ones, (cfg.d_model,), ("norm",), dtype)
        if not self.rms:
            self.bias = _param(rngs, jax.nn.initializers.zeros, (cfg.d_model,), ("norm",), dtype)

    def __call__(self, x_btd: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        bias = None if self.rms else self.bias[...]
        return _norm(x_btd, self.scale[...], bias, self.eps)


@partial(jax.checkpoint, static_argnums=(3,))
def _norm(x_btd, scale, bias, eps):
    """LayerNorm (with bias) or RMSNorm (bias None). Checkpointed: the backward keeps only the
    input and recomputes the statistics (elementwise work), instead of four [B, T, D] float32
    intermediates."""
    x = x_btd.astype(jnp.float32)
    if bias is None:
        y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
        y = y * scale.astype(jnp.float32)
    else:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x_btd.dtype)


def rope_tables(positions_bt: Int[Array, "B T"], head_dim: int,
                theta: float) -> tuple[Float[Array, "B T 1 H"], Float[Array, "B T 1 H"]]:
    """(cos, signed sin) tables for `rope`, computed once per forward pass."""
    half = head_dim // 2
    freqs = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions_bt[..., None].astype(jnp.float32) * freqs  # [B, T, H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    cos_bth = jnp.concatenate([cos, cos], axis=-1)
    sin_bth = jnp.concatenate([-sin, sin], axis=-1)
    return cos_bth[:, :, None, :], sin_bth[:, :, None, :]


def rope(x_btnh: Float[Array, "B T N H"], tables) -> Float[Array, "B T N H"]:
    """Rotary position embedding, rotate-half convention (as in Hugging Face's Llama).

    x * cos + rotate_half(x) * sin, with rotate_half written as a reversal of the two halves
    (a reshape and a `rev`) so that XLA fuses it elementwise instead of building a concatenate.
    """
    cos, sin = tables
    b, t, n, h = x_btnh.shape
    x = x_btnh.astype(jnp.float32)
    swapped = x.reshape(b, t, n, 2, h // 2)[..., ::-1, :].reshape(b, t, n, h)
    return (x * cos + swapped * sin).astype(x_btnh.dtype)


def causal_attention(q_btnh: Float[Array, "B T N H"], k_btkh: Float[Array, "B T K H"],
                     v_btkh: Float[Array, "B T K H"]) -> Float[Array, "B T N H"]:
    """`dot_attention` with the causal mask (the decoders' training attention)."""
    return dot_attention(q_btnh, k_btkh, v_btkh, causal=True)


def dot_attention(q_btnh: Float[Array, "B T N H"], k_btkh: Float[Array, "B T K H"],
                  v_btkh: Float[Array, "B T K H"], causal: bool,
                  lengths_b: Int[Array, "B"] | None = None) -> Float[Array, "B T N H"]:
    """softmax(q k^T / sqrt(H) + mask) v, with K key/value heads shared by N / K query heads
    each (grouped-query attention; K must divide N). The mask hides later keys (`causal`) and
    the keys at or past each row's `lengths_b` (right padding; queries there still attend to
    the row's real keys, as in Hugging Face's BERT).

    Logits and softmax in float32; the backward keeps q, k, v and the probabilities in the
    compute dtype (2as^2b bytes per layer at 16 bits, Korthikanti et al.'s count without
    dropout) and nothing else of the [B, N, T, T] work. XLA:CPU has no float16 x float16 ->
    float32 dot, so float16 logits are computed from float32 inputs there.
    """
    b, t, n, h = q_btnh.shape
    k = k_btkh.shape[2]
    dt = q_btnh.dtype
    q = q_btnh.reshape(b, t, k, n // k, h)
    if dt == jnp.float16 and jax.default_backend() == "cpu":
        q, k_btkh = q.astype(jnp.float32), k_btkh.astype(jnp.float32)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k_btkh,
                        preferred_element_type=jnp.float32) * h ** -0.5
    # Additive masks: a `where` here would make autodiff keep a [B, N, T, T] mask and fill.
    if causal:
        logits += jnp.where(jnp.tril(jnp.ones((t, t), bool)), 0.0, -1e30)
    if lengths_b is not None:  # [B, 1, 1, 1, T]: no [B, N, T, T] array either
        keys = jnp.arange(t)[None, :] < lengths_b[:, None]
        logits += jnp.where(keys, 0.0, -1e30)[:, None, None, None, :]
    probs = (_softmax_to(logits, dt) if steers("softmax") else
             jax.nn.softmax(logits, axis=-1).astype(dt))
    if dt == jnp.float16 and jax.default_backend() == "cpu":
        probs, v_btkh = probs.astype(jnp.float32), v_btkh.astype(jnp.float32)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_btkh, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(dt)


def attention_impl(cfg: ModelConfig, dtype) -> str:
    """`model.attention` resolved for this backend and compute dtype: 'cudnn', 'xla'
    (`jax.nn.dot_product_attention`'s implementations) or 'lm' (`causal_attention`: 'auto' where
    cuDNN cannot run, e.g. on CPUs, where it is the path tuned there)."""
    why_not = _cudnn_unavailable(jnp.dtype(dtype), cfg.head_dim)
    if cfg.attention == "auto":
        return "lm" if why_not else "cudnn"
    if cfg.attention == "cudnn" and why_not:
        raise ConfigError(f"model.attention='cudnn' cannot run here: {why_not}; use 'auto' "
                          "(cuDNN where it runs) or 'xla'")
    return cfg.attention


def _cudnn_unavailable(dtype: jnp.dtype, head_dim: int) -> str:
    """Why cuDNN's fused attention cannot run on this backend with these shapes ('' if it can):
    it needs an NVIDIA GPU of compute capability 8.0 or newer, float16 or bfloat16 inputs, and a
    head_dim that is a multiple of 8, at most 128 (../shared/REFERENCE.md)."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or capability is None:
        return f"it needs an NVIDIA GPU, this backend is {device.platform}"
    if float(capability) < 8.0:
        return f"it needs compute capability 8.0 or newer, {device.device_kind} has {capability}"
    if dtype not in (jnp.bfloat16, jnp.float16):
        return f"it computes in bfloat16 or float16, precision.compute_dtype is {dtype}"
    if head_dim % 8 or head_dim > 128:
        return f"head_dim must be a multiple of 8 up to 128, it is {head_dim}"
    return ""


def attend(q_btnh: Float[Array, "B T N H"], k_btkh: Float[Array, "B T K H"],
           v_btkh: Float[Array, "B T K H"], impl: str, causal: bool = True,
           lengths_b: Int[Array, "B"] | None = None) -> Float[Array, "B T N H"]:
    """Grouped-query attention by `attention_impl`'s `impl` (see `dot_attention`)."""
    if impl == "lm":
        return dot_attention(q_btnh, k_btkh, v_btkh, causal, lengths_b)
    return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, is_causal=causal,
                                        key_value_seq_lengths=lengths_b, implementation=impl)


def cached_attention(q_btnh: Float[Array, "B T N H"], k_cache_bksh, v_cache_bksh,
                     positions_bt: Int[Array, "B T"]) -> Float[Array, "B T N H"]:
    """Attention of T new queries per row (at `positions_bt`, consecutive: a right-padded
    prompt, or one decode step) over a cache that already holds their keys and values
    (`write_cache` first): the query at position p sees cache positions <= p, the later ones
    being stale. Writing before reading lets a decode loop update the cache in place (reading
    the old cache and then writing it made XLA copy every layer's cache each step). A cache
    may be an `Int8Array` (`init_cache(dtype="int8")`)."""
    b, t, n, h = q_btnh.shape
    k, s = k_cache_bksh.shape[1], k_cache_bksh.shape[2]
    dt = q_btnh.dtype
    q = q_btnh.reshape(b, t, k, n // k, h)
    arrays = (q, k_cache_bksh.astype(dt), v_cache_bksh.astype(dt))
    if dt == jnp.float16 and jax.default_backend() == "cpu":
        arrays = tuple(a.astype(jnp.float32) for a in arrays)
    q, keys, values = arrays
    logits = jnp.einsum("btkgh,bksh->bkgts", q, keys, preferred_element_type=jnp.float32)
    visible_bts = jnp.arange(s)[None, None, :] <= positions_bt[:, :, None]
    logits = jnp.where(visible_bts[:, None, None], logits * h ** -0.5, -1e30)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, values, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(dt)


def write_cache(cache_bksh, positions_bt, new_btkh):
    """One layer's cache with its new keys (or values) [B, T, K, H] at `positions_bt`."""
    rows = jnp.arange(new_btkh.shape[0])[:, None]
    # Indexed by (rows, positions) around a slice, the cache's selected part is [B, T, K, H].
    if isinstance(cache_bksh, Int8Array):  # symmetric over head_dim, per position and head
        new = quantize_weight(new_btkh, (3,))
        return Int8Array(cache_bksh.q.at[rows, :, positions_bt].set(new.q),
                         cache_bksh.scale.at[rows, :, positions_bt].set(new.scale))
    return cache_bksh.at[rows, :, positions_bt].set(new_btkh.astype(cache_bksh.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax_to(x: Array, dtype) -> Array:
    """softmax over the last axis in float32, returned in `dtype`; the backward uses that
    output (the one array it keeps) instead of a float32 copy."""
    return jax.nn.softmax(x, axis=-1).astype(dtype)


def _softmax_to_fwd(x, dtype):
    y = _softmax_to(x, dtype)
    return y, y


def _softmax_to_bwd(dtype, y, dy):
    y, dy = y.astype(jnp.float32), dy.astype(jnp.float32)
    return (y * (dy - jnp.sum(dy * y, axis=-1, keepdims=True)),)


_softmax_to.defvjp(_softmax_to_fwd, _softmax_to_bwd)


class Attention(nnx.Module):
    """Multi-head attention with `num_kv_heads` shared key/value heads (GQA); causal but for
    BERT. With model.fused_projections, q, k and v come from one matmul (`wqkv`, lm.fuse)."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = jax.nn.initializers.normal(0.02)
        # GPT-2's residual projections start smaller so the residual stream's variance stays flat.
        out_init = jax.nn.initializers.normal(0.02 / (2 * cfg.num_layers) ** 0.5)
        self.cfg = cfg
        zeros = jax.nn.initializers.zeros
        if cfg.fused_projections:
            # One matmul for q, k and v (lm.fuse): kv group j holds its N / K query heads, then
            # its k and v head. Split over kv_heads, a tensor-parallel shard keeps whole groups.
            self.wqkv = _param(rngs, init, (d, k, n // k + 2, h),
                               ("embed", "kv_heads", None, "head_dim"), dtype)
            if cfg.biases:
                self.bqkv = _param(rngs, zeros, (k, n // k + 2, h),
                                   ("kv_heads", None, "head_dim"), dtype)
        else:
            self.wq = _param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), dtype)
            self.wk = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
            self.wv = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
            if cfg.biases:
                self.bq = _param(rngs, zeros, (n, h), ("heads", "head_dim"), dtype)
                self.bk = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), dtype)
                self.bv = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), dtype)
        self.wo = _param(rngs, out_init, (n, h, d), ("heads", "head_dim", "embed"), dtype)
        if cfg.biases:
            self.bo = _param(rngs, zeros, (d,), ("embed",), dtype)

    def __call__(self, x_btd: Float[Array, "B T D"], rope_bt=None, cache=None, lengths_b=None
                 ) -> Float[Array, "B T D"] | tuple[Float[Array, "B T D"], tuple]:
        """With `cache` = (k [B, K, S, H], v, positions_bt, empty): writes the new keys and
        values into the layer's cache and attends over it (`cached_attention`), or, `empty`
        (a prefill from position 0 into an empty cache), over the new tokens alone, as in
        training; returns (output, (k, v) updated). Without, attention over x alone
        (`model.attention`; BERT: over each row's first `lengths_b` tokens)."""
        cfg, dt = self.cfg, x_btd.dtype

        if cfg.fused_projections:
            qkv_btkgh = dense_named(x_btd, self.wqkv[...])  # [B, T, K, N / K + 2, H]
            if cfg.biases:
                qkv_btkgh += self.bqkv[...].astype(dt)
            g = cfg.num_heads // cfg.num_kv_heads
            q_btnh = qkv_btkgh[..., :g, :].reshape(*qkv_btkgh.shape[:2], cfg.num_heads, -1)
            k_btkh, v_btkh = qkv_btkgh[..., g, :], qkv_btkgh[..., g + 1, :]
        else:
            q_btnh, k_btkh, v_btkh = (dense_named(x_btd, w[...])
                                      for w in (self.wq, self.wk, self.wv))
            if cfg.biases:
                q_btnh += self.bq[...].astype(dt)
                k_btkh += self.bk[...].astype(dt)
                v_btkh += self.bv[...].astype(dt)
        if cfg.rope:
            q_btnh = rope(q_btnh, rope_bt)
            k_btkh = rope(k_btkh, rope_bt)
        if cache is not None:
            k_cache, v_cache, positions_bt, empty = cache
            kv = (write_cache(k_cache, positions_bt, k_btkh),
                  write_cache(v_cache, positions_bt, v_btkh))
        if cache is not None and not empty:
            out_btnh = cached_attention(q_btnh, *kv, positions_bt)
        else:
            out_btnh = checkpoint_name(attend(q_btnh, k_btkh, v_btkh, attention_impl(cfg, dt),
                                              cfg.causal, lengths_b), "attention")
        out_btd = dense_named(out_btnh, self.wo[...], 2)
        if cfg.biases:
            out_btd += self.bo[...].astype(dt)
        return out_btd if cache is None else (out_btd, kv)


class Mlp(nnx.Module):
    """GELU MLP (gpt2: tanh GELU, bert: exact; with biases) or SwiGLU (llama)."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        init = jax.nn.initializers.normal(0.02)
        out_init = jax.nn.initializers.normal(0.02 / (2 * cfg.num_layers) ** 0.5)
        self.gated, self.approximate = cfg.style == "llama", cfg.gelu_approximate
        self.fused = self.gated and cfg.fused_projections
        if self.fused:  # gate and up as one matmul (lm.fuse): [..., 0, :] gate, [..., 1, :] up
            self.wgi = _param(rngs, init, (d, 2, f), ("embed", None, "mlp"), dtype)
        else:
            self.wi = _param(rngs, init, (d, f), ("embed", "mlp"), dtype)
        self.wo = _param(rngs, out_init, (f, d), ("mlp", "embed"), dtype)
        if self.gated and not self.fused:
            self.wg = _param(rngs, init, (d, f), ("embed", "mlp"), dtype)
        elif not self.gated:
            zeros = jax.nn.initializers.zeros
            self.bi = _param(rngs, zeros, (f,), ("mlp",), dtype)
            self.bo = _param(rngs, zeros, (d,), ("embed",), dtype)

    def __call__(self, x_btd: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        dt = x_btd.dtype
        if self.fused:
            gh_bt2f = dense_named(x_btd, self.wgi[...])
            return _swiglu_out(gh_bt2f[..., 0, :], gh_bt2f[..., 1, :], self.wo[...])
        h_btf = dense_named(x_btd, self.wi[...])
        if self.gated:
            out_btd = _swiglu_out(dense_named(x_btd, self.wg[...]), h_btf, self.wo[...])
        else:
            out_btd = _gelu_out(h_btf + self.bi[...].astype(dt), self.wo[...], self.approximate)
            out_btd += self.bo[...].astype(dt)
        return out_btd


# The activation and the output projection, checkpointed together: the backward keeps the
# activation's inputs ([B, T, F] once, twice for SwiGLU) and recomputes the elementwise
# function, instead of keeping its output and every intermediate of tanh-GELU (six [B, T, F]).
@partial(jax.checkpoint, static_argnums=(2,))
def _gelu_out(h_btf, wo, approximate: bool):
    h_btf = constrain(jax.nn.gelu(h_btf, approximate=approximate), ("batch", "length", "mlp"))
    return dense_named(h_btf, wo)


@jax.checkpoint
def _swiglu_out(g_btf, h_btf, wo):
    h_btf = constrain(jax.nn.silu(g_btf) * h_btf, ("batch", "length", "mlp"))
    return dense_named(h_btf, wo)


class Block(nnx.Module):
    """One transformer layer. Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)); post-norm
    (BERT): norm(x + attn(x)), then norm(x + mlp(x)) (attn_norm and mlp_norm are then Hugging
    Face's attention.output.LayerNorm and output.LayerNorm)."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.post_norm = cfg.post_norm
        self.attn_norm = Norm(cfg, dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype, rngs=rngs)
        self.mlp_norm = Norm(cfg, dtype, rngs=rngs)
        self.mlp = Mlp(cfg, dtype, rngs=rngs)

    def __call__(self, x_btd: Float[Array, "B T D"], rope_bt=None, cache=None, lengths_b=None):
        """`rope_bt`: the (cos, sin) tables of `rope_tables` (llama style), else None;
        `cache`: see `Attention` (then returns (x, (k, v))); `lengths_b`: BERT's unpadded
        lengths."""
        if self.post_norm:
            with jax.named_scope("block"):
                with jax.named_scope("attention"):
                    x_btd = self.attn_norm(x_btd + self.attn(x_btd, lengths_b=lengths_b))
                with jax.named_scope("mlp"):
                    x_btd = self.mlp_norm(x_btd + self.mlp(x_btd))
                return constrain(x_btd, ("batch", "length", "embed"))
        with jax.named_scope("block"):  # the names a profiler trace shows
            with jax.named_scope("attention"):
                attn_btd = self.attn(self.attn_norm(x_btd), rope_bt, cache)
            if cache is not None:
                attn_btd, kv = attn_btd
            x_btd = x_btd + attn_btd
            with jax.named_scope("mlp"):
                x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
            x_btd = constrain(x_btd, ("batch", "length", "embed"))
        return x_btd if cache is None else (x_btd, kv)


class Linear(nnx.Module):
    """x @ w + bias, [D] -> [out] (BERT's heads: the MLM transform, the pooler, NSP)."""

    def __init__(self, d_in: int, d_out: int, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.w = _param(rngs, jax.nn.initializers.normal(0.02), (d_in, d_out), ("embed", None),
                        dtype)
        self.bias = _param(rngs, jax.nn.initializers.zeros, (d_out,), (None,), dtype)

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... O"]:
        return dense_named(x, self.w[...]) + self.bias[...].astype(x.dtype)


class Transformer(nnx.Module):
    """Token ids [B, T] -> next-token logits [B, T, V] (BERT: masked-LM logits; in
    compute_dtype). Parameters are stored in `precision.param_dtype`, activations computed in
    `precision.compute_dtype`."""

    def __init__(self, cfg: ModelConfig, precision: PrecisionConfig = PrecisionConfig(),
                 task: TaskConfig | None = None, *, rngs: nnx.Rngs):
        task = task or default_task(cfg)
        self.cfg, self.precision, self.task = cfg, precision, task
        dtype = jnp.dtype(precision.param_dtype)
        init = jax.nn.initializers.normal(0.02)
        self.embed = _param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dtype)
        if cfg.learned_positions:
            self.pos_embed = _param(rngs, jax.nn.initializers.normal(0.01),
                                    (cfg.max_len, cfg.d_model), ("positions", "embed"), dtype)
        if cfg.style == "bert":
            self.type_embed = _param(rngs, init, (cfg.type_vocab_size, cfg.d_model),
                                     ("positions", "embed"), dtype)
            self.embed_norm = Norm(cfg, dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, dtype, rngs=rngs)

        self.blocks = make_blocks(rngs)
        if not cfg.post_norm:  # a post-norm stack ends normalized
            self.final_norm = Norm(cfg, dtype, rngs=rngs)
        if task.masked:  # the masked-LM head, its decoder tied to `embed`
            self.mlm_dense = Linear(cfg.d_model, cfg.d_model, dtype, rngs=rngs)
            self.mlm_norm = Norm(cfg, dtype, rngs=rngs)
            self.vocab_bias = _param(rngs, jax.nn.initializers.zeros, (cfg.vocab_size,),
                                     ("vocab",), dtype)
        nsp = cfg.nsp_head and task.masked
        if nsp or (cfg.style == "bert" and task.name == "classify"):
            self.pooler = Linear(cfg.d_model, cfg.d_model, dtype, rngs=rngs)
        if nsp:
            self.nsp = Linear(cfg.d_model, 2, dtype, rngs=rngs)
        if task.name == "classify":
            if not task.num_labels:
                raise ConfigError("task.num_labels is 0: a classifier needs its labels "
                                  "(task.labels, or lm.train reads them from data.path)")
            self.classifier = Linear(cfg.d_model, task.num_labels, dtype, rngs=rngs)
        if task.name == "span":
            self.span = Linear(cfg.d_model, 2, dtype, rngs=rngs)
        if task.name == "lm" and not cfg.tied_embeddings:
            # Stored [vocab, embed] like the input table: XLA:CPU then runs the head's backward
            # as the same GEMMs as the tied case (measured faster than [embed, vocab]).
            self.unembed = _param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                  dtype)

    def __call__(self, tokens_bt: Int[Array, "B T"], positions_bt: Int[Array, "B T"] | None = None,
                 pipeline: Pipeline | None = None, **encoder) -> Float[Array, "B T V"]:
        return self.logits(self.hidden(tokens_bt, positions_bt, pipeline, **encoder))

    def hidden(self, tokens_bt: Int[Array, "B T"], positions_bt: Int[Array, "B T"] | None = None,
               pipeline: Pipeline | None = None, token_types: Int[Array, "B T"] | None = None,
               lengths: Int[Array, "B"] | None = None) -> Float[Array, "B T D"]:
        """The final-normed residual stream; `pipeline`: run the layers through lm.pipeline's
        schedule over the `pipeline` mesh axis (training and evaluation). BERT also takes the
        `token_types` (segment ids; None: all 0) and, for right-padded rows, the `lengths`
        (None: no padding)."""
        cfg = self.cfg
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        elif pipeline is not None:
            raise ValueError("a pipelined forward takes no positions: every micro-batch uses "
                             "0..T-1")
        x_btd = constrain(self._embed(tokens_bt, positions_bt, token_types),
                          ("batch", "length", "embed"))
        rope_rows = positions_bt if pipeline is None else \
            positions_bt[:tokens_bt.shape[0] // pipeline.microbatches]
        rope_bt = rope_tables(rope_rows, cfg.head_dim, cfg.rope_theta) if cfg.rope else None

        block_state, layer, remat = self._layers(rope_bt, lengths)
        if pipeline is not None:
            # Remat applies to each stage's layers as a whole, per schedule iteration.
            x_btd = run_pipeline(layer, block_state, x_btd, pipeline,
                                 wrap_stage=lambda f: remat(f, False), rows=lengths)
        elif cfg.scan_layers:
            # Inside scan CSE cannot undo the recomputation; unrolled it can, so prevent it there.
            x_btd, _ = jax.lax.scan(remat(layer, False), x_btd, block_state)
        else:
            # A Python loop over slices of the stacked arrays: XLA sees L independent layers
            # (scan(unroll=L) would still keep the backward's residuals in stacked buffers).
            for i in range(cfg.num_layers):
                x_btd, _ = remat(layer, True)(x_btd, jax.tree.map(lambda a: a[i], block_state))
        return x_btd if cfg.post_norm else self.final_norm(x_btd)

    def _layers(self, rope_bt, lengths):
        """(the stacked layers' parameters, one layer as `lax.scan` runs it, the remat wrapper
        `remat(f, prevent_cse)` of model.remat)."""
        block_def, block_state = nnx.split(self.blocks)

        def layer(x_btd, layer_state, lengths_b=lengths):
            x_btd = materialize_grad(x_btd) if steers("materialize_grad") else x_btd
            return nnx.merge(block_def, layer_state)(x_btd, rope_bt, lengths_b=lengths_b), None

        remat = (lambda f, prevent_cse: jax.checkpoint(
            f, prevent_cse=prevent_cse, policy=REMAT_POLICIES[self.cfg.remat])
            if self.cfg.remat != "none" else f)
        return block_state, layer, remat

    def pipelined_sums(self, tokens_bt: Int[Array, "B T"], sums_fn, head_rows, pipeline: Pipeline,
                       lengths: Int[Array, "B"] | None = None):
        """Training under pipeline.schedule '1f1b': the embedding, the layers and the output
        head run together, micro-batch by micro-batch (`lm.pipeline.loss_sums`), so that no
        stage keeps more than 2S - 1 micro-batches' activations. `sums_fn(model, x_btd, rows_b)
        -> (loss_sum, aux)`: the head's summed loss (differentiated) and other sums of one
        micro-batch's final hidden states (`hidden`'s output) and its rows of `head_rows`
        ([B, ...] arrays); returns their totals over the batch."""
        cfg = self.cfg
        micro = (tokens_bt.shape[0] // pipeline.microbatches, tokens_bt.shape[1])
        positions_bt = jnp.broadcast_to(jnp.arange(micro[1]), micro)
        rope_bt = rope_tables(positions_bt, cfg.head_dim, cfg.rope_theta) if cfg.rope else None
        block_state, layer, remat = self._layers(rope_bt, lengths)
        graphdef, blocks, outer = nnx.split(self, nnx.PathContains("blocks"), ...)
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), blocks)

        def without_layers(outer):  # the model around its layers (never read)
            return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                                    shapes), outer)

        def embed(outer, tokens_bt):
            x_btd = without_layers(outer)._embed(tokens_bt, jnp.broadcast_to(
                jnp.arange(tokens_bt.shape[1]), tokens_bt.shape))
            return constrain(x_btd, ("batch", "length", "embed"))

        def head(outer, x_btd, rows_b):
            model = without_layers(outer)
            return sums_fn(model, x_btd if cfg.post_norm else model.final_norm(x_btd), rows_b)
        return loss_sums(layer, embed, head, pipeline, lambda f: remat(f, False), block_state,
                         outer, tokens_bt, head_rows, lengths)

    def _embed(self, tokens_bt, positions_bt, token_types_bt=None) -> Float[Array, "B T D"]:
        """Token (+ learned position, + BERT's token-type, then its LayerNorm) embeddings."""
        cfg = self.cfg
        dt = jnp.dtype(self.precision.compute_dtype)
        x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dt)
        if cfg.learned_positions:
            x_btd += jnp.take(self.pos_embed[...], positions_bt, axis=0).astype(dt)
        if cfg.style == "bert":
            types = jnp.zeros_like(tokens_bt) if token_types_bt is None else token_types_bt
            x_btd = self.embed_norm(x_btd + jnp.take(self.type_embed[...], types, axis=0
                                                     ).astype(dt))
        return x_btd

    def decode(self, tokens_bt: Int[Array, "B T"], positions_bt: Int[Array, "B T"],
               cache: dict[str, tuple], logits_at: Int[Array, "B"] | None = None,
               empty: bool = False, layers: list | None = None
               ) -> tuple[Float[Array, "B T V"], dict[str, tuple]]:
        """The forward pass of new tokens at `positions_bt` against a KV cache (`init_cache`):
        a prefill (T = the prompt length, right-padded) or a decode step (T = 1). Returns the
        logits of the new tokens (only of token `logits_at[b]` of each row, [B, 1, V], when
        given: a prefill needs just the last prompt token's) and the updated cache. `empty`:
        the cache holds nothing yet and positions_bt are 0..T-1, so the layers attend over the
        new tokens alone, as in training (`model.attention`), and never read the cache.
        `layers`: `layer_states()`, computed once by a decode loop (else each call slices
        every layer's weights out of the stacked ones: a copy per step on XLA:CPU).

        The layers run as a Python loop (decode is matmul-vector work: a scan would copy each
        layer's weights and cache out of the stacked arrays every step)."""
        cfg = self.cfg
        if not cfg.causal:
            raise ConfigError(f"a model.style {cfg.style!r} encoder does not generate text; "
                              "`python -m lm.predict` fills its masked tokens")
        x_btd = self._embed(tokens_bt, positions_bt)
        rope_bt = rope_tables(positions_bt, cfg.head_dim, cfg.rope_theta) if cfg.rope else None
        block_def = nnx.graphdef(self.blocks)
        written = []
        for i, layer_state in enumerate(self.layer_states() if layers is None else layers):
            x_btd, kv = nnx.merge(block_def, layer_state)(
                x_btd, rope_bt, (cache["k"][i], cache["v"][i], positions_bt, empty))
            written.append(kv)
        cache = {"k": tuple(k for k, _ in written), "v": tuple(v for _, v in written)}
        if logits_at is not None:
            x_btd = jnp.take_along_axis(x_btd, logits_at[:, None, None], axis=1)
        return self.logits(self.final_norm(x_btd)), constrain_cache(cache)

    def layer_states(self) -> list:
        """Each layer's parameters, sliced out of the stacked ones (for `decode`'s `layers`)."""
        block_state = nnx.state(self.blocks)
        return [jax.tree.map(lambda a: a[i], block_state) for i in range(self.cfg.num_layers)]

    def logits(self, x_btd: Float[Array, "B T D"], positions_bp: Int[Array, "B P"] | None = None
               ) -> Float[Array, "B T V"]:
        """Next-token logits of `hidden`'s output (in compute_dtype). BERT: the masked-LM
        logits, of the tokens at `positions_bp` only ([B, P, V]) when given."""
        names = ("batch", "length", "vocab")
        if positions_bp is not None:
            x_btd = jnp.take_along_axis(x_btd, positions_bp[..., None], axis=1)
            names = ("batch", None, "vocab")
        if self.cfg.style == "bert":
            h_btd = self.mlm_dense(x_btd)
            x_btd = self.mlm_norm(jax.nn.gelu(h_btd, approximate=False))
        table_vd = self.embed if self.cfg.tied_embeddings else self.unembed
        logits_btv = jnp.einsum("btd,vd->btv", x_btd, table_vd[...].astype(x_btd.dtype))
        if self.cfg.style == "bert":
            logits_btv += self.vocab_bias[...].astype(logits_btv.dtype)
        return constrain(logits_btv, names)

    def nsp_logits(self, x_btd: Float[Array, "B T D"]) -> Float[Array, "B 2"]:
        """BERT's next-sentence logits (0: B follows A) from the pooled first ([CLS]) token."""
        return self.nsp(self.pooled(x_btd))

    def pooled(self, x_btd: Float[Array, "B T D"], lengths_b: Int[Array, "B"] | None = None
               ) -> Float[Array, "B D"]:
        """One vector per sequence: BERT's pooler (dense + tanh) on [CLS] where the model has
        one, else BERT's [CLS] state; a decoder's state at its last real token (`lengths_b`;
        None: the last position)."""
        if self.cfg.causal:
            last = (jnp.full(x_btd.shape[:1], x_btd.shape[1]) if lengths_b is None
                    else lengths_b) - 1
            return jnp.take_along_axis(x_btd, last[:, None, None], axis=1)[:, 0]
        cls_bd = x_btd[:, 0]
        return jnp.tanh(self.pooler(cls_bd)) if hasattr(self, "pooler") else cls_bd

    def class_logits(self, x_btd: Float[Array, "B T D"], lengths_b: Int[Array, "B"] | None = None
                     ) -> Float[Array, "B C"]:
        """task classify: the label logits of each sequence (float32)."""
        return self.classifier(self.pooled(x_btd, lengths_b)).astype(jnp.float32)

    def span_logits(self, x_btd: Float[Array, "B T D"]) -> Float[Array, "B T 2"]:
        """task span: the answer's start ([..., 0]) and end ([..., 1]) logits at every token
        (float32)."""
        return self.span(x_btd).astype(jnp.float32)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype) -> dict[str, Array]:
    """An empty KV cache for `batch` rows of up to `length` positions: k and v, each a tuple of
    one [batch, kv_heads, length, head_dim] array per layer (lm.sharding.KV_CACHE_AXES) in
    `dtype` (the compute dtype, or "int8", which stores int8 values and a float32 scale per
    position and kv head (`Int8Array`). Under a mesh the rows are sharded like the batch (data,
    fsdp) and the kv heads over tensor."""
    shape = cache_shape(cfg, batch, length)
    if jnp.dtype(dtype) == jnp.int8:
        empty = lambda: Int8Array(jnp.zeros(shape, jnp.int8),
                                  jnp.ones(shape[:-1] + (1,), jnp.float32))
    else:
        empty = lambda: jnp.zeros(shape, jnp.dtype(dtype))
    return constrain_cache({name: tuple(empty() for _ in range(cfg.num_layers))
                            for name in "kv"})


def cache_shape(cfg: ModelConfig, batch, length) -> tuple:
    """The shape of one layer's k (or v) cache, in the order of lm.sharding.KV_CACHE_AXES."""
    return (batch, cfg.num_kv_heads, length, cfg.head_dim)


def constrain_cache(cache):
    return jax.tree.map(lambda x: constrain(x, KV_CACHE_AXES), cache)


def default_task(cfg: ModelConfig) -> TaskConfig:
    """The pretraining task of a style, where no task is given: lm, or mlm for BERT."""
    return TaskConfig(name="mlm") if cfg.style == "bert" else TaskConfig()


def abstract_model(cfg: ModelConfig, precision: PrecisionConfig = PrecisionConfig(),
                   task: TaskConfig | None = None):
    """(graphdef, parameters as shapes and dtypes): the model with `task`'s heads (default:
    `default_task`), not allocated, unconstrained."""
    with nnx.logical_axis_rules(REPLICATED):
        return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, precision, task,
                                                            rngs=nnx.Rngs(0))))


def param_count(params) -> int:
    """Number of parameters in a tree of them (abstract ones too)."""
    return sum(x.size for x in jax.tree.leaves(params))
