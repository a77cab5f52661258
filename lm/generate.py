"""Generating text: one decode step with its sampler, run by a KV-cache engine and by
continuous-batching slots.

    python -m lm.generate --checkpoint DIR (--prompt TEXT | --prompt-ids 1,2,3)
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--json]

checkpoint -> `Engine` -> `Engine.generate` (an offline batch: prefill, then one jitted
`while_loop`) or `Engine.slots` -> `DecodeSlots` (rows of one cache that requests enter and
leave; `lm.scheduler` drives them for `lm.serve`). Both decode with `decode_and_sample`, each
row with its own temperature, top-k, top-p and seed, and draw a request's token i with the key
(seed, i): the same tokens in any batch or slot.
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
from lm.quantize import quantize

if TYPE_CHECKING:
    from lm.model import Transformer


# ---------------------------------------------------------------------------------------------
# The sampler


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
    before it)."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingRows:
    """The sampler's part of each row's SamplingParams, as arrays [b]."""
    seed_b: jax.Array  # uint32
    temperature_b: jax.Array  # float32, 0: greedy
    top_k_b: jax.Array  # int32, 0: off
    top_p_b: jax.Array  # float32, 1: off

    @classmethod
    def of(cls, sampling: list[SamplingParams], rows: int) -> "SamplingRows":
        """Row i samples as sampling[i]; rows beyond the list (padding, free slots) are greedy,
        so that the masks that sort the vocabulary stay skipped for them."""
        sp = list(sampling) + [SamplingParams()] * (rows - len(sampling))
        return cls(np.array([s.seed for s in sp], np.uint32),
                   np.array([s.temperature for s in sp], np.float32),
                   np.array([s.top_k for s in sp], np.int32),
                   np.array([s.top_p for s in sp], np.float32))


def sample_next(logits_bv, counts_b, rows: SamplingRows) -> jax.Array:
    """Each row's counts_b[i]-th generated token [b] from its logits [b, V]. Its key is
    (seed, counts_b[i]) alone: the same token whatever batch or slot the row is in."""
    keys_b = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(rows.seed_b,
                                                                             counts_b)
    return sample_tokens(logits_bv, keys_b, rows.temperature_b, rows.top_k_b, rows.top_p_b)


def decode_and_sample(decode, cache, tokens_b, positions_b, counts_b, rows: SamplingRows):
    """The decode step of `Engine.generate` and of `DecodeSlots`: feeds each row its last token
    [b] at its position [b]; returns (its counts_b[i]-th token [b], cache). `decode(tokens_b,
    positions_b, cache) -> (logits [b, V], cache)` is `decode_step` on a model or an export."""
    cache_len = jax.tree.leaves(cache)[0].shape[sharding.KV_CACHE_LENGTH_AXIS]
    # A row past the cache's end (finished, or a free slot) rewrites the last position: its
    # tokens are ignored, and it must not write out of bounds.
    logits_bv, cache = decode(tokens_b, jnp.minimum(positions_b, cache_len - 1), cache)
    return sample_next(logits_bv, counts_b, rows), cache


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
              stop_ids_bs, cache_len: int, steps: int, cache_dtype: str):
    """Prefill, then decode until every row is done: the whole loop is one jitted while_loop.
    Returns the tokens [b, steps] (-1 after a row's end) and each row's count [b]."""
    model = nnx.merge(graphdef, params)
    b = prompt_bp.shape[0]
    cache = _empty_cache(model.cfg, b, cache_len, cache_dtype)
    logits_bv, cache = prefill(model, prompt_bp, lengths_b, cache)
    first_b = sample_next(logits_bv, jnp.zeros_like(lengths_b), rows)
    decode = functools.partial(decode_step, model, layers=model.layer_states())

    def body(carry):
        i, token_b, out_bn, count_b, done_b, cache = carry  # token_b: each row's i-th token
        stopped_b = jnp.any(token_b[:, None] == stop_ids_bs, axis=-1)
        live_b = ~done_b & ~stopped_b
        out_bn = out_bn.at[:, i].set(jnp.where(live_b, token_b, -1))
        count_b = count_b + live_b
        done_b = done_b | stopped_b | (count_b >= max_new_b)
        token_b, cache = decode_and_sample(decode, cache, token_b, lengths_b + i,
                                           jnp.full_like(lengths_b, i + 1), rows)
        return i + 1, token_b, out_bn, count_b, done_b, cache

    init = (jnp.int32(0), first_b, jnp.full((b, steps), -1, jnp.int32), jnp.zeros(b, jnp.int32),
            max_new_b <= 0, cache)
    _, _, out_bn, count_b, _, _ = jax.lax.while_loop(
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
                        int8_weights: bool = False) -> "Engine":
        """A training workdir (its latest checkpoint), its checkpoints/ or one checkpoints/STEP
        directory; the tokenizer from the workdir when it has one. With a `mesh` the parameters
        are restored sharded (tensor / fsdp as the training rules say) onto it; `int8_weights`:
        weight-only int8 matmul weights (`lm.quantize`)."""
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
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
        run, workdir, _, params = load_params(path, abstract_for)
        graphdef, _ = abstract_model(run.model, run.precision, run.task)
        params = quantize(params) if int8_weights else params
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
                stop_bs, cache_len=min(self.max_len, bucket(p + steps)), steps=steps,
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

    def slots(self, num_slots: int) -> "DecodeSlots":
        """`num_slots` decode rows of one KV cache for continuous batching (rounded up to a
        multiple of the devices the batch is split over)."""
        num_slots = -(-num_slots // self.row_multiple) * self.row_multiple
        empty = jax.jit(lambda: _empty_cache(self.cfg, num_slots, self.max_len,
                                             self.cache_dtype))
        return DecodeSlots(self.prefill_fn, self.decode_fn, self.params, empty, self.context)


# ---------------------------------------------------------------------------------------------
# Continuous batching


class DecodeSlots:
    """Continuous batching: the rows ("slots") of one preallocated KV cache, which requests
    enter (`insert`: prefill into a free row) and leave while the others keep decoding
    (`step`: `decode_and_sample` for every row at once; free rows compute and are ignored).

    prefill_fn(params, tokens [1, p], lengths [1]) -> (logits [1, V], a one-row cache) and
    decode_fn(params, tokens [s], positions [s], cache) -> (logits [s, V], cache) are the model's
    (`Engine.slots`) or the exported functions' (`lm.export.Exported.slots`). A request's
    tokens equal what `Engine.generate` gives it alone: the same sampler and keys."""

    def __init__(self, prefill_fn, decode_fn, params, empty_cache,
                 context=contextlib.nullcontext):
        """`empty_cache()` makes the [layers, slots, max_len, ...] cache (again in `reset`)."""
        self.params, self.context, self._empty = params, context, empty_cache
        self.reset()
        self.tokens = np.zeros(self.num_slots, np.int32)  # each row's last token
        self.positions = np.zeros(self.num_slots, np.int32)  # where it goes
        self.counts = np.zeros(self.num_slots, np.int32)  # tokens generated so far
        self._prefill = jax.jit(prefill_fn)
        self._step = jax.jit(lambda params, cache, *rest: decode_and_sample(
            functools.partial(decode_fn, params), cache, *rest), donate_argnums=1)
        self._insert = jax.jit(lambda cache, row, slot: jax.tree.map(  # row: a one-row cache
            lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r.astype(c.dtype), slot,
                                                             sharding.KV_CACHE_BATCH_AXIS),
            cache, row), donate_argnums=0)
        self._sample = jax.jit(sample_next)

    def _width(self, n: int) -> int:
        """The prefill width of an n-token prompt (one compiled prefill per width)."""
        return min(bucket(n), self.max_len)

    def insert(self, slot: int, prompt: list[int], sp: SamplingParams) -> int:
        """Prefills `prompt` into row `slot`; returns its first generated token."""
        n = len(prompt)
        if not 0 < n < self.max_len:
            raise ValueError(f"a prompt of {n} tokens does not fit a context of {self.max_len}")
        tokens_1p = _padded([prompt], (1, self._width(n)))
        with self.context():
            logits_1v, row = self._prefill(self.params, jnp.asarray(tokens_1p),
                                           jnp.asarray([n], jnp.int32))
            self.cache = self._insert(self.cache, row, jnp.int32(slot))
            first = int(self._sample(logits_1v, jnp.zeros(1, jnp.int32),
                                     SamplingRows.of([sp], 1))[0])
        self.tokens[slot], self.positions[slot], self.counts[slot] = first, n, 1
        self.sampling[slot] = sp
        return first

    def release(self, slot: int) -> None:
        """Marks a row free: greedy, so that the sampling masks are skipped while only greedy
        requests run (the row is still computed and ignored)."""
        self.sampling[slot] = SamplingParams()

    def reset(self) -> None:
        """A fresh cache and free rows, after a failed step or insert (whose donated cache may
        be gone)."""
        with self.context():
            self.cache = self._empty()
        shape = jax.tree.leaves(self.cache)[0].shape
        self.num_slots = shape[sharding.KV_CACHE_BATCH_AXIS]
        self.max_len = shape[sharding.KV_CACHE_LENGTH_AXIS]
        self.sampling = [SamplingParams()] * self.num_slots  # free rows are greedy: `release`

    def step(self) -> np.ndarray:
        """Feeds every row its last token; returns each row's next token [num_slots]."""
        with self.context():
            nxt, self.cache = self._step(
                self.params, self.cache, jnp.asarray(self.tokens), jnp.asarray(self.positions),
                jnp.asarray(self.counts), SamplingRows.of(self.sampling, self.num_slots))
        self.tokens = np.array(nxt)
        self.positions += 1
        self.counts += 1
        return self.tokens.copy()

    def warm_up(self) -> None:
        """Compiles every prefill width and the decode step (before a server's first request),
        then frees the rows."""
        for width in sorted({self._width(n) for n in range(1, self.max_len)}):
            self.insert(0, [0] * min(width, self.max_len - 1), SamplingParams())
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
    parser.add_argument("--json", action="store_true",
                        help="print {token_ids (generated only), text} as one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens <= 0:
            raise ConfigError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
        if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
            raise ConfigError("--temperature must be >= 0, --top-k >= 0 and --top-p in (0, 1]")
        engine = Engine.from_checkpoint(args.checkpoint, int8_weights=args.quantize == "int8",
                                        cache_dtype="int8" if args.kv_cache == "int8" else None)
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
