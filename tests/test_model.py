"""The model: causality, GQA equivalence, layer scan vs unroll, dtypes, and it can learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_run
from lm import sharding, train
from lm.config import MeshConfig, ModelConfig, PrecisionConfig
from lm.model import Transformer

STYLES = [dict(style="gpt2"), dict(style="llama", num_kv_heads=2)]


def tiny_model(seed=0, param_dtype="float32", compute_dtype="float32", **kw):
    cfg = ModelConfig(**{**dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=4,
                                mlp_dim=128, vocab_size=97, max_len=32), **kw})
    return Transformer(cfg, PrecisionConfig(param_dtype=param_dtype, compute_dtype=compute_dtype),
                       rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("kw", STYLES, ids=lambda k: k["style"])
def test_causal_mask(kw):
    model = tiny_model(**kw)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 97)
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 5) % 97)
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])  # nothing before t may move
    assert not np.allclose(a[:, t:], b[:, t:])          # and position t itself must


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = tiny_model(style="llama", num_kv_heads=2)
    mha = tiny_model(style="llama", num_kv_heads=4)
    groups = 4 // 2
    # Copy every parameter; the key/value heads are repeated so that query head i reads kv head
    # i // groups, exactly as grouped-query attention shares them.
    src = nnx.state(gqa)
    dst = nnx.state(mha)
    flat_src = dict(nnx.to_flat_state(src))
    new = {}
    for path, var in nnx.to_flat_state(dst):
        value = flat_src[path][...]
        if path[-1] in ("wk", "wv"):
            value = jnp.repeat(value, groups, axis=2)  # [layers, D, K, H] -> [layers, D, N, H]
        new[path] = value
    for path, var in nnx.to_flat_state(dst):
        var[...] = new[path]
    nnx.update(mha, dst)
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 97)
    np.testing.assert_allclose(gqa(tokens), mha(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", STYLES, ids=lambda k: k["style"])
def test_scan_and_unroll_agree(kw):
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 97)
    scanned = tiny_model(scan_layers=True, **kw)(tokens)
    unrolled = tiny_model(scan_layers=False, **kw)(tokens)
    remat = tiny_model(remat="full", **kw)(tokens)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(scanned, remat, atol=1e-5, rtol=1e-5)


def test_param_and_compute_dtypes_are_separate():
    model = tiny_model(param_dtype="float32", compute_dtype="bfloat16")
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model))} == {jnp.dtype("float32")}
    logits = model(jnp.zeros((1, 8), jnp.int32))
    assert logits.dtype == jnp.bfloat16
    model = tiny_model(param_dtype="bfloat16", compute_dtype="bfloat16")
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model))} == {jnp.dtype("bfloat16")}


def test_gpt2_ties_embeddings_llama_does_not():
    assert not hasattr(tiny_model(style="gpt2"), "unembed")
    assert hasattr(tiny_model(style="llama", num_kv_heads=2), "unembed")


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_overfits_a_fixed_batch(style):
    run = small_run(**{"model.style": style, "model.num_kv_heads": 2 if style == "llama" else 4,
                       "optim.lr": 3e-3, "optim.warmup_steps": 5, "optim.weight_decay": 0.0,
                       "train.steps": 150, "train.batch_size": 4, "train.seq_len": 32})
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    batch = jax.random.randint(jax.random.key(4), (4, 33), 0, 256)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        trainer = train.build(run, mesh)
        state = trainer.init()
        first = None
        for _ in range(run.train.steps):
            state, metrics = trainer.train_step(state, batch)
            first = first if first is not None else float(metrics["loss"])
    assert first > 5.0  # ~ln(384) at init
    assert float(metrics["loss"]) < 0.05, float(metrics["loss"])


def test_greedy_sample_matches_step_by_step_argmax():
    from lm.generate import Engine, SamplingParams
    model = tiny_model(style="llama", num_kv_heads=2)
    engine = Engine(*nnx.split(model))
    prompt = jnp.array([[5, 17, 3], [9, 9, 1]], jnp.int32)
    out = engine.generate(prompt.tolist(), SamplingParams(max_new_tokens=6))
    seq = prompt
    for _ in range(6):
        nxt = jnp.argmax(model(seq)[:, -1], axis=-1)[:, None].astype(jnp.int32)
        seq = jnp.concatenate([seq, nxt], axis=1)
    np.testing.assert_array_equal(np.array(out), seq[:, 3:])
    # Sampling at a temperature is reproducible by seed and differs across seeds.
    a, b, c = (engine.generate(prompt.tolist(), SamplingParams(max_new_tokens=6, temperature=1.0,
                                                               seed=s)) for s in (1, 1, 2))
    assert a == b and a != c


def test_custom_vjps_match_autodiff():
    from lm.model import dense, materialize_grad
    kx, kw, kg = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(kx, (2, 5, 8))
    w = jax.random.normal(kw, (8, 3))
    dy = jax.random.normal(kg, (2, 5, 3))
    ours = jax.vjp(dense, x, w)[1](dy)
    ref = jax.vjp(lambda x, w: jnp.einsum("btd,df->btf", x, w), x, w)[1](dy)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Two contracted axes (the attention output projection), a float32 weight used in bfloat16.
    w3 = jax.random.normal(kw, (4, 2, 3))
    x3 = x.reshape(2, 5, 4, 2).astype(jnp.bfloat16)
    ours = jax.vjp(lambda x, w: dense(x, w, 2), x3, w3)[1](dy.astype(jnp.bfloat16))
    ref = jax.vjp(lambda x, w: jnp.einsum("btnh,nhd->btd", x, w.astype(x.dtype)), x3, w3)[1](
        dy.astype(jnp.bfloat16))
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), rtol=2e-2,
                                   atol=2e-2)
    from lm.model import _softmax_to
    logits = jax.random.normal(kx, (3, 7))
    ours = jax.vjp(lambda z: _softmax_to(z, jnp.float32), logits)[1](jnp.cos(logits))
    ref = jax.vjp(lambda z: jax.nn.softmax(z, axis=-1), logits)[1](jnp.cos(logits))
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jax.vjp(materialize_grad, x)[1](x)[0], x)
    # And the whole model's gradient is autodiff's: compare with every STEERING VJP off.
    model = tiny_model(style="llama", num_kv_heads=2)
    tokens = jax.random.randint(jax.random.key(6), (2, 16), 0, 97)
    graphdef, params = nnx.split(model)
    loss = lambda p: nnx.merge(graphdef, p)(tokens).astype(jnp.float32).std()
    grads = jax.grad(loss)(params)
    import lm.model as lm_model
    steering = dict(lm_model.STEERING)
    lm_model.STEERING.update(dict.fromkeys(steering, ()))
    try:
        assert not lm_model.steers("dense")
        ref_grads = jax.grad(loss)(params)
    finally:
        lm_model.STEERING.update(steering)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_causal_attention_matches_jax_reference_and_its_gradient():
    from lm.model import causal_attention
    kq, kk, kv = jax.random.split(jax.random.key(8), 3)
    q = jax.random.normal(kq, (2, 9, 4, 8))
    k = jax.random.normal(kk, (2, 9, 2, 8))
    v = jax.random.normal(kv, (2, 9, 2, 8))
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(causal_attention(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    for a, b in zip(jax.grad(loss(causal_attention), (0, 1, 2))(q, k, v),
                    jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", STYLES, ids=lambda k: k["style"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_attention_implementations_agree(kw, dtype, tol):
    """model.attention='xla' (jax.nn.dot_product_attention) against 'auto', which on CPU is lm's
    own causal_attention: logits and every parameter gradient."""
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 97)

    def logits_and_grads(attention):
        model = tiny_model(compute_dtype=dtype, attention=attention, **kw)
        graphdef, params = nnx.split(model)
        f = lambda p: nnx.merge(graphdef, p)(tokens).astype(jnp.float32)
        loss = lambda p: jnp.mean(jax.nn.log_softmax(f(p))[..., 0])
        return f(params), jax.grad(loss)(params)

    (ours, our_grads), (xla, xla_grads) = logits_and_grads("auto"), logits_and_grads("xla")
    np.testing.assert_allclose(ours, xla, rtol=tol, atol=tol)
    # Relative to the largest gradient: some are exactly zero in theory (a key bias shifts a
    # query's logits uniformly), so their rounding differs in relative terms.
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(xla_grads))
    for a, b in zip(jax.tree.leaves(our_grads), jax.tree.leaves(xla_grads)):
        np.testing.assert_allclose(a / scale, b / scale, atol=tol)


def test_cudnn_attention_off_gpu_is_a_clear_error():
    from lm.config import ConfigError
    model = tiny_model(attention="cudnn")
    with pytest.raises(ConfigError, match="model.attention='cudnn' cannot run here: it needs an "
                       "NVIDIA GPU, this backend is cpu; use 'auto'"):
        model(jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("kw", STYLES, ids=lambda k: k["style"])
def test_prefill_into_an_empty_cache_skips_reading_it(kw):
    """decode(empty=True) (attention over the new tokens alone) gives the logits and the cache
    of the general cached path, for right-padded prompts."""
    from lm.model import init_cache
    model = tiny_model(**kw)
    tokens = jax.random.randint(jax.random.key(2), (3, 7), 0, 97)
    positions = jnp.broadcast_to(jnp.arange(7), (3, 7))
    lengths = jnp.array([7, 3, 5])
    cache = init_cache(model.cfg, 3, 16, "float32")
    general = model.decode(tokens, positions, cache, logits_at=lengths - 1)
    fresh = model.decode(tokens, positions, cache, logits_at=lengths - 1, empty=True)
    for a, b in zip(jax.tree.leaves(general), jax.tree.leaves(fresh)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
