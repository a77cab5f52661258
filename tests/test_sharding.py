"""Logical axis names land on the right mesh axes, and every layout trains to the same loss."""
import jax
import numpy as np
import pytest
from flax import nnx
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import small_run
from lm import sharding, train
from lm.config import ConfigError, MeshConfig, ModelConfig


def test_devices_are_faked():
    assert jax.device_count() == 8  # set by tests/conftest.py before jax is imported


def test_mesh_fills_minus_one_and_rejects_bad_shapes():
    assert sharding.resolve_mesh_shape(MeshConfig(data=-1, tensor=2), 8)["data"] == 4
    assert sharding.resolve_mesh_shape(MeshConfig(data=2, fsdp=2, tensor=2), 8)["fsdp"] == 2
    with pytest.raises(ConfigError, match="mesh"):
        sharding.resolve_mesh_shape(MeshConfig(data=-1, tensor=3), 8)
    with pytest.raises(ConfigError, match="mesh"):
        sharding.resolve_mesh_shape(MeshConfig(data=2, tensor=2), 8)


def test_logical_to_spec_gives_each_mesh_axis_to_one_dimension():
    rules = sharding.RULES
    assert sharding.logical_to_spec(("batch", "length", "embed"), rules) == \
        P(("data", "fsdp"), "sequence", None)
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")


def test_parameters_are_born_sharded_on_a_2x2x2_mesh():
    run = small_run(**{"model.style": "llama", "model.num_kv_heads": 2})
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        state = train.build(run, mesh).init()
    p = state.params
    assert p["embed"][...].sharding.spec == P("tensor", "fsdp")
    assert p["unembed"][...].sharding.spec == P("tensor", "fsdp")
    assert p["blocks"]["attn"]["wq"][...].sharding.spec == P("pipeline", "fsdp", "tensor", None)
    assert p["blocks"]["attn"]["wo"][...].sharding.spec == P("pipeline", "tensor", None, "fsdp")
    assert p["blocks"]["mlp"]["wi"][...].sharding.spec == P("pipeline", "fsdp", "tensor")
    assert p["blocks"]["mlp"]["wo"][...].sharding.spec == P("pipeline", "tensor", "fsdp")
    # A [layers, embed, mlp] kernel is really split 4 ways: each device holds a quarter.
    wi = p["blocks"]["mlp"]["wi"][...]
    assert wi.addressable_shards[0].data.shape == (2, 32, 64)
    # Adam's moments follow their parameters.
    mu = state.opt_state[1][0].mu["blocks"]["mlp"]["wi"][...]
    assert mu.sharding.spec == wi.sharding.spec


LAYOUTS = {
    "single": dict(data=1),
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "tensor4x2": dict(data=2, tensor=4),
    "2x2x2": dict(data=2, fsdp=2, tensor=2),
}


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_every_layout_trains_to_the_same_losses(style):
    run = small_run(**{"model.style": style, "model.num_kv_heads": 4, "train.steps": 3,
                       "optim.warmup_steps": 1, "optim.lr": 1e-2})
    batches = [jax.random.randint(jax.random.key(0), (8, 33), 0, 256)] * 3
    losses = {}
    for name, shape in LAYOUTS.items():
        devices = jax.devices()[:1] if name == "single" else None
        mesh = sharding.make_mesh(MeshConfig(**shape), devices=devices)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
            trainer = train.build(run, mesh)
            state = trainer.init()
            out = []
            for b in batches:
                b = jax.device_put(b, sharding.batch_sharding(mesh))
                state, metrics = trainer.train_step(state, b)
                out.append(float(metrics["loss"]))
        losses[name] = out
    for name, out in losses.items():
        np.testing.assert_allclose(out, losses["single"], rtol=2e-5, err_msg=name)
    assert losses["single"][2] < losses["single"][0]  # and it is actually training


# ---------------------------------------------------------------------------------------------
# mesh.rules presets: every preset on every mesh trains the single-device model

PRESETS = ["dp", "zero1", "zero2", "zero3", "fsdp", "tp", "tp+sp", "fsdp+tp"]
MESHES = {"data8": dict(data=8), "fsdp8": dict(data=1, fsdp=8),
          "tensor2_fsdp4": dict(data=1, fsdp=4, tensor=2),
          "2x2x2": dict(data=2, fsdp=2, tensor=2), "tensor4_seq2": dict(data=1, tensor=4,
                                                                         sequence=2)}


def three_steps(run, mesh):
    batches = [jax.random.randint(jax.random.key(0), (8, 33), 0, 256)] * 3
    with jax.set_mesh(mesh):
        trainer = train.build(run, mesh)
        state = trainer.init()
        losses = []
        for b in batches:
            state, metrics = trainer.train_step(state, jax.device_put(
                b, sharding.batch_sharding(mesh)))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), trainer, state


# SGD: updates linear in the gradients. (Adam turns the float noise of gradients that are zero
# in exact arithmetic, like the key bias's, into full-size steps of random sign.)
PRESET_RUN = {"train.steps": 3, "optim.name": "sgd", "optim.warmup_steps": 1, "optim.lr": 0.5}


@pytest.fixture(scope="module")
def single_device():
    run = small_run(**PRESET_RUN)
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    return three_steps(run, mesh)[:2]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_on_every_mesh_trains_the_same_model(preset, single_device):
    want_losses, want_params = single_device
    for name, shape in MESHES.items():
        run = small_run(**PRESET_RUN, **{"mesh.rules": preset})
        losses, params, _, _ = three_steps(run, sharding.make_mesh(MeshConfig(**shape)))
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5, err_msg=f"{preset} {name}")
        assert losses[2] < losses[0] - 0.01  # and it trains
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6,
                                                             err_msg=f"{preset} {name}"),
                     params, want_params)


def leaf_specs(tree) -> dict[str, str]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): str(leaf.sharding.spec) for path, leaf in flat
            if hasattr(leaf, "sharding") and leaf.ndim > 0}


@pytest.mark.parametrize("preset", PRESETS)
def test_golden_shardings_of_every_parameter_and_optimizer_leaf(preset, root):
    """The actual .sharding.spec of every parameter and optimizer-state leaf on a
    (data 2, fsdp 2, tensor 2) mesh, against tests/golden/ (LM_UPDATE_GOLDEN=1 rewrites)."""
    import json
    import os
    run = small_run(**{"mesh.rules": preset})
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh):
        state = train.build(run, mesh).init()
    got = {"params": leaf_specs(state.params), "opt_state": leaf_specs(state.opt_state)}
    path = os.path.join(root, "tests", "golden", f"shardings-{preset.replace('+', '_')}.json")
    if os.environ.get("LM_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
    with open(path) as f:
        assert got == json.load(f)


def test_fsdp_leaves_no_large_parameter_replicated():
    run = small_run(**{"mesh.rules": "fsdp"})
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=8))
    with jax.set_mesh(mesh):
        state = train.build(run, mesh).init()
    leaves = jax.tree.leaves(state.params)
    total = sum(x.size for x in leaves)
    replicated = [x.shape for x in leaves if x.sharding.is_fully_replicated and
                  x.size > 0.01 * total]
    assert not replicated, replicated


def test_a_mesh_axis_that_does_not_divide_is_a_clear_error():
    from lm.config import ConfigError
    run = small_run(**{"model.style": "llama", "model.num_kv_heads": 2, "mesh.rules": "tp"})
    mesh = sharding.make_mesh(MeshConfig(data=2, tensor=4))
    with pytest.raises(ConfigError, match="kv_heads|size 2"):
        train.build(run, mesh)


@pytest.mark.parametrize("style", ["gpt2", "llama", "bert"])
def test_a_tensor_parallel_layer_compiles_to_megatrons_collectives(style):
    """One attention + MLP block under `tp` on (data 2, tensor 4): forward and backward may use
    at most the 4 all-reduces of Megatron's Figure 4 (XLA merges some) and no gathers of weights
    or other collectives; more would mean a misplaced sharding. BERT's post-norm encoder block
    (with padding lengths) is held to the same bound as the decoders'."""
    import re

    from lm.model import Block, rope_tables
    cfg = ModelConfig(style=style, d_model=64, num_heads=4, num_kv_heads=4, mlp_dim=256)
    mesh = sharding.make_mesh(MeshConfig(data=2, tensor=4))
    lay = sharding.layout("tp")
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.REPLICATED):
        graphdef, abstract = nnx.split(nnx.eval_shape(
            lambda: Block(cfg, jnp.float32, rngs=nnx.Rngs(0))))
    shardings = sharding.param_shardings(abstract, mesh, lay.params)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    x = jax.ShapeDtypeStruct((8, 16, 64), jnp.float32,
                             sharding=NamedSharding(mesh, P("data", None, None)))

    def loss(params, x_btd):
        with nnx.logical_axis_rules(lay.acts):
            rope_bt = (rope_tables(jnp.broadcast_to(jnp.arange(16), (8, 16)), cfg.head_dim,
                                   cfg.rope_theta) if style == "llama" else None)
            lengths = jnp.full((8,), 11) if style == "bert" else None
            return jnp.sum(nnx.merge(graphdef, params)(x_btd, rope_bt, lengths_b=lengths) ** 2)

    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.value_and_grad(loss)).lower(abstract, x).compile().as_text()
    count = lambda op: len(re.findall(rf"= \S+ {op}(-start)?\(", hlo))
    assert 1 <= count("all-reduce") <= 4, count("all-reduce")
    for op in ("all-gather", "reduce-scatter", "all-to-all", "collective-permute"):
        assert count(op) == 0, (op, count(op))


def test_hybrid_mesh_puts_the_dcn_axis_across_processes(tmp_path, root):
    """mesh.dcn_data=2 over two jax.distributed processes (4 CPU devices each): the data axis
    steps across processes, fsdp stays inside each; a sharded sum crosses both."""
    import json
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": root,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, os.path.join(root, "tests", "multihost_mesh.py"),
                               str(i), str(port), str(tmp_path)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
    for i in range(2):
        got = json.loads((tmp_path / f"mesh{i}.json").read_text())
        assert got["shape"]["data"] == 2 and got["shape"]["fsdp"] == 4
        grid = np.array(got["processes"]).reshape(2, 4)  # (data, fsdp); other axes are 1
        assert (grid[0] == grid[0, 0]).all() and (grid[1] == grid[1, 0]).all()
        assert grid[0, 0] != grid[1, 0]
        assert got["sum"] == sum(range(8))


def test_dcn_axes_must_divide_the_devices():
    with pytest.raises(ConfigError, match="DCN"):
        sharding.resolve_mesh_shape(MeshConfig(data=-1, dcn_data=3), 8)
    assert sharding.resolve_mesh_shape(MeshConfig(data=-1, fsdp=2, dcn_data=2), 8) == \
        {"data": 4, "fsdp": 2, "tensor": 1, "sequence": 1, "pipeline": 1}
