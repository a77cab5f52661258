"""Generating text: one decode step with its sampler, run by a KV-cache engine and by
continuous-batching slots.

    python -m lm.generate --checkpoint DIR (--prompt TEXT | --prompt-ids 1,2,3)
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--json]
        [--quantize int8] [--kv-cache int8] [--fuse]

checkpoint -> `Engine` -> `Engine.generate` (an offline batch: prefill, then one jitted
`while_loop`) or `Engine.slots` -> `DecodeSlots` (rows of one cache that requests enter and
leave; `lm.scheduler` drives them for `lm.serve`). Both decode with `decode_and_sample`, each
row with its own temperature, top-k, top-p, penalties, logit bias and seed (`SamplingParams`),
and draw a request's token i with the key (seed, i): the same tokens in any batch or slot. Each
token comes back with its logprob and, on request, the TOP_LOGPROBS most likely alternatives
(`Sampled`), of the model's raw distribution; `DecodeSlots.score` gives a prompt's logprobs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import sharding
from lm.config import ConfigError
from lm.data import tokenizer as tokenizers
from lm import quantize as int8

if TYPE_CHECKING:
    from lm.model import Transformer


# ---------------------------------------------------------------------------------------------
# The sampler

TOP_LOGPROBS = 20  # the most alternatives a caller can ask for per token (OpenAI's limit)


def temperature_scale(logits_bv: jax.Array, temperature_b: jax.Array) -> jax.Array:
    """logits / temperature per row (rows at temperature 0 are left as they are: greedy)."""
    t = jnp.where(temperature_b > 0, temperature_b, 1.0)[:, None]
    return logits_bv / t


def top_k_mask(logits_bv: jax.Array, k_b: jax.Array) -> jax.Array:
    """Keeps each row's k largest logits (ties at the k-th included), -inf elsewhere; k <= 0
    keeps all."""
    v = logits_bv.shape[-1]
    k = jnp.where(k_b > 0, jnp.minimum(k_b, v), v)
    kth = jnp.take_along_axis(jnp.sort(logits_bv, axis=-1)[:, ::-1], (k - 1)[:, None], axis=-1)
    return jnp.where(logits_bv >= kth, logits_bv, -jnp.inf)


def top_p_mask(logits_bv: jax.Array, p_b: jax.Array) -> jax.Array:
    """Nucleus: keeps each row's most likely tokens whose probabilities, in decreasing order,
    first reach p (the token that crosses p included), -inf elsewhere; p >= 1 keeps all."""
    order = jnp.argsort(-logits_bv, axis=-1)
    sorted_logits = jnp.take_along_axis(logits_bv, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    keep_sorted = (before < p_b[:, None]) | (p_b[:, None] >= 1.0)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits_bv.shape[0])[:, None], order].set(
        keep_sorted)
    return jnp.where(keep, logits_bv, -jnp.inf)


def sample_tokens(logits_bv, keys_b, temperature_b, top_k_b, top_p_b) -> jax.Array:
    """One token per row: greedy where temperature is 0, else a draw from the temperature-scaled
    logits restricted to the top-k and then the top-p set, with each row's own key."""
    logits_bv = logits_bv.astype(jnp.float32)
    greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def draw(logits_bv):
        # The masks sort the vocabulary: skipped (lax.cond) when no row asks for them.
        scaled = temperature_scale(logits_bv, temperature_b)
        scaled = jax.lax.cond(jnp.any(top_k_b > 0), top_k_mask, lambda x, _: x, scaled, top_k_b)
        scaled = jax.lax.cond(jnp.any(top_p_b < 1), top_p_mask, lambda x, _: x, scaled, top_p_b)
        drawn = jax.vmap(jax.random.categorical)(keys_b, scaled).astype(jnp.int32)
        return jnp.where(temperature_b > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature_b > 0), draw, lambda _: greedy, logits_bv)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per request. temperature 0 is greedy; top_k 0 and top_p 1 are off; generation stops at
    max_new_tokens, at a token in stop_ids (not returned) or at a stop string (the text is cut
    before it).

    Before temperature / top-k / top-p (and before the argmax of a greedy request), the logits
    get, in this order: `logit_bias` ((token id, bias) pairs, added; a later pair for the same
    id replaces an earlier one), `repetition_penalty` (HF / CTRL: a token in the prompt or
    generated so far has a positive logit divided by it, a negative one multiplied; 1 is off),
    then minus `frequency_penalty` x the token's count among the generated tokens and minus
    `presence_penalty` if that count is > 0 (OpenAI; 0 is off). `logprobs`: how many of the
    most likely alternatives to return per token (0..TOP_LOGPROBS; the chosen token's logprob
    always comes back). Logprobs are of the model's raw distribution: the log-softmax of its
    logits before bias, penalties and temperature (vLLM's default, "raw_logprobs")."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int = 0


def check_sampling(sp: SamplingParams, vocab_size: int) -> None:
    """ValueError for parameters the sampler cannot honour."""
    if not 0 <= sp.logprobs <= TOP_LOGPROBS:
        raise ValueError(f"logprobs must be in [0, {TOP_LOGPROBS}], got {sp.logprobs}")
    if not sp.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {sp.repetition_penalty}")
    bad = [t for t, _ in sp.logit_bias if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size}), got {bad[0]}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingRows:
    """The sampler's part of each row's SamplingParams, as arrays [b]."""
    seed_b: jax.Array  # uint32
    temperature_b: jax.Array  # float32, 0: greedy
    top_k_b: jax.Array  # int32, 0: off
    top_p_b: jax.Array  # float32, 1: off
    presence_b: jax.Array  # float32, 0: off
    frequency_b: jax.Array  # float32, 0: off
    repetition_b: jax.Array  # float32, 1: off
    biased_b: jax.Array  # bool: the row has a logit_bias (in PenaltyState.bias_bv)
    logprobs_b: jax.Array  # int32: top alternatives wanted, 0: none

    @classmethod
    def of(cls, sampling: list[SamplingParams], rows: int) -> "SamplingRows":
        """Row i samples as sampling[i]; rows beyond the list (padding, free slots) are greedy
        and unpenalized, so that the work they would need stays skipped for them."""
        sp = list(sampling) + [SamplingParams()] * (rows - len(sampling))
        column = lambda name, dtype: np.array([getattr(s, name) for s in sp], dtype)  # noqa: E731
        return cls(column("seed", np.uint32), column("temperature", np.float32),
                   column("top_k", np.int32), column("top_p", np.float32),
                   column("presence_penalty", np.float32),
                   column("frequency_penalty", np.float32),
                   column("repetition_penalty", np.float32),
                   np.array([bool(s.logit_bias) for s in sp]), column("logprobs", np.int32))

    def penalized(self) -> jax.Array:
        """Whether any row needs `apply_penalties` (its bias or a penalty is on)."""
        return jnp.any(self.biased_b | (self.repetition_b != 1) | (self.frequency_b != 0) |
                       (self.presence_b != 0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PenaltyState:
    """What the penalties and the bias read, per row [b, V]: it travels with the KV cache
    (`DecodeSlots`) or in the decode loop's carry (`Engine.generate`)."""
    counts_bv: jax.Array  # int32: the token's occurrences among the row's generated tokens
    prompt_bv: jax.Array  # bool: the token is in the row's prompt
    bias_bv: jax.Array  # float32: added to the row's logits

    @classmethod
    def start(cls, prompt_bv, bias_bv=None) -> "PenaltyState":
        """The state of rows with no generated token yet: `prompt_mask` [b, V] of their
        prompts, and their bias [b, V] (None: 0)."""
        bias = (jnp.zeros(prompt_bv.shape, jnp.float32) if bias_bv is None
                else jnp.asarray(bias_bv, jnp.float32))
        return cls(jnp.zeros(prompt_bv.shape, jnp.int32), prompt_bv, bias)

    def record(self, tokens_b) -> "PenaltyState":
        """The state after each row generated tokens_b [b] (a scatter-add of b ones)."""
        counts = self.counts_bv.at[jnp.arange(tokens_b.shape[0]), tokens_b].add(1)
        return dataclasses.replace(self, counts_bv=counts)


def prompt_mask(tokens_bp, lengths_b, vocab_size: int) -> jax.Array:
    """bool [b, V]: which tokens are in each right-padded prompt [b, p] (row i's first
    lengths_b[i] tokens are real)."""
    b, p = tokens_bp.shape
    real = jnp.arange(p)[None] < lengths_b[:, None]
    return jnp.zeros((b, vocab_size), bool).at[
        jnp.arange(b)[:, None], jnp.where(real, tokens_bp, vocab_size)].set(True, mode="drop")


def bias_rows(sampling: list[SamplingParams], rows: int, vocab_size: int) -> np.ndarray | None:
    """The dense logit bias [rows, V] of `sampling` (padding rows 0), or None when no request
    has one (then nothing of vocabulary size crosses to the device)."""
    if not any(sp.logit_bias for sp in sampling):
        return None
    dense = np.zeros((rows, vocab_size), np.float32)
    for i, sp in enumerate(sampling):
        for token, bias in dict(sp.logit_bias).items():
            dense[i, token] = bias
    return dense


def apply_penalties(logits_bv: jax.Array, state: PenaltyState, rows: SamplingRows) -> jax.Array:
    """The float32 logits [b, V] after each row's logit bias, repetition penalty (tokens of its
    prompt or generated so far) and frequency / presence penalties (generated tokens only), in
    that order (SamplingParams)."""
    logits = logits_bv.astype(jnp.float32) + state.bias_bv
    seen = state.prompt_bv | (state.counts_bv > 0)
    r = rows.repetition_b[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    counts = state.counts_bv.astype(jnp.float32)
    return (logits - rows.frequency_b[:, None] * counts
            - rows.presence_b[:, None] * (counts > 0).astype(jnp.float32))


def top_logprobs(logits_xv: jax.Array, lse_x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The TOP_LOGPROBS most likely ids [..., K] (best first) and their log-probabilities, of
    logits [..., V] whose logsumexp is lse_x (padded with id 0 and -inf if V < K)."""
    k = min(TOP_LOGPROBS, logits_xv.shape[-1])
    values, ids = jax.lax.top_k(logits_xv, k)
    pad = [(0, 0)] * (values.ndim - 1) + [(0, TOP_LOGPROBS - k)]
    return (jnp.pad(ids.astype(jnp.int32), pad),
            jnp.pad(values - lse_x[..., None], pad, constant_values=-jnp.inf))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampled:
    """One token per row and its logprobs, of the raw distribution (the model's log-softmax,
    before bias, penalties and temperature). The TOP_LOGPROBS alternatives come for the rows
    that asked for `logprobs` (computed only when one did); other rows get ids 0 and -inf. On
    the host (DecodeSlots) numpy arrays."""
    token_b: jax.Array  # int32 [b]
    logprob_b: jax.Array  # float32 [b]: the raw logprob of token_b
    top_ids_bk: jax.Array  # int32 [b, TOP_LOGPROBS], best first
    top_logprobs_bk: jax.Array  # float32 [b, TOP_LOGPROBS]


def sampled_with_logprobs(logits_bv, token_b, rows: SamplingRows) -> Sampled:
    """token_b [b] with its raw logprobs from the model's logits [b, V] (module docstring)."""
    logits_bv = logits_bv.astype(jnp.float32)
    lse_b = jax.nn.logsumexp(logits_bv, axis=-1)
    chosen_b = jnp.take_along_axis(logits_bv, token_b[:, None], axis=-1)[:, 0] - lse_b
    b = logits_bv.shape[0]
    none = lambda: (jnp.zeros((b, TOP_LOGPROBS), jnp.int32),  # noqa: E731
                    jnp.full((b, TOP_LOGPROBS), -jnp.inf, jnp.float32))
    ids, lps = jax.lax.cond(jnp.any(rows.logprobs_b > 0), lambda: top_logprobs(logits_bv, lse_b),
                            none)
    wanted = (rows.logprobs_b > 0)[:, None]  # others get none: the same in any batch
    return Sampled(token_b, chosen_b, jnp.where(wanted, ids, 0), jnp.where(wanted, lps, -jnp.inf))


def sample_next(logits_bv, counts_b, rows: SamplingRows, state: PenaltyState) -> Sampled:
    """Each row's counts_b[i]-th generated token [b] (with its logprobs) from its logits [b, V]
    after `apply_penalties` (skipped when no row needs it). Its key is (seed, counts_b[i])
    alone: the same token whatever batch or slot the row is in."""
    keys_b = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(rows.seed_b,
                                                                             counts_b)
    logits_bv = logits_bv.astype(jnp.float32)
    processed = jax.lax.cond(rows.penalized(), apply_penalties, lambda x, *_: x, logits_bv,
                             state, rows)
    token_b = sample_tokens(processed, keys_b, rows.temperature_b, rows.top_k_b, rows.top_p_b)
    return sampled_with_logprobs(logits_bv, token_b, rows)


def decode_and_sample(decode, cache, tokens_b, positions_b, counts_b, rows: SamplingRows,
                      state: PenaltyState):
    """The decode step of `Engine.generate` and of `DecodeSlots`: feeds each row its last token
    [b] at its position [b]; returns (its counts_b[i]-th token as a `Sampled`, cache, the
    penalty state with that token recorded). `decode(tokens_b, positions_b, cache) -> (logits
    [b, V], cache)` is `decode_step` on a model or an export."""
    cache_len = jax.tree.leaves(cache)[0].shape[sharding.KV_CACHE_LENGTH_AXIS]
    # A row past the cache's end (finished, or a free slot) rewrites the last position: its
    # tokens are ignored, and it must not write out of bounds.
    logits_bv, cache = decode(tokens_b, jnp.minimum(positions_b, cache_len - 1), cache)
    sampled = sample_next(logits_bv, counts_b, rows, state)
    return sampled, cache, state.record(sampled.token_b)


# ---------------------------------------------------------------------------------------------
# Stop strings and shapes


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` before the earliest stop string in it, and whether there was one."""
    cut = min((text.index(s) for s in stop if s in text), default=None)
    return (text, False) if cut is None else (text[:cut], True)


def text_of(ids: list[int], tokenizer, stop: tuple[str, ...] = ()) -> str:
    """The text of generated `ids`, cut before a stop string."""
    return cut_at_stop(tokenizer.decode(np.asarray(ids, np.int32)), stop)[0]


def _ids_through_stop(ids: list[int], stop: tuple[str, ...], tokenizer) -> list[int]:
    """The shortest prefix of `ids` whose text contains a stop string (all if none does)."""
    for j in range(1, len(ids) + 1):
        if cut_at_stop(tokenizer.decode(np.asarray(ids[:j], np.int32)), stop)[1]:
            return ids[:j]
    return ids


def default_stop_ids(tokenizer) -> tuple[int, ...]:
    """A generation ends at the end-of-document token (none without a tokenizer)."""
    return (tokenizer.eod_id,) if tokenizer is not None else ()


def _padded(rows: list[list[int]], shape: tuple[int, int], fill: int = 0) -> np.ndarray:
    """Ragged int rows, right-padded with `fill`, as an int32 array of `shape`."""
    out = np.full(shape, fill, np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def bucket(n: int) -> int:
    """The power of two >= n: batch, prompt and step counts are rounded up to one, so that few
    programs are compiled."""
    return 1 << max(0, int(n - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# The KV-cache engine


def _empty_cache(cfg, batch: int, length: int, dtype):
    # Imported here, not at the top: lm.export.load runs DecodeSlots and the sampler without
    # importing the model's code.
    from lm.model import init_cache
    return init_cache(cfg, batch, length, dtype)


def prefill(model: Transformer, tokens_bp, lengths_b, cache):
    """Writes right-padded prompts [b, p] (row i's first lengths_b[i] tokens are real) into
    an empty `cache`; returns the float32 logits [b, V] of each row's last prompt token and the
    cache."""
    b, p = tokens_bp.shape
    logits, cache = model.decode(tokens_bp, jnp.broadcast_to(jnp.arange(p), (b, p)), cache,
                                 logits_at=lengths_b - 1, empty=True)
    return logits[:, 0].astype(jnp.float32), cache


def decode_step(model: Transformer, tokens_b, positions_b, cache, layers=None):
    """One new token per row at its position; returns float32 logits [b, V] and the cache.
    `layers`: the model's `layer_states()`, once per decode loop."""
    logits, cache = model.decode(tokens_b[:, None], positions_b[:, None], cache, layers=layers)
    return logits[:, 0].astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "steps", "cache_dtype"))
def _generate(graphdef, params, prompt_bp, lengths_b, max_new_b, rows: SamplingRows,
              stop_ids_bs, bias_bv, cache_len: int, steps: int, cache_dtype: str):
    """Prefill, then decode until every row is done: the whole loop is one jitted while_loop
    (the penalty state in its carry). Returns the tokens [b, steps] (-1 after a row's end) and
    each row's count [b]."""
    model = nnx.merge(graphdef, params)
    b = prompt_bp.shape[0]
    cache = _empty_cache(model.cfg, b, cache_len, cache_dtype)
    logits_bv, cache = prefill(model, prompt_bp, lengths_b, cache)
    state = PenaltyState.start(prompt_mask(prompt_bp, lengths_b, model.cfg.vocab_size),
                               bias_bv)
    first_b = sample_next(logits_bv, jnp.zeros_like(lengths_b), rows, state).token_b
    state = state.record(first_b)
    decode = functools.partial(decode_step, model, layers=model.layer_states())

    def body(carry):
        i, token_b, out_bn, count_b, done_b, cache, state = carry  # token_b: row's i-th token
        stopped_b = jnp.any(token_b[:, None] == stop_ids_bs, axis=-1)
        live_b = ~done_b & ~stopped_b
        out_bn = out_bn.at[:, i].set(jnp.where(live_b, token_b, -1))
        count_b = count_b + live_b
        done_b = done_b | stopped_b | (count_b >= max_new_b)
        sampled, cache, state = decode_and_sample(decode, cache, token_b, lengths_b + i,
                                                  jnp.full_like(lengths_b, i + 1), rows, state)
        return i + 1, sampled.token_b, out_bn, count_b, done_b, cache, state

    init = (jnp.int32(0), first_b, jnp.full((b, steps), -1, jnp.int32), jnp.zeros(b, jnp.int32),
            max_new_b <= 0, cache, state)
    _, _, out_bn, count_b, _, _, _ = jax.lax.while_loop(
        lambda c: (c[0] < steps) & ~jnp.all(c[4]), body, init)
    # Replicated, so that every process can read them (rows are split over data x fsdp).
    return sharding.constrain(out_bn, (None, None)), sharding.constrain(count_b, (None,))


class Engine:
    """Batched generation with a KV cache for a model's parameters.

        engine = Engine(graphdef, params)            # or Engine.from_checkpoint(path)
        ids = engine.generate([[5, 6, 7], [9]], SamplingParams(max_new_tokens=20))
        slots = engine.slots(8)                      # continuous batching (lm.scheduler)

    Prompts of different lengths share one batch (right-padded; each row attends only to its
    own positions), each with its own sampling parameters. With a `mesh` (parameters
    sharded by `lm.sharding.RULES`, e.g. from `from_checkpoint(path, mesh)`) the batch and the
    KV cache rows are split over data x fsdp and the kv heads over tensor. `cache_dtype="int8"`
    keeps the KV cache in int8 (a scale per position and head)."""

    def __init__(self, graphdef, params, tokenizer=None, *, mesh=None, cache_dtype=None):
        self.graphdef, self.params, self.tokenizer, self.mesh = graphdef, params, tokenizer, mesh
        model = nnx.merge(graphdef, params)
        if not model.cfg.causal:
            raise ConfigError(f"a model.style {model.cfg.style!r} checkpoint is an encoder: it "
                              "does not generate text (`python -m lm.predict` fills its masked "
                              "tokens)")
        self.cfg, self.max_len = model.cfg, model.cfg.max_len
        self.cache_dtype = cache_dtype or model.precision.compute_dtype  # or "int8"
        self.row_multiple = 1 if mesh is None else sharding.devices_along(
            sharding.logical_to_spec(("batch",), sharding.RULES), mesh.shape)

    def replace(self, **changes) -> "Engine":
        """A copy with other params / tokenizer / mesh / cache_dtype (e.g. int8 weights)."""
        return Engine(self.graphdef, **dict(params=self.params, tokenizer=self.tokenizer,
                                            mesh=self.mesh, cache_dtype=self.cache_dtype) | changes)

    def context(self):
        """The mesh and the logical rules the model's constraints need (nothing on 1 device)."""
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nnx.logical_axis_rules(sharding.RULES))
        return stack

    @classmethod
    def from_checkpoint(cls, path: str, mesh=None, cache_dtype=None,
                        int8_weights: bool = False, fuse: bool = False) -> "Engine":
        """A training workdir (its latest checkpoint), its checkpoints/ or one checkpoints/STEP
        directory; the tokenizer from the workdir when it has one. With a `mesh` the parameters
        are restored sharded (tensor / fsdp as the training rules say) onto it; `int8_weights`:
        weight-only int8 matmul weights (`lm.quantize`); `fuse`: q, k, v and SwiGLU's gate and
        up as one matmul each (`lm.fuse`; a checkpoint loads as it was saved without)."""
        # orbax is slow to import, and lm.model stays out of lm.export.load's imports.
        from lm.checkpoint import load_params
        from lm.config import ConfigError
        from lm.model import abstract_model

        def abstract_for(run):
            if run is None:
                raise ConfigError(f"no config found for the checkpoint {path} (neither its "
                                  "config item nor WORKDIR/config.json)")
            _, abstract = abstract_model(run.model, run.precision, run.task)
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = (jax.tree.map(lambda _: one, abstract) if mesh is None
                         else sharding.param_shardings(abstract, mesh, sharding.RULES))
            return int8.for_model(run.model, jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                shardings))
        run, workdir, _, params = load_params(path, abstract_for)
        graphdef, _ = abstract_model(run.model, run.precision, run.task)
        if fuse:  # before int8_weights: lm.fuse concatenates float weights
            from lm.fuse import fuse as fuse_params
            graphdef, params = fuse_params(graphdef, params, mesh)
        params = int8.quantize(params) if int8_weights else params
        tok = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            tok = tokenizers.from_workdir(workdir)
        return cls(graphdef, params, tok, mesh=mesh, cache_dtype=cache_dtype)

    def check(self, prompts: list[list[int]], sampling: list[SamplingParams]) -> None:
        """ValueError naming the first prompt that cannot be generated."""
        if len(sampling) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling)} sampling parameters")
        for i, (ids, sp) in enumerate(zip(prompts, sampling)):
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            if len(ids) + sp.max_new_tokens > self.max_len:
                raise ValueError(f"prompt {i}: {len(ids)} tokens + max_new_tokens "
                                 f"{sp.max_new_tokens} exceed the model's context "
                                 f"({self.max_len})")
            if min(ids) < 0 or max(ids) >= self.cfg.vocab_size:
                raise ValueError(f"prompt {i}: token ids must be in [0, {self.cfg.vocab_size})")
            check_sampling(sp, self.cfg.vocab_size)

    def generate(self, prompts: list[list[int]],
                 sampling: SamplingParams | list[SamplingParams] = SamplingParams()
                 ) -> list[list[int]]:
        """The generated ids of each prompt (without the prompt, without a stop id)."""
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        self.check(prompts, sampling)
        n = len(prompts)
        b = bucket(max(n, self.row_multiple))
        p = min(bucket(max(len(x) for x in prompts)), self.max_len)
        steps = min(bucket(max(sp.max_new_tokens for sp in sampling)), self.max_len)
        prompt_bp = _padded(prompts, (b, p))
        stop_bs = _padded([sp.stop_ids for sp in sampling],
                          (b, max([len(sp.stop_ids) for sp in sampling] + [1])), -1)
        pad = lambda xs, fill: np.array(xs + [fill] * (b - n), np.int32)  # noqa: E731
        with self.context():
            out_bn, count_b = _generate(
                self.graphdef, self.params, prompt_bp, pad([len(x) for x in prompts], 1),
                pad([sp.max_new_tokens for sp in sampling], 0), SamplingRows.of(sampling, b),
                stop_bs, bias_rows(sampling, b, self.cfg.vocab_size),
                cache_len=min(self.max_len, bucket(p + steps)), steps=steps,
                cache_dtype=self.cache_dtype)
        out_bn, count_b = np.asarray(out_bn), np.asarray(count_b)
        result = [out_bn[i, :count_b[i]].tolist() for i in range(n)]
        if self.tokenizer is None:
            return result
        return [_ids_through_stop(ids, sp.stop, self.tokenizer) if sp.stop else ids
                for ids, sp in zip(result, sampling)]

    def prefill_fn(self, params, tokens_bp, lengths_b):
        """`prefill` into a fresh cache of max_len positions: what a slot (and an export)
        starts from. Returns (logits [b, V], cache)."""
        cache = _empty_cache(self.cfg, tokens_bp.shape[0], self.max_len, self.cache_dtype)
        return prefill(nnx.merge(self.graphdef, params), tokens_bp, lengths_b, cache)

    def decode_fn(self, params, tokens_b, positions_b, cache):
        """`decode_step` as a function of the parameters (for DecodeSlots and lm.export)."""
        return decode_step(nnx.merge(self.graphdef, params), tokens_b, positions_b, cache)

    def score_fn(self, params, tokens_bp, lengths_b):
        """Prompt logprobs from one full causal forward of right-padded prompts [b, p] (no
        cache; `lengths_b` is unused: padding after a token does not change its logits).
        Returns, at each position j > 0, the raw log-probability [b, p] of token j given the
        tokens before it and the TOP_LOGPROBS most likely ids [b, p, K] and log-probabilities
        predicted there; position 0 holds 0 (nothing predicts the first token)."""
        del lengths_b
        logits = nnx.merge(self.graphdef, params)(tokens_bp)[:, :-1].astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        chosen = jnp.take_along_axis(logits, tokens_bp[:, 1:, None], axis=-1)[..., 0] - lse
        ids, lps = top_logprobs(logits, lse)
        front = lambda x: jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        return front(chosen), front(ids), front(lps)

    def slots(self, num_slots: int, max_prefill_tokens: int = 4096) -> "DecodeSlots":
        """`num_slots` decode rows of one KV cache for continuous batching (rounded up to a
        multiple of the devices the batch is split over), with prompt scoring (`score`)."""
        num_slots = -(-num_slots // self.row_multiple) * self.row_multiple
        empty = jax.jit(lambda: _empty_cache(self.cfg, num_slots, self.max_len,
                                             self.cache_dtype))
        return DecodeSlots(self.prefill_fn, self.decode_fn, self.params, empty, self.context,
                           score_fn=self.score_fn, max_prefill_tokens=max_prefill_tokens)


# ---------------------------------------------------------------------------------------------
# Continuous batching


@dataclasses.dataclass
class Scored:
    """A prompt's logprobs (`DecodeSlots.score`, for echo): entry i is of token i given the
    tokens before it, from the raw distribution that predicted it, with its TOP_LOGPROBS most
    likely ids (best first) and their logprobs; entry 0 is None (nothing predicts it)."""
    token_logprobs: list[float | None]
    top_ids: list[list[int] | None]
    top_logprobs: list[list[float] | None]


def _set_rows(big, rows, index_r, axis: int):
    """`big` with its rows index_r[i] (along `axis`) replaced by rows[i]; an index out of range
    (a padding row) writes nothing."""
    at = (slice(None),) * axis + (index_r,)
    return big.at[at].set(rows.astype(big.dtype), mode="drop")


def _prefill_with_mask(prefill_fn, vocab_size: int, params, tokens_bp, lengths_b):
    """`prefill_fn`'s (logits, cache) and the prompts' `prompt_mask`: built here, in the
    program compiled per width, so that `_admit` compiles per rows bucket only."""
    logits_bv, cache = prefill_fn(params, tokens_bp, lengths_b)
    return logits_bv, cache, prompt_mask(tokens_bp, lengths_b, vocab_size)


def _admit(cache, state: PenaltyState, rows_cache, logits_rv, prompt_rv, slot_r,
           rows: SamplingRows, bias_rv):
    """Samples the first token of prefilled rows and moves them into their slots slot_r [r]
    (out of range for padding rows) of the big cache and penalty state. Returns (Sampled,
    cache, state)."""
    fresh = PenaltyState.start(prompt_rv, bias_rv)
    sampled = sample_next(logits_rv, jnp.zeros_like(slot_r), rows, fresh)
    fresh = fresh.record(sampled.token_b)
    cache = jax.tree.map(lambda c, r: _set_rows(c, r, slot_r, sharding.KV_CACHE_BATCH_AXIS),
                         cache, rows_cache)
    state = jax.tree.map(lambda s, f: _set_rows(s, f, slot_r, 0), state, fresh)
    return sampled, cache, state


def _on_host(tree):
    """Device arrays -> numpy (a Sampled for the caller)."""
    return jax.tree.map(np.asarray, tree)


BATCHED_MIN_WIDTH = 16  # the narrowest prefill of several prompts (DecodeSlots._width)


class DecodeSlots:
    """Continuous batching: the rows ("slots") of one preallocated KV cache, which requests
    enter (`insert_many`: one batched prefill into free rows) and leave while the others keep
    decoding (`step`: `decode_and_sample` for every row at once; free rows compute and are
    ignored). Each row's penalty state (`PenaltyState`) lives on the device beside the cache.

    prefill_fn(params, tokens [b, p], lengths [b]) -> (logits [b, V], a b-row cache) and
    decode_fn(params, tokens [s], positions [s], cache) -> (logits [s, V], cache) are the model's
    (`Engine.slots`) or the exported functions' (`lm.export.Exported.slots`); score_fn(params,
    tokens [b, p], lengths [b]) -> `Engine.score_fn`'s prompt logprobs (None: `score` refuses).
    A request's tokens equal what `Engine.generate` gives it alone: the same sampler and keys.

    A prefill is padded to the width bucket of its longest prompt (a power of two; at least
    BATCHED_MIN_WIDTH for several prompts) and to the rows bucket of its prompts (a power of
    two), at most `max_rows(width)`: the most rows, up to the slots, whose rows x width stay
    within `max_prefill_tokens`. A group of more prompts is split into several prefills (longest
    prompts first): "chunked when prompts are long", which bounds one prefill's memory and
    latency (one prompt alone always runs, whatever its length). Padding rows cost compute in
    proportion on a CPU: padding 2 prompts to max_rows(width) rows (an earlier form, fewer
    programs) made lm.serve 0.6x as fast as a prefill per prompt (bench/serve.py); a power of
    two at most doubles the rows."""

    def __init__(self, prefill_fn, decode_fn, params, empty_cache,
                 context=contextlib.nullcontext, *, score_fn=None, max_prefill_tokens: int = 4096):
        """`empty_cache()` makes the [layers, slots, max_len, ...] cache (again in `reset`)."""
        self.params, self.context, self._empty = params, context, empty_cache
        self.max_prefill_tokens = max_prefill_tokens
        abstract = jax.eval_shape(empty_cache)
        shape = jax.tree.leaves(abstract)[0].shape
        self.num_slots = shape[sharding.KV_CACHE_BATCH_AXIS]
        self.max_len = shape[sharding.KV_CACHE_LENGTH_AXIS]
        int_s = jax.ShapeDtypeStruct((self.num_slots,), jnp.int32)
        with context():
            self.vocab_size = jax.eval_shape(decode_fn, params, int_s, int_s,
                                             abstract)[0].shape[-1]
        self._empty_state = jax.jit(lambda: PenaltyState.start(
            jnp.zeros((self.num_slots, self.vocab_size), bool)))
        self.reset()
        self._prefill = jax.jit(functools.partial(_prefill_with_mask, prefill_fn,
                                                  self.vocab_size))
        self._step = jax.jit(lambda params, cache, state, *rest: decode_and_sample(
            functools.partial(decode_fn, params), cache, *rest, state), donate_argnums=(1, 2))
        self._admit = jax.jit(_admit, donate_argnums=(0, 1))
        self._score = None if score_fn is None else jax.jit(score_fn)

    def _width(self, n: int, batched: bool = False) -> int:
        """The prefill width of an n-token prompt (one compiled prefill per width); a batched
        prefill is at least BATCHED_MIN_WIDTH wide (fewer programs; padding short prompts costs
        little)."""
        return min(max(bucket(n), BATCHED_MIN_WIDTH if batched else 1), self.max_len)

    def max_rows(self, width: int) -> int:
        """The rows of a batched prefill of `width`: the largest power of two (at least 1, at
        most the slots' bucket) with rows x width <= max_prefill_tokens."""
        fit = max(1, self.max_prefill_tokens // width)
        return min(1 << (fit.bit_length() - 1), bucket(self.num_slots))

    def _rows(self, n: int, width: int) -> int:
        """The padded rows of a prefill of n prompts of (at most) `width`."""
        return min(bucket(n), self.max_rows(width))

    def _chunks(self, lengths: list[int]) -> list[list[int]]:
        """The prompts (indices into `lengths`) of each prefill: longest first, as many per
        prefill as `max_rows` of the longest one's width allows (at least one)."""
        chunks: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            longest = lengths[chunks[-1][0]] if chunks else 0
            if chunks and len(chunks[-1]) < self.max_rows(self._width(longest, batched=True)):
                chunks[-1].append(i)
            else:
                chunks.append([i])
        return chunks

    def _batch(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """One prefill's (or score's) tokens [rows, width], right-padded, and lengths [rows]
        (padding rows: one token)."""
        width = self._width(max(len(p) for p in prompts), batched=len(prompts) > 1)
        rows = self._rows(len(prompts), width)
        lengths = np.array([len(p) for p in prompts] + [1] * (rows - len(prompts)), np.int32)
        return _padded(prompts, (rows, width)), lengths

    def _check_prompts(self, prompts: list[list[int]], longest: int) -> None:
        for i, ids in enumerate(prompts):
            if not 0 < len(ids) <= longest:
                raise ValueError(f"prompt {i}: {len(ids)} tokens do not fit a context of "
                                 f"{self.max_len}")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise ValueError(f"prompt {i}: token ids must be in [0, {self.vocab_size})")

    def insert_many(self, slots: list[int], prompts: list[list[int]],
                    sampling: list[SamplingParams]) -> Sampled:
        """Prefills prompts[i] into row slots[i], as few batched prefills as max_prefill_tokens
        allows; returns their first tokens (row i: slots[i]'s) with logprobs, as numpy. Each
        first token is drawn with its request's key (seed, 0)."""
        if not len(slots) == len(prompts) == len(sampling) or not slots:
            raise ValueError(f"{len(slots)} slots, {len(prompts)} prompts and {len(sampling)} "
                             "sampling parameters: one each, at least one")
        if len(set(slots)) != len(slots) or not all(0 <= s < self.num_slots for s in slots):
            raise ValueError(f"slots must be distinct rows in [0, {self.num_slots}): {slots}")
        self._check_prompts(prompts, self.max_len - 1)
        for sp in sampling:
            check_sampling(sp, self.vocab_size)
        parts, order = [], []
        for chunk in self._chunks([len(p) for p in prompts]):
            parts.append(self._insert_chunk([slots[i] for i in chunk],
                                            [prompts[i] for i in chunk],
                                            [sampling[i] for i in chunk]))
            order += chunk
        where = np.argsort(order)  # row of each input among the chunks' concatenated rows
        return jax.tree.map(lambda *xs: np.concatenate(xs)[where], *parts)

    def _insert_chunk(self, slots, prompts, sampling) -> Sampled:
        """One prefill of prompts into their slots (padded: rows bucket x width bucket)."""
        n = len(prompts)
        tokens_rp, lengths_r = self._batch(prompts)
        rows = tokens_rp.shape[0]
        slot_r = np.array(list(slots) + [self.num_slots] * (rows - n), np.int32)  # pad: dropped
        with self.context():
            logits_rv, rows_cache, prompt_rv = self._prefill(self.params, tokens_rp, lengths_r)
            sampled, self.cache, self.state = self._admit(
                self.cache, self.state, rows_cache, logits_rv, prompt_rv, slot_r,
                SamplingRows.of(sampling, rows), bias_rows(sampling, rows, self.vocab_size))
        sampled = jax.tree.map(lambda x: x[:n], _on_host(sampled))
        for i, (slot, sp) in enumerate(zip(slots, sampling)):
            self.tokens[slot], self.positions[slot], self.counts[slot] = (
                sampled.token_b[i], len(prompts[i]), 1)
            self.sampling[slot] = sp
        return sampled

    def insert(self, slot: int, prompt: list[int], sp: SamplingParams) -> int:
        """Prefills `prompt` into row `slot`; returns its first generated token."""
        return int(self.insert_many([slot], [prompt], [sp]).token_b[0])

    def release(self, slot: int) -> None:
        """Marks a row free: greedy and unpenalized, so that the sampling masks and penalties
        are skipped while only such requests run (the row is still computed and ignored)."""
        self.sampling[slot] = SamplingParams()

    def reset(self) -> None:
        """A fresh cache, penalty state and free rows, after a failed step or insert (whose
        donated cache may be gone)."""
        with self.context():
            # Committed, as the step's donated outputs are: else the first insert and step
            # after a reset would compile again (commitment is part of jit's cache key).
            self.cache, self.state = jax.tree.map(lambda x: jax.device_put(x, x.sharding),
                                                  (self._empty(), self._empty_state()))
        self.sampling = [SamplingParams()] * self.num_slots  # free rows are greedy: `release`
        self.tokens = np.zeros(self.num_slots, np.int32)  # each row's last token
        self.positions = np.zeros(self.num_slots, np.int32)  # where it goes
        self.counts = np.zeros(self.num_slots, np.int32)  # tokens generated so far

    def step(self) -> Sampled:
        """Feeds every row its last token; returns each row's next token and its logprobs
        [num_slots], as numpy."""
        with self.context():
            sampled, self.cache, self.state = self._step(
                self.params, self.cache, self.state, jnp.asarray(self.tokens),
                jnp.asarray(self.positions), jnp.asarray(self.counts),
                SamplingRows.of(self.sampling, self.num_slots))
        sampled = _on_host(sampled)
        self.tokens = sampled.token_b.copy()
        self.positions += 1
        self.counts += 1
        return sampled

    @property
    def can_score(self) -> bool:
        """Whether `score` works (a checkpoint's slots; an export has no scoring function)."""
        return self._score is not None

    def score(self, prompts: list[list[int]]) -> list[Scored]:
        """Each prompt's logprobs (`Scored`), from full forwards without a cache, batched and
        split like `insert_many`'s prefills; the slots are untouched."""
        if self._score is None:
            raise ValueError("echo / prompt logprobs need a checkpoint; an export has no "
                             "scoring function")
        self._check_prompts(prompts, self.max_len)
        out: list[Scored | None] = [None] * len(prompts)
        for chunk in self._chunks([len(p) for p in prompts]):
            tokens_rp, lengths_r = self._batch([prompts[i] for i in chunk])
            with self.context():
                chosen, ids, lps = _on_host(self._score(self.params, tokens_rp, lengths_r))
            for row, i in enumerate(chunk):
                n = len(prompts[i])
                out[i] = Scored([None] + chosen[row, 1:n].tolist(),
                                [None] + ids[row, 1:n].tolist(),
                                [None] + lps[row, 1:n].tolist())
        return out

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, width) a prefill of insert_many (or a `score`) can have: one row of any
        width bucket, or 2, 4, ... up to `max_rows(width)` rows of a batched width."""
        shapes = set()
        for w in {self._width(n) for n in range(1, self.max_len + 1)}:
            shapes.add((1, w))
            batched = self._width(w, batched=True)
            rows = 2
            while rows <= self.max_rows(batched):
                shapes.add((rows, batched))
                rows *= 2
        return sorted(shapes)

    def warm_up(self, score: bool = False) -> None:
        """Compiles every prefill shape (`prefill_shapes`), the decode step and, with `score`,
        every scoring shape (before a server's first request), then frees the rows."""
        for rows, width in self.prefill_shapes():
            n = 1 if rows == 1 else min(rows, self.num_slots)
            # A prompt fills max_len - 1 positions at most: max_len wide may be a score's only.
            if width == self._width(min(width, self.max_len - 1), batched=n > 1):
                self.insert_many(list(range(n)), [[0] * min(width, self.max_len - 1)] * n,
                                 [SamplingParams()] * n)
            if score and self._score is not None:
                self.score([[0] * width] * n)
        self.step()
        self.reset()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm.generate",
                                     description="Generate text from a checkpoint.")
    parser.add_argument("--checkpoint", required=True,
                        help="a training workdir (its latest checkpoint) or one checkpoint dir")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="text, encoded with the workdir's tokenizer")
    group.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none",
                        help="int8: weight-only int8 matmul weights (lm.quantize)")
    parser.add_argument("--kv-cache", choices=["auto", "int8"], default="auto",
                        help="int8: int8 KV cache (auto: the model's compute dtype)")
    parser.add_argument("--fuse", action="store_true",
                        help="q, k, v and the SwiGLU gate and up as one matmul each (lm.fuse)")
    parser.add_argument("--json", action="store_true",
                        help="print {token_ids (generated only), text} as one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens <= 0:
            raise ConfigError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
        if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
            raise ConfigError("--temperature must be >= 0, --top-k >= 0 and --top-p in (0, 1]")
        engine = Engine.from_checkpoint(args.checkpoint, int8_weights=args.quantize == "int8",
                                        cache_dtype="int8" if args.kv_cache == "int8" else None,
                                        fuse=args.fuse)
        tok = engine.tokenizer
        if args.prompt_ids is not None:
            try:
                prompt = [int(x) for x in args.prompt_ids.split(",")]
            except ValueError:
                raise ConfigError(f"--prompt-ids must be comma-separated integers, got "
                                  f"{args.prompt_ids!r}") from None
        else:
            if tok is None:
                raise ConfigError(f"no tokenizer found for {args.checkpoint}: use --prompt-ids")
            prompt = [int(x) for x in tok.encode_prompt(args.prompt)]
        sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            stop_ids=default_stop_ids(tok), stop=tuple(args.stop))
        ids = engine.generate([prompt], sp)[0]
    except (ConfigError, ValueError) as e:
        print(f"lm.generate: error: {e}", file=sys.stderr)
        sys.exit(2)
    text = text_of(ids, tok, sp.stop) if tok is not None else None
    if args.json:
        print(json.dumps({"token_ids": ids, "text": text}))
    else:
        print(text if text is not None else " ".join(map(str, ids)))


if __name__ == "__main__":
    main()
