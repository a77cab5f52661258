"""The KV-cache engine and its sampling pieces, and `python -m lm.generate`."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, small_run
from lm.generate import (Engine, SamplingParams, sample_tokens, temperature_scale, top_k_mask,
                         top_p_mask)
from lm.model import Transformer, init_cache


def greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    """The reference: rerun the whole causal forward for each new token and take its argmax."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    buf = np.zeros((1, len(prompt) + n), np.int32)  # one shape: one compile
    buf[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        # Causal: the zeros after position t - 1 do not change its logits.
        buf[0, t] = int(jnp.argmax(forward(state, buf)[0, t - 1]))
    return buf[0, len(prompt):].tolist()


def model_of(style):
    extra = {"model.style": "llama", "model.num_kv_heads": 2} if style == "llama" else {}
    return Transformer(small_run(**extra).model, rngs=nnx.Rngs(3))


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_kv_cached_decoding_equals_the_full_forward_pass(style):
    model = model_of(style)
    tokens = jax.random.randint(jax.random.key(1), (3, 20), 0, 300)
    full = model(tokens)
    # Rows with prompts of different lengths (5, 9, 12), right-padded into one prefill.
    lengths = np.array([5, 9, 12])
    prompt = np.where(np.arange(12)[None] < lengths[:, None], np.asarray(tokens[:, :12]), 0)
    cache = init_cache(model.cfg, 3, 32, "float32")
    logits, cache = model.decode(jnp.asarray(prompt), jnp.broadcast_to(jnp.arange(12), (3, 12)),
                                 cache)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(logits[row, :n], full[row, :n], atol=2e-5, rtol=1e-5)
    # Then each row decodes its own next tokens at its own positions.
    position = jnp.asarray(lengths)
    for _ in range(6):
        step_tokens = tokens[jnp.arange(3), position]
        logits, cache = model.decode(step_tokens[:, None], position[:, None], cache)
        np.testing.assert_allclose(logits[:, 0], full[jnp.arange(3), position], atol=2e-5,
                                   rtol=1e-5)
        position = position + 1


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_greedy_batch_of_different_lengths_equals_each_prompt_alone(style):
    model = model_of(style)
    engine = Engine(*nnx.split(model))
    prompts = [[5, 17, 3], [9, 9, 1, 4, 4, 8, 2, 11, 30], [100], [7, 7]]
    sp = SamplingParams(max_new_tokens=12)
    batch = engine.generate(prompts, sp)
    assert batch == [engine.generate([p], sp)[0] for p in prompts]
    assert all(len(ids) == 12 for ids in batch)
    # And the argmax of the full causal forward (no cache), one token at a time, agrees.
    assert batch[0] == greedy_without_cache(model, prompts[0], 12)


def test_per_request_parameters_stop_ids_and_seeds_in_one_batch():
    engine = Engine(*nnx.split(model_of("gpt2")))
    greedy = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=10))[0]
    stop_at = greedy[4]
    first = greedy.index(stop_at)
    out = engine.generate([[5, 6, 7], [5, 6, 7], [1, 2]], [
        SamplingParams(max_new_tokens=10, stop_ids=(stop_at,)),  # stops, without the stop id
        SamplingParams(max_new_tokens=3),
        SamplingParams(max_new_tokens=6, temperature=1.0, seed=4)])
    assert out[0] == greedy[:first] and out[1] == greedy[:3] and len(out[2]) == 6
    again = engine.generate([[1, 2]], SamplingParams(max_new_tokens=6, temperature=1.0, seed=4))
    assert again[0] == out[2]  # same seed, same output, whatever the batch
    seeds = {tuple(engine.generate([[1, 2]], SamplingParams(max_new_tokens=6, temperature=1.0,
                                                            seed=s))[0]) for s in range(5)}
    assert len(seeds) > 1
    with pytest.raises(ValueError, match="exceed the model's context"):
        engine.generate([[1] * 60], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.generate([[1, 999]], SamplingParams(max_new_tokens=4))


def test_top_k_and_top_p_never_sample_outside_their_sets():
    v, n = 40, 4000
    logits = jax.random.normal(jax.random.key(0), (v,)) * 2.0
    rows = jnp.broadcast_to(logits, (n, v))
    keys = jax.random.split(jax.random.key(1), n)
    ones = jnp.ones(n)
    probs = np.asarray(jax.nn.softmax(logits))
    order = np.argsort(-probs)

    top5 = set(order[:5].tolist())
    drawn = np.asarray(sample_tokens(rows, keys, ones, jnp.full(n, 5), ones))
    assert set(drawn.tolist()) <= top5 and len(set(drawn.tolist())) == 5
    # The frequencies follow the renormalised probabilities of the 5 (loose: 4000 draws).
    p5 = probs[order[:5]] / probs[order[:5]].sum()
    freq = np.array([(drawn == t).mean() for t in order[:5]])
    np.testing.assert_allclose(freq, p5, atol=0.04)

    cum = np.cumsum(probs[order])
    nucleus = set(order[:int(np.searchsorted(cum, 0.6) + 1)].tolist())
    drawn = np.asarray(sample_tokens(rows, keys, ones, jnp.zeros(n, jnp.int32),
                                     jnp.full(n, 0.6)))
    assert set(drawn.tolist()) <= nucleus and len(set(drawn.tolist())) == len(nucleus)
    # top-k then top-p; temperature 0 is the argmax whatever the key.
    drawn = np.asarray(sample_tokens(rows, keys, ones, jnp.full(n, 3), jnp.full(n, 0.6)))
    assert set(drawn.tolist()) <= (set(order[:3].tolist()) & nucleus)
    greedy = np.asarray(sample_tokens(rows, keys, jnp.zeros(n), jnp.zeros(n, jnp.int32), ones))
    assert (greedy == order[0]).all()


def test_the_sampling_pieces():
    logits = jnp.array([[1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 5.0]])
    np.testing.assert_allclose(temperature_scale(logits, jnp.array([2.0, 0.0])),
                               [[0.5, 1.5, 1.0, 1.5], [0.0, 0.0, 0.0, 5.0]])
    kept = np.isfinite(np.asarray(top_k_mask(logits, jnp.array([2, 0]))))
    assert kept.tolist() == [[False, True, False, True], [True, True, True, True]]
    # Row 0: the two tied 0.3995s reach 0.5 together (the one that crosses p is kept).
    kept = np.isfinite(np.asarray(top_p_mask(logits, jnp.array([0.5, 0.5]))))
    assert kept.tolist() == [[False, True, False, True], [False, False, False, True]]
    kept = np.isfinite(np.asarray(top_p_mask(logits, jnp.array([0.3, 1.0]))))
    assert kept.tolist() == [[False, True, False, False], [True, True, True, True]]


def test_generate_command_line(trained_workdir):
    def gen(*args):
        return subprocess.run([sys.executable, "-m", "lm.generate", *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=300)

    proc = gen("--checkpoint", str(trained_workdir), "--prompt", "def ", "--max-new-tokens", "5",
               "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert 1 <= len(out["token_ids"]) <= 5 and isinstance(out["text"], str)
    # Greedy is deterministic, and one checkpoint directory works as well as the workdir.
    again = gen("--checkpoint", str(trained_workdir / "checkpoints" / "2"), "--prompt-ids",
                "100,101,32", "--max-new-tokens", "4", "--json")
    assert again.returncode == 0, again.stderr[-2000:]
    same = gen("--checkpoint", str(trained_workdir), "--prompt-ids", "100,101,32",
               "--max-new-tokens", "4", "--json")
    assert json.loads(again.stdout)["token_ids"] == json.loads(same.stdout)["token_ids"]
    for bad, message in [(["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
                         (["--prompt-ids", "1,x"], "--prompt-ids"),
                         (["--prompt", "x" * 300], "exceed the model's context")]:
        proc = gen("--checkpoint", str(trained_workdir), *bad)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]
        assert "Traceback" not in proc.stderr
    proc = gen("--checkpoint", str(trained_workdir / "nothing"), "--prompt", "x")
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr


def test_exported_functions_run_in_a_fresh_process_and_match_the_engine(trained_workdir, tmp_path):
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "lm.export", "--checkpoint", str(trained_workdir),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    prompts = [[100, 101, 32, 40], [5, 6], [7]]
    script = ("import json, sys\n"
              "from lm.export import load\n"
              f"exported = load({str(out)!r})\n"
              f"ids = exported.generate({prompts!r}, 8)\n"
              "print(json.dumps({'ids': ids, 'model_imported': 'lm.model' in sys.modules}))\n")
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    got = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert not got["model_imported"]
    want = Engine.from_checkpoint(str(trained_workdir)).generate(prompts,
                                                         SamplingParams(max_new_tokens=8))
    assert got["ids"] == want


def test_sharded_engine_and_slots_equal_one_device():
    """A mesh of data 2 x tensor 2: the batch and the KV cache rows split over data, kv heads
    over tensor; the same tokens as one device, through generate and through decode slots."""
    from lm import sharding
    from lm.config import MeshConfig
    model = model_of("llama")
    single = Engine(*nnx.split(model))
    mesh = sharding.make_mesh(MeshConfig(data=2, tensor=2), jax.devices()[:4])
    graphdef, params = nnx.split(model)
    params = jax.device_put(params, sharding.param_shardings(params, mesh, sharding.RULES))
    sharded = Engine(graphdef, params, mesh=mesh)
    prompts = [[5, 17, 3], [9, 9, 1, 4, 4, 8, 2, 11, 30], [100]]
    sp = SamplingParams(max_new_tokens=8)
    assert sharded.generate(prompts, sp) == single.generate(prompts, sp)
    slots = sharded.slots(3)
    assert slots.num_slots == 4  # rounded up to the data ways
    spec = slots.cache["k"][0].sharding.spec
    assert spec[0] == "data" and spec[1] == "tensor", spec  # lm.sharding.KV_CACHE_AXES
    got = [slots.insert(i, p, sp) for i, p in enumerate(prompts)]
    for _ in range(7):
        got = [g if isinstance(g, list) else [g] for g in got]
        tokens = slots.step().token_b
        for i in range(3):
            got[i].append(int(tokens[i]))
    assert got == single.generate(prompts, sp)


def test_int8_kv_cache_matches_the_float_cache_closely():
    """int8 keys and values (a scale per position and kv head): logits within 2% of the
    float cache's scale, greedy tokens mostly equal, the cache ~3.8x smaller in fp32."""
    model = model_of("llama")
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 300)
    full = np.asarray(model(tokens))
    cache = init_cache(model.cfg, 2, 32, "int8")
    assert len(cache["k"]) == 2  # layers
    assert cache["k"][0].q.dtype == jnp.int8 and cache["k"][0].scale.shape == (2, 2, 32, 1)
    graphdef, state = nnx.split(model)
    decode = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s).decode(t, p, c))
    logits, cache = decode(state, tokens[:, :16], jnp.broadcast_to(jnp.arange(16), (2, 16)),
                           cache)
    for i in range(16, 24):
        step, cache = decode(state, tokens[:, i:i + 1], jnp.full((2, 1), i), cache)
        err = np.abs(np.asarray(step[:, 0]) - full[:, i]).max()
        assert err < 0.02 * np.abs(full[:, i]).max(), (i, err)
    float_bytes = sum(x.nbytes for x in
                      jax.tree.leaves(init_cache(model.cfg, 2, 32, "float32")))
    int8_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    assert int8_bytes < float_bytes / 3
    engine = Engine(*nnx.split(model))
    prompts = [[5, 17, 3], [9, 9, 1, 4, 4, 8, 2, 11, 30]]
    sp = SamplingParams(max_new_tokens=10)
    a, b = engine.generate(prompts, sp), engine.replace(cache_dtype="int8").generate(prompts, sp)
    assert sum(x == y for p, q in zip(a, b) for x, y in zip(p, q)) >= 15
