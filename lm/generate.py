"""Generating text: a KV-cache engine and the sampling pieces it is made of.

    python -m lm.generate --checkpoint DIR (--prompt TEXT | --prompt-ids 1,2,3)
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--json]

`Engine.generate` prefills a batch of prompts of different lengths into a preallocated KV cache
and decodes with one jitted `while_loop` until every request is done, each request with its own
temperature, top-k, top-p, seed, stop ids and max_new_tokens. `temperature_scale`,
`top_k_mask`, `top_p_mask` and `sample_tokens` are the separately tested pieces.

`sample` is the simple path kept for the end-of-training sample: it reruns the causal forward
over a fixed [B, max_len] buffer for each new token (no cache).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.model import Transformer, init_cache


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


# ---------------------------------------------------------------------------------------------
# The KV-cache engine


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


def prefill(model: Transformer, tokens_bp, lengths_b, cache):
    """Writes right-padded prompts [b, p] (row i's first lengths_b[i] tokens are real) into
    `cache`; returns the float32 logits [b, V] of each row's last prompt token and the cache."""
    b, p = tokens_bp.shape
    logits, cache = model.decode(tokens_bp, jnp.broadcast_to(jnp.arange(p), (b, p)), cache,
                                 logits_at=lengths_b - 1)
    return logits[:, 0].astype(jnp.float32), cache


def decode_step(model: Transformer, tokens_b, positions_b, cache):
    """One new token per row at its position; returns float32 logits [b, V] and the cache."""
    logits, cache = model.decode(tokens_b[:, None], positions_b[:, None], cache)
    return logits[:, 0].astype(jnp.float32), cache


def _keys(seeds_b, counts_b):
    """Row i's key for its counts_b[i]-th token: the same whatever batch or slot it is in."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds_b, counts_b)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "steps", "cache_dtype"))
def _generate(graphdef, params, prompt_bp, lengths_b, max_new_b, temperature_b, top_k_b,
              top_p_b, seeds_b, stop_ids_bs, cache_len: int, steps: int, cache_dtype=None):
    """Prefill, then decode until every row is done: the whole loop is one jitted while_loop."""
    model = nnx.merge(graphdef, params)
    b, p = prompt_bp.shape
    cache = init_cache(model.cfg, b, cache_len, cache_dtype)
    last_bv, cache = prefill(model, prompt_bp, lengths_b, cache)

    def body(carry):
        i, out_bn, count_b, done_b, last_bv, cache = carry
        token_b = sample_tokens(last_bv, _keys(seeds_b, jnp.full_like(seeds_b, i)),
                                temperature_b, top_k_b, top_p_b)
        stopped_b = jnp.any(token_b[:, None] == stop_ids_bs, axis=-1)
        live_b = ~done_b & ~stopped_b
        out_bn = out_bn.at[:, i].set(jnp.where(live_b, token_b, -1))
        count_b = count_b + live_b
        done_b = done_b | stopped_b | (count_b >= max_new_b)
        position_b = jnp.minimum(lengths_b + i, cache_len - 1)
        logits_bv, cache = decode_step(model, token_b, position_b, cache)
        return i + 1, out_bn, count_b, done_b, logits_bv, cache

    init = (jnp.int32(0), jnp.full((b, steps), -1, jnp.int32), jnp.zeros(b, jnp.int32),
            max_new_b <= 0, last_bv, cache)
    _, out_bn, count_b, _, _, _ = jax.lax.while_loop(
        lambda c: (c[0] < steps) & ~jnp.all(c[3]), body, init)
    return out_bn, count_b


class Engine:
    """Batched generation with a KV cache for a model's parameters.

        engine = Engine(graphdef, params)            # or Engine.from_checkpoint(path)
        ids = engine.generate([[5, 6, 7], [9]], SamplingParams(max_new_tokens=20))
        slots = engine.slots(8)                      # continuous batching (lm.serve)

    Prompts of different lengths share one batch (right-padded; each row attends only to its
    own positions), each with its own sampling parameters. Shapes are bucketed (batch and prompt
    length to powers of two) so that few programs are compiled. With a `mesh` (parameters
    sharded by `lm.sharding.RULES`, e.g. from `from_checkpoint(path, mesh)`) the batch and the
    KV cache rows are split over data x fsdp and the kv heads over tensor. `cache_dtype="int8"`
    keeps the KV cache in int8 (a scale per position and head)."""

    def __init__(self, graphdef, params, tokenizer=None, *, mesh=None, cache_dtype=None):
        self.graphdef, self.params, self.tokenizer = graphdef, params, tokenizer
        self.mesh, self.cache_dtype = mesh, cache_dtype
        self.cfg = graphdef.cfg if hasattr(graphdef, "cfg") else nnx.merge(graphdef, params).cfg
        self.max_len = self.cfg.max_len
        self.row_multiple = 1
        if mesh is not None:
            from lm import sharding
            self.row_multiple = sharding.devices_along(
                sharding.logical_to_spec(("batch",), sharding.RULES), mesh.shape)

    def replace(self, **changes) -> "Engine":
        """A copy with other params / tokenizer / mesh / cache_dtype (e.g. int8 weights)."""
        kw = dict(params=self.params, tokenizer=self.tokenizer, mesh=self.mesh,
                  cache_dtype=self.cache_dtype) | changes
        return Engine(self.graphdef, kw.pop("params"), kw.pop("tokenizer"), **kw)

    def context(self):
        """The mesh and the logical rules the model's constraints need (nothing on 1 device)."""
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            from lm import sharding
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nnx.logical_axis_rules(sharding.RULES))
        return stack

    @classmethod
    def from_checkpoint(cls, path: str, mesh=None, cache_dtype=None) -> "Engine":
        """A training workdir (its latest checkpoint), its checkpoints/ or one checkpoints/STEP
        directory; the tokenizer from the workdir when it has one. With a `mesh` the parameters
        are restored sharded (tensor / fsdp as the training rules say) onto it."""
        from lm import sharding
        from lm.checkpoint import restore_params, run_config_of
        from lm.data import tokenizer as tokenizers
        run, workdir = run_config_of(path)
        with nnx.logical_axis_rules(()):
            graphdef, abstract = nnx.split(nnx.eval_shape(
                lambda: Transformer(run.model, rngs=nnx.Rngs(0))))
        if mesh is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: one, abstract)
        else:
            shardings = sharding.param_shardings(abstract, mesh, sharding.RULES)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
        _, params = restore_params(path, abstract)
        tok = None
        try:
            tok = tokenizers.from_workdir(workdir)
        except (OSError, ValueError, KeyError):
            pass
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
        b = _bucket(max(n, self.row_multiple))
        p = min(_bucket(max(len(x) for x in prompts)), self.max_len)
        steps = max(sp.max_new_tokens for sp in sampling)
        steps = min(_bucket(steps), self.max_len)
        pad = lambda xs, fill: xs + [fill] * (b - n)
        prompt_bp = np.zeros((b, p), np.int32)
        for i, ids in enumerate(prompts):
            prompt_bp[i, :len(ids)] = ids
        stop_w = max([len(sp.stop_ids) for sp in sampling] + [1])
        stop_bs = np.full((b, stop_w), -1, np.int32)
        for i, sp in enumerate(sampling):
            stop_bs[i, :len(sp.stop_ids)] = sp.stop_ids
        with self.context():
            out_bn, count_b = _generate(
                self.graphdef, self.params, jnp.asarray(prompt_bp),
                jnp.asarray(pad([len(x) for x in prompts], 1), jnp.int32),
                jnp.asarray(pad([sp.max_new_tokens for sp in sampling], 0), jnp.int32),
                jnp.asarray(pad([sp.temperature for sp in sampling], 0.0), jnp.float32),
                jnp.asarray(pad([sp.top_k for sp in sampling], 0), jnp.int32),
                jnp.asarray(pad([sp.top_p for sp in sampling], 1.0), jnp.float32),
                jnp.asarray(pad([sp.seed for sp in sampling], 0), jnp.uint32),
                jnp.asarray(stop_bs), cache_len=min(self.max_len, _bucket(p + steps)),
                steps=steps,
                cache_dtype=self.cache_dtype)
        out_bn, count_b = np.asarray(out_bn), np.asarray(count_b)
        result = []
        for i, sp in enumerate(sampling):
            ids = [int(t) for t in out_bn[i] if t >= 0][:int(count_b[i])]
            if sp.stop and self.tokenizer is not None:
                ids = _cut_at_stop(ids, sp.stop, self.tokenizer)
            result.append(ids)
        return result

    def slots(self, num_slots: int) -> "DecodeSlots":
        """`num_slots` decode rows of one KV cache for continuous batching."""
        graphdef, cfg, dtype = self.graphdef, self.cfg, self.cache_dtype

        def prefill_fn(params, tokens_bp, lengths_b):
            cache = init_cache(cfg, tokens_bp.shape[0], cfg.max_len, dtype)
            return prefill(nnx.merge(graphdef, params), tokens_bp, lengths_b, cache)

        def decode_fn(params, tokens_b, positions_b, cache):
            return decode_step(nnx.merge(graphdef, params), tokens_b, positions_b, cache)

        num_slots = -(-num_slots // self.row_multiple) * self.row_multiple
        with self.context():
            empty = jax.jit(lambda: init_cache(cfg, num_slots, cfg.max_len, dtype))
        return DecodeSlots(prefill_fn, decode_fn, self.params, empty, self.context)


class DecodeSlots:
    """Continuous batching: the rows ("slots") of one preallocated KV cache, which requests
    enter (`insert`: prefill into a free row) and leave while the others keep decoding
    (`step`: one token for every row at once; rows nobody uses compute and are ignored).

    prefill_fn(params, tokens [1, p], lengths [1]) -> (logits [1, V], a one-row cache) and
    decode_fn(params, tokens [s], positions [s], cache) -> (logits [s, V], cache) are the model's
    (`Engine.slots`) or the exported functions' (`lm.export.Exported.slots`). A request's
    tokens equal what `Engine.generate` gives it alone: the same keys (seed, token index)."""

    def __init__(self, prefill_fn, decode_fn, params, empty_cache,
                 context=contextlib.nullcontext):
        """`empty_cache()` makes the [layers, slots, max_len, ...] cache (again after a
        failure: `reset`)."""
        self.params, self.context, self._empty = params, context, empty_cache
        with context():
            cache = self.cache = empty_cache()
        self.num_slots = jax.tree.leaves(cache)[0].shape[1]
        self.max_len = jax.tree.leaves(cache)[0].shape[2]
        s = self.num_slots
        self.tokens = np.zeros(s, np.int32)
        self.positions = np.zeros(s, np.int32)
        self.counts = np.zeros(s, np.int32)
        self.seeds = np.zeros(s, np.uint32)
        self.temperature = np.zeros(s, np.float32)
        self.top_k = np.zeros(s, np.int32)
        self.top_p = np.ones(s, np.float32)
        self._prefill = jax.jit(prefill_fn)

        def step(params, cache, tokens, positions, seeds, counts, temperature, top_k, top_p):
            logits, cache = decode_fn(params, tokens, positions, cache)
            return sample_tokens(logits, _keys(seeds, counts), temperature, top_k, top_p), cache

        def insert(cache, row, slot):
            return jax.tree.map(
                lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r.astype(c.dtype), slot, 1),
                cache, row)

        self._step = jax.jit(step, donate_argnums=1)
        self._insert = jax.jit(insert, donate_argnums=0)
        self._sample = jax.jit(lambda logits, seed, t, k, p: sample_tokens(
            logits, _keys(seed, jnp.zeros_like(seed)), t, k, p))

    def insert(self, slot: int, prompt: list[int], sp: SamplingParams) -> int:
        """Prefills `prompt` into row `slot`; returns its first generated token."""
        n = len(prompt)
        if not 0 < n < self.max_len:
            raise ValueError(f"a prompt of {n} tokens does not fit a context of {self.max_len}")
        tokens = np.zeros((1, min(_bucket(n), self.max_len)), np.int32)
        tokens[0, :n] = prompt
        with self.context():
            logits, row = self._prefill(self.params, jnp.asarray(tokens),
                                        jnp.asarray([n], jnp.int32))
            self.cache = self._insert(self.cache, row, jnp.int32(slot))
            first = int(self._sample(logits, jnp.asarray([sp.seed], jnp.uint32),
                                     jnp.asarray([sp.temperature], jnp.float32),
                                     jnp.asarray([sp.top_k], jnp.int32),
                                     jnp.asarray([sp.top_p], jnp.float32))[0])
        self.tokens[slot], self.positions[slot], self.counts[slot] = first, n, 1
        self.seeds[slot], self.temperature[slot] = sp.seed, sp.temperature
        self.top_k[slot], self.top_p[slot] = sp.top_k, sp.top_p
        return first

    def release(self, slot: int) -> None:
        """Marks a row free: greedy, so that the sampling masks are skipped while only greedy
        requests run (the row is still computed and ignored)."""
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = 0.0, 0, 1.0

    def reset(self) -> None:
        """A fresh cache and free rows, after a failed step or insert (whose donated cache may
        be gone)."""
        with self.context():
            self.cache = self._empty()
        for slot in range(self.num_slots):
            self.release(slot)

    def step(self) -> np.ndarray:
        """Feeds every row its last token; returns each row's next token [num_slots]."""
        with self.context():
            nxt, self.cache = self._step(
                self.params, self.cache, jnp.asarray(self.tokens),
                jnp.asarray(np.minimum(self.positions, self.max_len - 1)),
                jnp.asarray(self.seeds), jnp.asarray(self.counts),
                jnp.asarray(self.temperature), jnp.asarray(self.top_k),
                jnp.asarray(self.top_p))
        self.tokens = np.array(nxt)
        self.positions += 1
        self.counts += 1
        return self.tokens.copy()


def _bucket(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _cut_at_stop(ids: list[int], stop: tuple[str, ...], tokenizer) -> list[int]:
    """The shortest prefix of `ids` whose text contains a stop string, minus the tokens that
    complete it (the text is then cut before the stop string by `text_of`)."""
    for j in range(1, len(ids) + 1):
        text = tokenizer.decode(np.asarray(ids[:j]))
        if any(s in text for s in stop):
            return ids[:j]
    return ids


def text_of(ids: list[int], tokenizer, stop: tuple[str, ...] = ()) -> str:
    text = tokenizer.decode(np.asarray(ids, np.int32))
    for s in stop:
        if s in text:
            text = text[:text.index(s)]
    return text


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    import sys

    from lm.config import ConfigError
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
        engine = Engine.from_checkpoint(args.checkpoint,
                                        cache_dtype="int8" if args.kv_cache == "int8" else None)
        if args.quantize == "int8":
            from lm.quantize import quantize
            engine = engine.replace(params=quantize(engine.params))
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
                            stop_ids=(tok.eod_id,) if tok is not None else (),
                            stop=tuple(args.stop))
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
