"""Optimizers against NumPy references, schedules, loss scaling, microbatches, remat, precision."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import small_run
from lm import sharding, train
from lm.config import MeshConfig, ModelConfig, OptimConfig, PrecisionConfig
from lm.model import Transformer
from lm.optim import LossScale, make_optimizer, scale_lr, schedule

# ---------------------------------------------------------------------------------------------
# Optimizers: optax chains vs plain NumPy, step by step


def np_global_clip(grads, max_norm):
    norm = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
    return {k: g / max(1.0, norm / max_norm) for k, g in grads.items()}


def np_reference(name, cfg, params, grad_steps):
    """The textbook updates, written out. `decays[k]`: weight decay (and, for LARS, the trust
    ratio) applies to k — not to biases and norm scales."""
    decays = {k: k.endswith("w") for k in params}

    def norm(k, x):  # one norm per layer for the stacked block parameters
        axes = tuple(range(1, x.ndim)) if k.startswith("blocks.") else None
        return np.sqrt((x ** 2).sum(axis=axes, keepdims=True))

    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    lr, wd = cfg.lr, cfg.weight_decay
    for t, grads in enumerate(grad_steps, 1):
        g = {k: x.astype(np.float64) for k, x in grads.items()}
        if cfg.clip_norm > 0:
            g = np_global_clip(g, cfg.clip_norm)
        for k in p:
            d = wd if decays[k] else 0.0
            if name in ("adamw", "lamb", "nvlamb"):
                m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
                v2[k] = cfg.b2 * v2[k] + (1 - cfg.b2) * g[k] ** 2
                u = (m[k] / (1 - cfg.b1 ** t)) / (np.sqrt(v2[k] / (1 - cfg.b2 ** t)) + cfg.eps)
                u = u + d * p[k]
                if name != "adamw":
                    pn, un = norm(k, p[k]), norm(k, u)
                    u = u * np.where((pn > 0) & (un > 0), pn / np.where(un > 0, un, 1), 1.0)
                p[k] = p[k] - lr * u
            elif name == "lars":
                u = g[k] + d * p[k]
                pn, un = norm(k, p[k]), norm(k, u)
                if decays[k]:
                    u = u * np.where((pn > 0) & (un > 0), cfg.trust_coefficient * pn /
                                     (un + cfg.eps), 1.0)
                m[k] = cfg.momentum * m[k] + lr * u  # m: the velocity
                p[k] = p[k] - m[k]
            elif name == "sgd":
                u = g[k] + d * p[k]
                m[k] = cfg.momentum * m[k] + u
                p[k] = p[k] - lr * m[k]
    return p


@pytest.mark.parametrize("name", ["adamw", "lamb", "nvlamb", "lars", "sgd"])
def test_optimizer_matches_numpy_reference(name):
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32),
              "bias": np.zeros(3, np.float32),  # ||p|| = 0: trust ratio 1
              "scale": rng.normal(size=(2, 3)).astype(np.float32),
              # Stacked layers of very different norms: the trust ratio is per layer.
              "blocks.w": (rng.normal(size=(2, 4, 3)) * [[[1.0]], [[100.0]]]).astype(np.float32)}
    grad_steps = [{k: (rng.normal(size=v.shape) * (3.0 if s == 0 else 0.2)).astype(np.float32)
                   for k, v in params.items()} for s in range(4)]  # step 1 is clipped
    cfg = OptimConfig(name=name, lr=0.05, schedule="constant", warmup_steps=0,
                      weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.99, eps=1e-6,
                      momentum=0.9, trust_coefficient=0.02)
    got = run_optax(cfg, params, grad_steps)
    want = np_reference(name, cfg, params, grad_steps)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
        assert not np.allclose(got[k], params[k])  # every parameter moved


def nest(flat):
    """{"blocks.w": x, "w": y} -> {"blocks": {"w": x}, "w": y}."""
    tree = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return tree


def run_optax(cfg, params, grad_steps):
    tx = make_optimizer(cfg, total_steps=10)
    p = nest(params)
    state = tx.init(p)
    for grads in grad_steps:
        updates, state = tx.update(nest(grads), state, p)
        p = optax.apply_updates(p, updates)
    return {k: np.asarray(p["blocks"][k[7:]] if k.startswith("blocks.") else p[k]) for k in params}


def test_lamb_and_nvlamb_differ_only_by_the_pre_normalisation():
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    grads = [{"w": (rng.normal(size=(4, 3)) * 5).astype(np.float32)} for _ in range(3)]
    base = OptimConfig(lr=0.05, schedule="constant", warmup_steps=0, weight_decay=0.0, b2=0.99)
    run = lambda name, clip: run_optax(dataclasses.replace(base, name=name, clip_norm=clip),
                                       params, grads)["w"]
    np.testing.assert_allclose(run("lamb", 1.0), run("nvlamb", 1.0), rtol=1e-6)
    assert not np.allclose(run("lamb", 0.0), run("nvlamb", 1.0), rtol=1e-4)


def test_schedules_and_batch_size_scaling():
    base = dict(lr=1.0, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    at = lambda kind, s: float(schedule(OptimConfig(schedule=kind, **base), 1000)(s))
    for kind in ("cosine", "linear", "constant", "inverse_sqrt"):
        assert at(kind, 0) == 0.0 and at(kind, 5) == pytest.approx(0.5)
        assert at(kind, 10) == pytest.approx(1.0)
    assert at("cosine", 60) == pytest.approx(0.55) and at("cosine", 500) == pytest.approx(0.1)
    assert at("linear", 60) == pytest.approx(0.55) and at("linear", 85) == pytest.approx(0.325)
    assert at("constant", 500) == 1.0
    assert at("inverse_sqrt", 40) == pytest.approx(0.5)  # sqrt(10 / 40)
    assert scale_lr(1e-3, 256, 1024) == pytest.approx(4e-3)
    assert scale_lr(1e-3, 256, 1024, "sqrt") == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="'linear' or 'sqrt'"):
        scale_lr(1e-3, 256, 1024, "cubic")


# ---------------------------------------------------------------------------------------------
# Dynamic loss scaling


class MegatronScaler:
    """Megatron-LM's DynamicGradScaler.update, transcribed."""

    def __init__(self, scale, growth_factor, backoff_factor, growth_interval, hysteresis,
                 min_scale):
        self.scale, self.gf, self.bf, self.interval = scale, growth_factor, backoff_factor, \
            growth_interval
        self.hysteresis, self.min_scale = hysteresis, min_scale
        self.growth_tracker, self.hysteresis_tracker = 0, hysteresis

    def update(self, found_inf):
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.bf, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale = self.scale * self.gf


def test_loss_scale_follows_megatron():
    cfg = PrecisionConfig(initial_scale=2.0 ** 10, growth_interval=3, hysteresis=2,
                          min_scale=2.0 ** 6)
    ours, ref = LossScale(cfg, dynamic=True), MegatronScaler(2.0 ** 10, 2.0, 0.5, 3, 2, 2.0 ** 6)
    state = ours.init()
    rng = np.random.default_rng(0)
    flags = [True] * 10 + [bool(x) for x in rng.random(300) < 0.2] + [False] * 12
    seen = []
    for found_inf in flags:
        state = ours.update(state, jnp.asarray(not found_inf))
        ref.update(found_inf)
        assert float(state["scale"]) == ref.scale
        assert int(state["hysteresis"]) == ref.hysteresis_tracker
        assert int(state["good_steps"]) == ref.growth_tracker
        seen.append(ref.scale)
    assert int(state["skipped"]) == sum(flags)
    assert min(seen) == 2.0 ** 6 and max(seen) > 2.0 ** 10  # hit the floor, and grew


def build(run, mesh=None):
    mesh = mesh or sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        trainer = train.build(run, mesh)
        return trainer, trainer.init(), mesh


def test_overflow_skips_the_step_and_backs_off_after_hysteresis():
    run = small_run(**{"precision.compute_dtype": "float16", "precision.hysteresis": 2,
                       "precision.growth_interval": 2, "optim.warmup_steps": 0})
    trainer, state, mesh = build(run)
    batch = jax.random.randint(jax.random.key(0), (8, 33), 0, 256)
    params0 = jax.device_get(state.params)
    opt0 = jax.device_get(state.opt_state)
    with jax.set_mesh(mesh):
        # Inject an overflow: a scale that float16 activations' gradients cannot hold.
        state = dataclasses.replace(state, loss_scale={
            **state.loss_scale, "scale": jnp.asarray(2.0 ** 40, jnp.float32)})
        state, m = trainer.train_step(state, batch)
        assert int(m["skipped_steps"]) == 1 and not np.isfinite(float(m["grad_norm"]))
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params0)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), opt0)
        ls = jax.device_get(state.loss_scale)
        assert ls["scale"] == 2.0 ** 40 and ls["hysteresis"] == 1  # tolerated once
        state, m = trainer.train_step(state, batch)
        ls = jax.device_get(state.loss_scale)
        assert ls["scale"] == 2.0 ** 39 and ls["hysteresis"] == 0 and ls["skipped"] == 2
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params0)
        # A scale that fits: two clean steps, then it grows and hysteresis refills.
        state = dataclasses.replace(state, loss_scale={
            **state.loss_scale, "scale": jnp.asarray(2.0 ** 8, jnp.float32)})
        for _ in range(2):
            state, m = trainer.train_step(state, batch)
        ls = jax.device_get(state.loss_scale)
        assert ls["scale"] == 2.0 ** 9 and ls["hysteresis"] == 2 and ls["skipped"] == 2
        assert int(jax.device_get(state.opt_state[1][0].count)) == 2  # adam's step count
    assert not np.array_equal(jax.device_get(state.params)["embed"][...], params0["embed"][...])


def test_skip_nonfinite_guards_float32_too():
    trainer, state, mesh = build(small_run(**{"train.skip_nonfinite": True}))
    assert float(state.loss_scale["scale"]) == 1.0  # no scaling in float32
    with jax.set_mesh(mesh):
        embed = state.params["embed"]
        embed.set_value(embed[...].at[3, 0].set(jnp.nan))  # a bad parameter: NaN loss and grads
        before = jax.device_get(state.params)
        state, m = trainer.train_step(state, jnp.full((8, 33), 3, jnp.int32))
    assert int(m["skipped_steps"]) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)


def train_losses(run, batch, steps):
    trainer, state, mesh = build(run)
    out = []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            state, m = trainer.train_step(state, batch)
            out.append(float(m["loss"]))
    return np.array(out), state


def test_float16_needs_loss_scaling_and_then_tracks_float32():
    """4,096 tokens per batch, vocabulary 4,096: the logits' gradients (p / 4096 each) fall
    below float16's range. Unscaled, they flush to zero and the model cannot learn to push the
    unused vocabulary down; scaled, float16 follows the float32 loss curve."""
    flat = {"model.vocab_size": 4096, "train.seq_len": 64, "train.batch_size": 64,
            "optim.warmup_steps": 0, "optim.lr": 1e-2, "optim.schedule": "constant"}
    batch = jax.random.randint(jax.random.key(0), (64, 65), 0, 256)
    f32, _ = train_losses(small_run(**flat), batch, 6)
    scaled, state = train_losses(small_run(**flat, **{"precision.compute_dtype": "float16"}),
                                 batch, 6)
    unscaled, _ = train_losses(small_run(**flat, **{"precision.compute_dtype": "float16",
                                                    "precision.loss_scale": "none"}), batch, 6)
    assert float(state.loss_scale["scale"]) == 2.0 ** 16  # auto: dynamic for float16
    assert f32[-1] < f32[0] - 2 and scaled[-1] < scaled[0] - 2
    np.testing.assert_allclose(scaled, f32, atol=3e-3)
    assert np.abs(unscaled - f32).max() > 3 * np.abs(scaled - f32).max()

    # The cause, directly: the unused vocabulary rows' gradient is lost to underflow unscaled.
    grads = {}
    for dtype, scale in (("float32", 1.0), ("float16", 1.0), ("float16", 2.0 ** 16)):
        trainer, state, _ = build(small_run(**flat, **{"precision.compute_dtype": dtype}))
        loss = lambda p, s: train.loss_fn(trainer.graphdef, p, batch)[0] * s
        g = jax.jit(jax.grad(loss))(state.params, scale)["embed"][...][256:]
        grads[dtype, scale] = np.asarray(g) / scale
    error = {k: np.linalg.norm(g - grads["float32", 1.0]) / np.linalg.norm(grads["float32", 1.0])
             for k, g in grads.items()}
    assert error["float16", 1.0] > 0.1 and error["float16", 2.0 ** 16] < 0.005, error


def test_master_weights_keep_updates_that_bfloat16_rounds_away():
    flat = {"precision.param_dtype": "bfloat16", "precision.compute_dtype": "bfloat16",
            "optim.name": "sgd", "optim.momentum": 0.0, "optim.lr": 1e-4, "optim.clip_norm": 0.0,
            "optim.weight_decay": 0.0, "optim.warmup_steps": 0, "optim.schedule": "constant"}
    batch = jax.random.randint(jax.random.key(0), (8, 33), 0, 256)
    _, plain = train_losses(small_run(**flat), batch, 3)
    _, master = train_losses(small_run(**flat, **{"precision.master_weights": True}), batch, 3)
    _, init, _ = build(small_run(**flat))
    w0 = np.asarray(init.params["blocks"]["mlp"]["wi"][...], np.float32)
    w_plain = np.asarray(plain.params["blocks"]["mlp"]["wi"][...], np.float32)
    w_master = master.master["blocks"]["mlp"]["wi"][...]
    assert master.params["blocks"]["mlp"]["wi"][...].dtype == jnp.bfloat16
    assert w_master.dtype == jnp.float32
    np.testing.assert_array_equal(master.params["blocks"]["mlp"]["wi"][...],
                                  w_master.astype(jnp.bfloat16))
    moved_master = float((np.asarray(w_master) != w0).mean())
    moved_plain = float((w_plain != w0).mean())
    assert moved_master > 0.9 and moved_plain < 0.5 * moved_master  # bf16 drops tiny steps


# ---------------------------------------------------------------------------------------------
# Microbatches and rematerialisation


def test_microbatches_give_the_same_loss_and_gradients():
    flat = {"optim.name": "sgd", "optim.momentum": 0.0, "optim.clip_norm": 0.0,
            "optim.warmup_steps": 0, "optim.schedule": "constant", "optim.lr": 0.1,
            "train.batch_size": 16}
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    batch = jax.random.randint(jax.random.key(0), (16, 33), 0, 256)
    results = {}
    for k in (1, 4):
        trainer, state, _ = build(small_run(**flat, **{"train.microbatches": k}), mesh)
        with jax.set_mesh(mesh):
            b = jax.device_put(batch, sharding.batch_sharding(mesh))
            losses = []
            for _ in range(2):
                state, m = trainer.train_step(state, b)
                losses.append(float(m["loss"]))
            eval_loss = float(trainer.eval_step(state.params, b, 0)["loss"])
        results[k] = losses, float(m["grad_norm"]), jax.device_get(state.params), eval_loss
    np.testing.assert_allclose(results[4][0], results[1][0], rtol=1e-6)
    np.testing.assert_allclose(results[4][1], results[1][1], rtol=1e-5)
    np.testing.assert_allclose(results[4][3], results[1][3], rtol=1e-6)  # eval in microbatches
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 results[4][2], results[1][2])


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_every_remat_policy_gives_the_same_gradients(style, scan):
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 97)
    long_tokens = jax.random.randint(jax.random.key(1), (16, 65), 0, 97)
    grads, temp = {}, {}
    for policy in ("none", "full", "dots", "minimal"):
        cfg = ModelConfig(style=style, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2
                          if style == "llama" else 4, mlp_dim=128, vocab_size=97, max_len=64,
                          scan_layers=scan, remat=policy)
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
        loss = lambda p, t: optax.softmax_cross_entropy_with_integer_labels(
            nnx.merge(graphdef, p)(t[:, :-1]), t[:, 1:]).mean()
        grads[policy] = jax.jit(jax.grad(loss))(params, tokens)
        temp[policy] = jax.jit(jax.grad(loss)).lower(params, long_tokens).compile() \
            .memory_analysis().temp_size_in_bytes
    for policy in ("full", "dots", "minimal"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     grads[policy], grads["none"])
    # And each policy really keeps less: what the backward holds on to shrinks (scanned layers:
    # unrolled, XLA's peak at this size sits elsewhere; bench/memory.py measures gpt2_small).
    if scan:
        assert temp["none"] > temp["dots"] > max(temp["minimal"], temp["full"]), temp


def test_poly_schedule_is_nvidias_and_a_phase_starts_it_over():
    """NVIDIA's PolyWarmUpScheduler (BERT): p = k / total, lr p / w in the warmup, then
    lr (1 - p)^0.5, not renormalized after the warmup; phase 2 (train.phase_start) counts its
    own warmup and decay from its first step."""
    lr = schedule(OptimConfig(lr=6e-3, warmup_steps=2001, schedule="poly"), 7038)
    for k in (1, 1000, 2000, 2001, 2002, 5000, 7037):
        p, w = k / 7038, 2001 / 7038
        want = 6e-3 * p / w if p < w else 6e-3 * (1 - p) ** 0.5
        assert float(lr(k)) == pytest.approx(want, rel=1e-4), k  # float32
    phase2 = schedule(OptimConfig(lr=4e-3, warmup_steps=200, schedule="poly"), 8601, start=7038)
    assert float(phase2(7038)) == 0.0
    assert float(phase2(7138)) == pytest.approx(2e-3, rel=1e-5)
    assert float(phase2(8038)) == pytest.approx(4e-3 * (1 - 1000 / 1563) ** 0.5, rel=1e-5)
    assert float(phase2(8601)) == 0.0
