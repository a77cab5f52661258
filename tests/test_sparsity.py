"""2:4 structured sparsity (lm/sparsity.py, train.sparsity): magnitude pruning along each layer
matmul's input axis, the compressed format, and masked retraining through lm.train (the masks
hold through every update and across a resume; the optimizer's moments stay 0 where pruned)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_run
from lm import sharding, sparsity, train
from lm.checkpoint import load_params
from lm.config import ConfigError
from lm.model import Transformer

# Each pruned weight's input axes after the stacked layers axis, written out independently of
# lm.sparsity's table: attention's wo [L, N, H, D] contracts (N, H), every other one axis 1.
INPUTS = {("attn", "wq"): 1, ("attn", "wk"): 1, ("attn", "wv"): 1, ("attn", "wo"): 2,
          ("mlp", "wi"): 1, ("mlp", "wg"): 1, ("mlp", "wo"): 1}


def matmuls(params) -> dict[tuple[str, str], np.ndarray]:
    blocks = params["blocks"]
    return {(m, w): np.asarray(jax.device_get(blocks[m][w][...]))
            for m, w in INPUTS if w in blocks[m]}


def groups(w: np.ndarray, n_in: int) -> np.ndarray:
    """[L, K / 4, 4, R]: 4 consecutive entries of the flattened input axes."""
    k = math.prod(w.shape[1:1 + n_in])
    return w.reshape(w.shape[0], k // 4, 4, -1)


def model_params(run, seed=0):
    return nnx.state(Transformer(run.model, run.precision, run.task, rngs=nnx.Rngs(params=seed)))


def positions(params) -> dict:
    return {name: w != 0 for name, w in matmuls(params).items()}


@pytest.mark.parametrize("flat", [
    {}, {"model.style": "llama", "model.num_kv_heads": 2},
    # head_dim 2: attention's wo groups run across heads (the flattened N x H)
    {"model.num_heads": 32, "model.num_kv_heads": 32}], ids=["gpt2", "llama", "head_dim2"])
def test_prune_keeps_the_two_largest_of_each_four_along_the_input_axis(flat):
    run = small_run(**flat)
    dense = model_params(run)
    pruned = sparsity.prune(dense)
    assert sparsity.is_2_4(pruned) and not sparsity.is_2_4(dense)
    seen = matmuls(pruned)
    assert len(seen) == (7 if run.model.style == "llama" else 6)
    for name, w in matmuls(dense).items():
        d, p = groups(w, INPUTS[name]), groups(seen[name], INPUTS[name])
        top2 = np.zeros(d.shape, bool)
        np.put_along_axis(top2, np.argsort(-np.abs(d), axis=2)[:, :, :2], True, axis=2)
        np.testing.assert_array_equal(p != 0, top2, err_msg=str(name))
        np.testing.assert_array_equal(np.where(top2, d, 0), p)  # kept values unchanged
        nz = seen[name] != 0  # along the output axis it is not 2:4: the groups are the inputs'
        if nz.shape[-1] % 4 == 0:
            assert not (nz.reshape(*nz.shape[:-1], -1, 4).sum(-1) == 2).all(), name
    # Embeddings, norms, biases untouched; pruning is idempotent.
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(dense), jax.tree.leaves(pruned)):
        names = [str(getattr(k, "key", "")) for k in path]
        if not any(tuple(names[i:i + 2]) in INPUTS for i in range(len(names))):
            np.testing.assert_array_equal(a, b, err_msg=str(names))
    again = sparsity.prune(pruned)
    jax.tree.map(np.testing.assert_array_equal, again, pruned)


def test_compress_round_trips_exactly_and_saves_half_the_values():
    run = small_run(**{"model.style": "llama", "model.num_kv_heads": 2})
    dense = model_params(run)
    pruned = sparsity.prune(dense)
    small = sparsity.compress(pruned)
    jax.tree.map(np.testing.assert_array_equal, sparsity.decompress(small), pruned)
    jax.tree.map(np.testing.assert_array_equal,  # a dense weight is pruned on the way
                 jax.jit(sparsity.decompress)(sparsity.compress(dense)), pruned)
    saved = 0
    for name, w in matmuls(pruned).items():
        s = small["blocks"][name[0]][name[1]][...]
        assert isinstance(s, sparsity.Sparse24) and s.shape == w.shape
        k = math.prod(w.shape[1:1 + INPUTS[name]])
        assert s.values.shape == (w.shape[0], k // 2) + w.shape[1 + INPUTS[name]:]
        assert s.meta.dtype == jnp.uint8 and s.meta.size == w.size // 8  # 2 bits a kept value
        saved += w.nbytes - (w.nbytes // 2 + w.size // 8)
    assert saved > 0
    assert sparsity.weight_bytes(dense) - sparsity.weight_bytes(small) == saved
    # The model runs on the compressed weights (decompressed inside each layer) as on the
    # pruned ones.
    graphdef = nnx.graphdef(Transformer(run.model, run.precision, run.task, rngs=nnx.Rngs(0)))
    tokens = jnp.arange(24).reshape(2, 12) % run.model.vocab_size
    np.testing.assert_array_equal(nnx.merge(graphdef, small)(tokens),
                                  nnx.merge(graphdef, pruned)(tokens))
    # bfloat16 and an odd number of groups per column (K = 12: the metadata's last byte padded).
    w = jax.random.normal(jax.random.key(1), (3, 12, 5), jnp.bfloat16)
    s = sparsity.compress_weight(w, 1)
    assert s.meta.shape == (3, 2, 5) and s.values.shape == (3, 6, 5)
    np.testing.assert_array_equal(sparsity.decompress_weight(s),
                                  jnp.where(sparsity.keep_mask(w, 1), w, 0))


def test_a_kept_entry_an_update_zeroes_stays_kept():
    """The masks live in the weights (no extra checkpoint state): a kept entry that lands on
    exactly 0 is nudged to the smallest normal number, so the positions cannot move."""
    w = jnp.asarray([[[0.0], [0.5], [0.0], [-2.0]]] * 2)  # [L=2, 4, 1]: keeps 1 and 3
    m = sparsity.keep_mask(w, 1)
    np.testing.assert_array_equal(m[0, :, 0], [False, True, False, True])
    updated = w.at[:, 1].set(0.0)  # the update cancels a kept weight
    assert not np.array_equal(sparsity.keep_mask(updated, 1), m)  # ties: lower position wins
    fixed = sparsity.constrain(m, updated)
    np.testing.assert_array_equal(sparsity.keep_mask(fixed, 1), m)
    assert float(fixed[0, 1, 0]) == np.finfo(np.float32).tiny


@pytest.mark.parametrize("flat,match", [
    ({"train.sparsity": "3:4"}, r"'train.sparsity' must be one of '', 'none', '2:4', got '3:4'"),
    ({"train.sparsity": "2:4", "model.mlp_dim": 130}, r"'model.mlp_dim' \(130\) must be a "
     r"multiple of 4 for train.sparsity '2:4'")])
def test_a_bad_sparsity_config_is_rejected(flat, match):
    with pytest.raises(ConfigError, match=match):
        small_run(**flat)
    for ok in ("", "none", "2:4"):
        assert small_run(**{"train.sparsity": ok}).train.sparsity == ok


def moments(opt_state) -> list[tuple[tuple[str, str], np.ndarray]]:
    """(pruned weight, Adam moment) pairs of an optimizer state."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        if ("mu" in names or "nu" in names) and "blocks" in names:
            i = names.index("blocks")
            if tuple(names[i + 1:i + 3]) in INPUTS:
                out.append((tuple(names[i + 1:i + 3]), np.asarray(jax.device_get(leaf))))
    return out


def test_masked_retraining_from_a_dense_checkpoint_keeps_its_masks_and_resumes_them(
        trained_workdir, tmp_path):
    """lm.train with train.sparsity=2:4 from a dense trained checkpoint (data=8, two
    microbatches): after the retraining steps the layer matmuls are exactly 2:4 at the dense
    weights' top-2 positions, the kept weights moved, Adam's moments are 0 at every pruned
    entry; resumed from its checkpoint, the run keeps the same positions."""
    flat = {"train.sparsity": "2:4", "train.init_from": str(trained_workdir),
            "train.sample_tokens": 0, "train.progress": False, "train.eval_every": 100,
            "train.eval_batches": 1, "mesh.data": 8, "train.microbatches": 2,
            "train.batch_size": 16, "optim.warmup_steps": 0, "optim.lr": 1e-2,
            "checkpoint.every": 2}
    run = small_run(**flat, **{"train.steps": 2})
    one = small_run(**{"mesh.data": 1})
    mesh = sharding.make_mesh(one.mesh, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        abstract = train.build(one, mesh).abstract_state().params
        _, _, _, dense = load_params(str(trained_workdir), lambda _: abstract)
    dense = jax.device_get(dense)
    want = positions(sparsity.prune(dense))

    state = train.train(run, str(tmp_path / "run"))
    params = jax.device_get(state.params)
    assert sparsity.is_2_4(params)
    got = positions(params)
    for name, w in matmuls(params).items():
        np.testing.assert_array_equal(got[name], want[name], err_msg=str(name))
        assert ((groups(w, INPUTS[name]) != 0).sum(axis=2) == 2).all(), name
        changed = (w != matmuls(dense)[name])[want[name]]
        assert changed.mean() > 0.9, name  # retrained, not frozen
    pairs = moments(state.opt_state)
    assert len(pairs) == 2 * 6  # mu and nu of every pruned weight
    for name, m in pairs:
        assert (m[~want[name]] == 0).all(), name
        assert (m[want[name]] != 0).mean() > 0.5, name

    resumed = train.train(small_run(**flat, **{"train.steps": 4}), str(tmp_path / "run"))
    assert int(resumed.step) == 4
    params = jax.device_get(resumed.params)
    for name, w in matmuls(params).items():
        np.testing.assert_array_equal(w != 0, want[name], err_msg=str(name))
    assert not np.array_equal(matmuls(params)[("mlp", "wi")], matmuls(state.params)[("mlp", "wi")])
    for name, m in moments(resumed.opt_state):
        assert (m[~want[name]] == 0).all(), name


def _steps(flat: dict, shape: dict, devices: int, batches) -> train.TrainState:
    run = small_run(**flat, **{f"mesh.{a}": n for a, n in shape.items()})
    mesh = sharding.make_mesh(run.mesh, devices=jax.devices()[:devices])
    with jax.set_mesh(mesh):
        trainer = train.build(run, mesh)
        state = trainer.prune(trainer.init())
        for b in batches:
            state, metrics = trainer.train_step(state, jax.device_put(
                b, sharding.batch_sharding(mesh)))
            assert np.isfinite(float(metrics["loss"]))
    return jax.device_get(state)


def test_a_data_fsdp_tensor_layout_and_mixed_precision_keep_the_masks_as_one_device():
    """On data x fsdp x tensor (8 devices; input axes sharded) the masked steps equal one
    device's; with float16 compute (dynamic loss scaling), bfloat16 parameters over float32
    masters, LAMB and microbatches the masks hold too (set from the masters)."""
    # SGD: its update is linear in the gradients, so the layouts' different reduction orders
    # stay rounding-sized (Adam's normalization magnifies them wherever a gradient is ~0).
    flat = {"train.sparsity": "2:4", "optim.warmup_steps": 0, "optim.lr": 0.5,
            "optim.name": "sgd"}
    batches = [np.asarray(jax.random.randint(jax.random.key(i), (8, 33), 0, 256), np.int32)
               for i in range(2)]
    initial = _steps(flat, {"data": 1}, 1, [])  # pruned, no step
    one = _steps(flat, {"data": 1}, 1, batches)
    split = _steps(flat, {"data": 2, "fsdp": 2, "tensor": 2}, 8, batches)
    want = positions(initial.params)
    for name, w in matmuls(one.params).items():  # the steps moved the kept weights only
        assert (w != matmuls(initial.params)[name])[want[name]].mean() > 0.9, name
        np.testing.assert_array_equal(w != 0, want[name], err_msg=str(name))
        np.testing.assert_array_equal(matmuls(split.params)[name] != 0, want[name])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 split.params, one.params)

    mixed_flat = flat | {"optim.name": "lamb", "optim.lr": 1e-2, "train.microbatches": 2,
                         "precision.compute_dtype": "float16", "precision.param_dtype":
                         "bfloat16", "precision.master_weights": True}
    masks = positions(_steps(mixed_flat, {"data": 2, "tensor": 2}, 4, []).master)
    mixed = _steps(mixed_flat, {"data": 2, "tensor": 2}, 4, batches)
    assert positions(mixed.master).keys() == masks.keys()
    for name, m in positions(mixed.master).items():
        np.testing.assert_array_equal(m, masks[name], err_msg=str(name))
    assert sparsity.is_2_4(mixed.master) and sparsity.is_2_4(mixed.params)
    for name, w in matmuls(mixed.master).items():
        assert ((groups(w, INPUTS[name]) != 0).sum(axis=2) == 2).all(), name
    for name, m in moments(mixed.opt_state):
        assert (m[~masks[name]] == 0).all() and (m[masks[name]] != 0).any(), name
