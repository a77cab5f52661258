"""The sampler's penalties, logit bias and logprobs, and DecodeSlots' batched prefill and prompt
scoring (`lm.generate`)."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.generate import (TOP_LOGPROBS, DecodeSlots, Engine, PenaltyState, SamplingParams,
                         SamplingRows, apply_penalties, bias_rows, sample_next)


@pytest.fixture(scope="module")
def engine(trained_workdir):
    return Engine.from_checkpoint(str(trained_workdir))


@pytest.fixture(scope="module")
def slots8(engine):
    """One set of 8 slots for the module (each DecodeSlots compiles its own programs)."""
    return engine.slots(8)


def reference_penalties(logits, counts, prompt, sampling):
    """NumPy, one row and one token at a time: bias, repetition, frequency, presence."""
    out = logits.astype(np.float64).copy()
    for i, sp in enumerate(sampling):
        bias = dict(sp.logit_bias)
        for t in range(out.shape[1]):
            x = out[i, t] + bias.get(t, 0.0)
            if prompt[i, t] or counts[i, t] > 0:
                x = x / sp.repetition_penalty if x > 0 else x * sp.repetition_penalty
            x -= sp.frequency_penalty * counts[i, t] + sp.presence_penalty * (counts[i, t] > 0)
            out[i, t] = x
    return out


def state_of(counts, prompt, sampling):
    return PenaltyState(jnp.asarray(counts, jnp.int32), jnp.asarray(prompt),
                        bias_rows(sampling, len(sampling), counts.shape[1]))


def test_penalties_and_bias_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    b, v = 6, 50
    logits = rng.normal(size=(b, v)).astype(np.float32) * 3
    counts = rng.integers(0, 4, size=(b, v)) * (rng.random((b, v)) < 0.3)
    prompt = rng.random((b, v)) < 0.2
    sampling = [SamplingParams(),  # neutral: untouched
                SamplingParams(logit_bias=((3, 2.5), (7, -1.0), (3, 4.0))),  # the later 3 wins
                SamplingParams(repetition_penalty=1.7),
                SamplingParams(frequency_penalty=0.8),
                SamplingParams(presence_penalty=1.3, repetition_penalty=0.6),
                SamplingParams(frequency_penalty=-0.5, presence_penalty=0.4,
                               repetition_penalty=1.2, logit_bias=((int(np.argmax(logits[5])),
                                                                    -3.0), (11, 1.5)))]
    rows = SamplingRows.of(sampling, b)
    state = state_of(counts, prompt, sampling)
    want = reference_penalties(logits, counts, prompt, sampling)
    got = np.asarray(apply_penalties(jnp.asarray(logits), state, rows))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got[0], logits[0])
    assert got[1, 3] == pytest.approx(logits[1, 3] + 4.0)
    # Greedy rows take the argmax of the processed logits.
    sampled = sample_next(jnp.asarray(logits), jnp.zeros(b, jnp.int32), rows, state)
    np.testing.assert_array_equal(np.asarray(sampled.token_b), want.argmax(-1))
    assert (want.argmax(-1) != logits.argmax(-1)).any()
    # With no row penalized the processing is skipped: the raw argmax.
    plain = SamplingRows.of([SamplingParams()] * b, b)
    tokens = sample_next(jnp.asarray(logits), jnp.zeros(b, jnp.int32), plain, state).token_b
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))


def test_logit_bias_forces_a_token_and_forbids_the_argmax():
    rng = np.random.default_rng(1)
    v = 64
    logits = jnp.asarray(rng.normal(size=(4, v)).astype(np.float32))
    best = np.asarray(logits).argmax(-1)
    worst = np.asarray(logits).argmin(-1)  # outside any top-k / top-p set before the bias
    second = np.argsort(-np.asarray(logits), axis=-1)[:, 1]
    sampling = [SamplingParams(logit_bias=((int(worst[0]), 100.0),)),
                SamplingParams(temperature=1.0, top_k=5, top_p=0.9, seed=3,
                               logit_bias=((int(worst[1]), 100.0),)),
                SamplingParams(logit_bias=((int(best[2]), -100.0),)),
                SamplingParams(temperature=1.0, seed=4, logit_bias=((int(best[3]), -100.0),))]
    rows = SamplingRows.of(sampling, 4)
    state = PenaltyState.start(jnp.zeros((4, v), bool), bias_rows(sampling, 4, v))
    sample = jax.jit(sample_next)
    for count in range(20):  # whatever the key
        token = np.asarray(sample(logits, jnp.full(4, count, jnp.int32), rows,
                                       state).token_b)
        assert token[0] == worst[0] and token[1] == worst[1]
        assert token[2] == second[2] and token[3] != best[3]


def max_repeats(ids):
    return max(collections.Counter(ids).values())


def test_penalized_requests_engine_equals_slots_and_frequency_penalty_repeats_less(engine,
                                                                                   slots8):
    tok = engine.tokenizer
    prompt = [int(t) for t in tok.encode("def main(")]
    prompts = [prompt, [int(t) for t in tok.encode("import os\n")], prompt, prompt]
    n = 12
    sampling = [SamplingParams(max_new_tokens=n, temperature=0.9, top_k=30, seed=7,
                               frequency_penalty=0.5, presence_penalty=0.3,
                               repetition_penalty=1.3, logit_bias=((100, 2.0), (32, -1.5))),
                SamplingParams(max_new_tokens=n, repetition_penalty=1.5,
                               logit_bias=((101, 1.0),)),
                SamplingParams(max_new_tokens=n),
                SamplingParams(max_new_tokens=n, frequency_penalty=2.0)]
    want = engine.generate(prompts, sampling)
    assert all(len(ids) == n for ids in want)

    slots8.reset()
    where = [6, 1, 4, 2]
    got = [[int(t)] for t in slots8.insert_many(where, prompts, sampling).token_b]
    for _ in range(n - 1):
        tokens = slots8.step().token_b
        for ids, slot in zip(got, where):
            ids.append(int(tokens[slot]))
    assert got == want

    plain, penalized = want[2], want[3]
    assert penalized != plain
    assert max_repeats(penalized) < max_repeats(plain), (plain, penalized)


def test_score_equals_the_full_forward_and_batches_equal_one_by_one(engine, slots8):
    model = nnx.merge(engine.graphdef, engine.params)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, engine.cfg.vocab_size, n).tolist() for n in (5, 12, 3, 2)]
    batch = slots8.score(prompts)
    for prompt, scored in zip(prompts, batch):
        alone = slots8.score([prompt])[0]  # other shapes: equal to float32 rounding
        assert scored.top_ids == alone.top_ids
        np.testing.assert_allclose(scored.token_logprobs[1:], alone.token_logprobs[1:],
                                   atol=1e-5)
        np.testing.assert_allclose(scored.top_logprobs[1:], alone.top_logprobs[1:], atol=1e-5)
        lp = np.asarray(jax.nn.log_softmax(model(jnp.asarray([prompt])).astype(jnp.float32)))[0]
        n = len(prompt)
        assert scored.token_logprobs[0] is None and scored.top_ids[0] is None
        assert scored.top_logprobs[0] is None and len(scored.token_logprobs) == n
        want = lp[np.arange(n - 1), prompt[1:]]
        np.testing.assert_allclose(scored.token_logprobs[1:], want, atol=1e-4)
        values, ids = jax.lax.top_k(jnp.asarray(lp[:n - 1]), TOP_LOGPROBS)
        assert scored.top_ids[1:] == np.asarray(ids).tolist()
        np.testing.assert_allclose(scored.top_logprobs[1:], np.asarray(values), atol=1e-4)
    # Without a scoring function (an export's slots) score refuses.
    bare = DecodeSlots(engine.prefill_fn, engine.decode_fn, engine.params,
                       lambda: slots8._empty())
    with pytest.raises(ValueError, match="an export has no scoring function"):
        bare.score(prompts)


def test_insert_many_equals_single_inserts(engine, slots8):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, engine.cfg.vocab_size, n).tolist() for n in (3, 9, 17, 1, 6)]
    where = [0, 2, 3, 5, 7]
    sampling = [SamplingParams(logprobs=5),
                SamplingParams(temperature=0.8, seed=1, logprobs=2),
                SamplingParams(temperature=1.0, seed=2, repetition_penalty=1.2,
                               frequency_penalty=0.5),
                SamplingParams(logit_bias=((5, 3.0),)),
                SamplingParams()]

    def run(insert):
        slots8.reset()
        first = insert()
        steps = [slots8.step().token_b[where].tolist() for _ in range(4)]
        return first, steps

    many, many_steps = run(lambda: slots8.insert_many(where, prompts, sampling))
    singles = []
    one, one_steps = run(lambda: singles.extend(
        slots8.insert_many([s], [p], [sp]) for s, p, sp in zip(where, prompts, sampling)))
    assert many.token_b.tolist() == [int(s.token_b[0]) for s in singles]
    np.testing.assert_allclose(many.logprob_b, [s.logprob_b[0] for s in singles], atol=1e-5)
    np.testing.assert_allclose(many.top_logprobs_bk, [s.top_logprobs_bk[0] for s in singles],
                               atol=1e-5)
    assert many.top_ids_bk.tolist() == [s.top_ids_bk[0].tolist() for s in singles]
    assert many_steps == one_steps
    # `insert` is a one-row insert_many.
    slots8.reset()
    assert slots8.insert(where[1], prompts[1], sampling[1]) == many.token_b[1]


def test_prefills_are_chunked_by_the_token_budget(slots8):
    budget = slots8.max_prefill_tokens
    try:
        slots8.max_prefill_tokens = 64
        # 40 tokens: 64 wide, alone; 30 and 20: 32 wide, 2 rows; 5 and 3: 16 wide, 2 of at
        # most 4 rows.
        assert slots8._chunks([40, 3, 20, 30, 5]) == [[0], [3, 2], [4, 1]]
        assert slots8._batch([[0] * 5, [0] * 3])[0].shape == (2, 16)
        assert slots8._batch([[0] * 5, [0] * 3, [0]])[0].shape == (4, 16)
        assert slots8.prefill_shapes() == [(1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (1, 32),
                                           (1, 64), (2, 16), (2, 32), (4, 16)]
        # Whatever the group, every prefill has a shape warm_up compiles.
        rng = np.random.default_rng(4)
        for budget_now in (64, 4096):
            slots8.max_prefill_tokens = budget_now
            shapes = set(slots8.prefill_shapes())
            for _ in range(200):
                lengths = rng.integers(1, slots8.max_len, rng.integers(1, 9)).tolist()
                for chunk in slots8._chunks(lengths):
                    tokens, _ = slots8._batch([[0] * lengths[i] for i in chunk])
                    assert tokens.shape in shapes, (lengths, chunk, tokens.shape)
    finally:
        slots8.max_prefill_tokens = budget
    assert slots8._chunks([40, 3, 20, 30, 5]) == [[0, 3, 2, 4, 1]]


def test_a_reset_compiles_nothing_again(engine, slots8):
    """reset() commits its fresh arrays as the step's outputs are: no second program."""
    sp = [SamplingParams()]
    slots8.reset()
    assert all(x.committed for x in jax.tree.leaves((slots8.cache, slots8.state)))
    slots8.insert_many([0], [[1, 2, 3]], sp)
    slots8.step()
    sizes = slots8._admit._cache_size(), slots8._step._cache_size()
    slots8.reset()
    slots8.insert_many([0], [[1, 2, 3]], sp)
    slots8.step()
    assert (slots8._admit._cache_size(), slots8._step._cache_size()) == sizes


def test_step_logprobs_are_the_raw_decode_distribution(engine, slots8):
    decode = jax.jit(engine.decode_fn)
    slots8.reset()
    prompts = [[5, 6, 7], [9, 10], [100, 101, 32, 40]]
    sampling = [SamplingParams(logprobs=3), SamplingParams(temperature=1.0, seed=5, logprobs=1),
                SamplingParams(temperature=0.7, seed=6)]
    slots8.insert_many([0, 1, 2], prompts, sampling)
    for _ in range(3):
        cache = jax.tree.map(jnp.copy, slots8.cache)  # step donates the cache
        logits, _ = decode(engine.params, jnp.asarray(slots8.tokens),
                           jnp.minimum(jnp.asarray(slots8.positions), slots8.max_len - 1), cache)
        lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
        sampled = slots8.step()
        rows = np.arange(slots8.num_slots)
        np.testing.assert_allclose(sampled.logprob_b, lp[rows, sampled.token_b], atol=1e-5)
        assert sampled.top_ids_bk[0, 0] == sampled.token_b[0]  # greedy, unpenalized
        asked = [0, 1]  # the rows with logprobs > 0; the others get none
        want = np.sort(lp[asked], axis=-1)[:, ::-1][:, :TOP_LOGPROBS]
        np.testing.assert_allclose(sampled.top_logprobs_bk[asked], want, atol=1e-5)
        np.testing.assert_allclose(lp[np.array(asked)[:, None], sampled.top_ids_bk[asked]],
                                   want, atol=1e-5)
        assert (sampled.top_logprobs_bk[2:] == -np.inf).all()
        assert (sampled.top_ids_bk[2:] == 0).all()
