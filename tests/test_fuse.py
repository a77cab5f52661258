"""Fused q/k/v and gate/up projections (lm.fuse, model.fused_projections): the same logits as
the unfused model, through the full forward, the KV-cache engine, a 2x2 mesh and the CLI."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, small_run
from lm.fuse import fuse, unfuse
from lm.generate import Engine, SamplingParams
from lm.model import Transformer, init_cache

STYLES = {"gpt2": {}, "llama": {"model.style": "llama", "model.num_kv_heads": 2}}


def unfused_model(style, **extra):
    """A small model whose every parameter (biases and norms too) is random, so that a bias
    or a head put in the wrong place changes the logits."""
    run = small_run(**STYLES[style], **extra)
    graphdef, params = nnx.split(Transformer(run.model, rngs=nnx.Rngs(3)))
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(keys), x.shape), params)
    return run, graphdef, params


def blocks(params) -> dict:
    return nnx.to_pure_dict(params)["blocks"]


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_fused_layers_give_the_unfused_logits(style):
    run, graphdef, params = unfused_model(style)
    cfg = run.model
    fgraphdef, fparams = fuse(graphdef, params)
    b = blocks(fparams)
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    assert "wq" not in b["attn"] and "wk" not in b["attn"] and "wv" not in b["attn"]
    assert b["attn"]["wqkv"].shape == (cfg.num_layers, d, k, n // k + 2, h)
    # The layout lm.quantize and tensor parallelism rely on: group j = query heads j*G..,
    # then k head j, then v head j.
    wq = np.asarray(blocks(params)["attn"]["wq"])
    np.testing.assert_array_equal(b["attn"]["wqkv"][:, :, 1, :n // k], wq[:, :, n // k:2 * n // k])
    np.testing.assert_array_equal(b["attn"]["wqkv"][:, :, 1, n // k],
                                  blocks(params)["attn"]["wk"][:, :, 1])
    if style == "gpt2":
        assert b["attn"]["bqkv"].shape == (cfg.num_layers, k, n // k + 2, h)
        assert "wi" in b["mlp"] and "wgi" not in b["mlp"]  # one MLP input: nothing to fuse
    else:
        assert b["mlp"]["wgi"].shape == (cfg.num_layers, d, 2, cfg.mlp_dim)
        assert "wg" not in b["mlp"] and "wi" not in b["mlp"]
    assert nnx.merge(fgraphdef, fparams).cfg.fused_projections
    # unfuse is the exact inverse.
    ugraphdef, uparams = unfuse(fgraphdef, fparams)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(uparams),
                 nnx.to_pure_dict(params))
    assert fuse(fgraphdef, fparams)[1] is fparams  # fused already: unchanged

    model, fused = nnx.merge(graphdef, params), nnx.merge(fgraphdef, fparams)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 300)
    full = np.asarray(model(tokens))
    np.testing.assert_allclose(fused(tokens), full, atol=1e-5, rtol=1e-5)
    # A prefill of 10 tokens, then 4 decode steps against the cache.
    caches = [init_cache(cfg, 2, 32, "float32") for _ in range(2)]
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    outs = [m.decode(tokens[:, :10], positions, c, empty=True) for m, c in
            zip((model, fused), caches)]
    np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(outs[1][0], full[:, :10], atol=1e-5, rtol=1e-5)
    caches = [c for _, c in outs]
    for i in range(10, 14):
        step = [m.decode(tokens[:, i:i + 1], jnp.full((2, 1), i), c)
                for m, c in zip((model, fused), caches)]
        np.testing.assert_allclose(step[1][0][:, 0], full[:, i], atol=1e-5, rtol=1e-5)
        caches = [c for _, c in step]
    # The engine: the same greedy tokens.
    prompts = [[5, 17, 3], [9, 9, 1, 4, 4, 8, 2, 11, 30]]
    sp = SamplingParams(max_new_tokens=8)
    assert (Engine(fgraphdef, fparams).generate(prompts, sp) ==
            Engine(graphdef, params).generate(prompts, sp))


def test_training_a_fused_model_is_the_same_maths():
    """Gradients of the fused parameters are the fused gradients of the unfused ones (the
    steering custom VJP of lm.model.dense included), so a fused model may be trained."""
    run, graphdef, params = unfused_model("llama")
    fgraphdef, fparams = fuse(graphdef, params)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 300)

    def loss(graphdef, p):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1]).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    grads = jax.grad(lambda p: loss(graphdef, p))(params)
    fgrads = jax.grad(lambda p: loss(fgraphdef, p))(fparams)
    want = fuse(graphdef, grads)[1]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
                 nnx.to_pure_dict(fgrads), nnx.to_pure_dict(want))
    # Built fused from the config, the model has the fused parameters and no others.
    fused_run = small_run(**STYLES["llama"], **{"model.fused_projections": True})
    built = nnx.to_pure_dict(nnx.state(Transformer(fused_run.model, rngs=nnx.Rngs(0))))
    assert jax.tree.map(np.shape, built) == jax.tree.map(np.shape, nnx.to_pure_dict(fparams))


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_fused_layers_on_a_data_x_tensor_mesh(style):
    """Fused on a 2x2 data x tensor mesh: wqkv split over kv heads and wgi over mlp on tensor
    (each device a whole group of heads), the same tokens and logits as one device, unfused."""
    from lm import sharding
    from lm.config import MeshConfig
    run, graphdef, params = unfused_model(style)
    cfg = run.model
    mesh = sharding.make_mesh(MeshConfig(data=2, tensor=2), jax.devices()[:4])
    sharded = jax.device_put(params, sharding.param_shardings(params, mesh, sharding.RULES))
    fgraphdef, fparams = fuse(graphdef, sharded, mesh)
    b = blocks(fparams)
    wqkv = b["attn"]["wqkv"]
    # [layers, embed, kv_heads, group, head_dim]: layers over pipeline, embed over fsdp (both
    # of size 1 here), kv heads over tensor.
    assert tuple(wqkv.sharding.spec) == ("pipeline", "fsdp", "tensor", None, None), \
        wqkv.sharding.spec
    assert wqkv.addressable_shards[0].data.shape[2] == cfg.num_kv_heads // 2
    if style == "llama":
        wgi = b["mlp"]["wgi"]
        assert tuple(wgi.sharding.spec) == ("pipeline", "fsdp", None, "tensor"), wgi.sharding.spec
        assert wgi.addressable_shards[0].data.shape[3] == cfg.mlp_dim // 2
    else:
        assert tuple(b["attn"]["bqkv"].sharding.spec) == ("pipeline", "tensor", None, None)

    engine = Engine(fgraphdef, fparams, mesh=mesh)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 300)
    with engine.context():
        got = jax.jit(lambda p, t: nnx.merge(fgraphdef, p)(t))(fparams, tokens)
    np.testing.assert_allclose(got, nnx.merge(graphdef, params)(tokens), atol=1e-5, rtol=1e-5)
    prompts = [[5, 17, 3], [9, 9, 1, 4, 4, 8, 2, 11, 30], [100]]
    sp = SamplingParams(max_new_tokens=8)
    assert engine.generate(prompts, sp) == Engine(graphdef, params).generate(prompts, sp)


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    """An unfused llama (GQA) checkpoint as lm.convert writes one (no tokenizer)."""
    from lm.checkpoint import Checkpointer
    run, _, params = unfused_model("llama")
    out = tmp_path_factory.mktemp("fuse") / "llama"
    ckpt = Checkpointer(str(out), async_save=False)
    ckpt.save(0, {"params": params}, None, run.to_dict())
    ckpt.wait()
    ckpt.close()
    return out


def test_checkpoints_load_unfused_unless_asked(llama_checkpoint):
    plain = Engine.from_checkpoint(str(llama_checkpoint))
    fused = Engine.from_checkpoint(str(llama_checkpoint), fuse=True)
    assert "wq" in blocks(plain.params)["attn"] and not plain.cfg.fused_projections
    assert "wqkv" in blocks(fused.params)["attn"] and "wgi" in blocks(fused.params)["mlp"]
    assert fused.cfg.fused_projections
    prompts = [[5, 17, 3], [100, 2]]
    sp = SamplingParams(max_new_tokens=6)
    assert fused.generate(prompts, sp) == plain.generate(prompts, sp)
    # Fused first, then weight-only int8 of the fused weights (per output channel over axis 1).
    from lm.quantize import Int8Array
    both = Engine.from_checkpoint(str(llama_checkpoint), fuse=True, int8_weights=True)
    wqkv = blocks(both.params)["attn"]["wqkv"]
    assert isinstance(wqkv, Int8Array) and wqkv.scale.shape == (2, 1, 2, 4, 16)
    assert [len(ids) for ids in both.generate(prompts, sp)] == [6, 6]


def test_generate_and_serve_fuse_flags(llama_checkpoint):
    def gen(*extra):
        proc = subprocess.run([sys.executable, "-m", "lm.generate", "--checkpoint",
                               str(llama_checkpoint), "--prompt-ids", "5,17,3,9",
                               "--max-new-tokens", "6", "--json", *extra],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)["token_ids"]

    plain = gen()
    assert len(plain) == 6 and gen("--fuse") == plain

    from lm import serve
    slots, _, _ = serve.build(str(llama_checkpoint), max_batch_size=2, fuse=True)
    assert "wqkv" in blocks(slots.params)["attn"]
    tokens = [slots.insert(0, [5, 17, 3, 9], SamplingParams())]
    tokens += [int(slots.step().token_b[0]) for _ in range(5)]
    assert tokens == plain
    with pytest.raises(ValueError, match="--fuse"):
        serve.build(export=str(llama_checkpoint), fuse=True)
