"""Sampling text from a trained model (the simple path: no KV cache yet).

`sample` keeps the whole loop inside one jit: each step reruns the causal forward over a fixed
[B, max_len] buffer and writes one new token. The KV-cache engine (prefill + decode slots) replaces
this for serving; this path is for the end-of-training sample and for tests.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.jit, static_argnames=("graphdef", "length", "temperature"))
def _sample(graphdef, params, buf_bt, prompt_len, key, length: int, temperature: float):
    model = nnx.merge(graphdef, params)

    def step(t, carry):
        buf_bt, key = carry
        logits_bv = model(buf_bt)[:, t - 1].astype(jnp.float32)
        key, sub = jax.random.split(key)
        if temperature > 0:
            nxt_b = jax.random.categorical(sub, logits_bv / temperature)
        else:
            nxt_b = jnp.argmax(logits_bv, axis=-1)
        return buf_bt.at[:, t].set(nxt_b.astype(buf_bt.dtype)), key

    buf_bt, _ = jax.lax.fori_loop(prompt_len, length, step, (buf_bt, key))
    return buf_bt


def sample(model_or_graphdef, params=None, *, prompt: jax.Array, num_tokens: int,
           temperature: float = 0.7, seed: int = 0) -> jax.Array:
    """Continues `prompt` [B, P] by `num_tokens` tokens; returns [B, P + num_tokens].

    Accepts a model, or a (graphdef, params) pair from `nnx.split`.
    """
    if params is None:
        graphdef, params = nnx.split(model_or_graphdef)
    else:
        graphdef = model_or_graphdef
    b, p = prompt.shape
    length = p + num_tokens
    buf = jnp.zeros((b, length), jnp.int32).at[:, :p].set(prompt)
    return _sample(graphdef, params, buf, p, jax.random.key(seed), length, float(temperature))
