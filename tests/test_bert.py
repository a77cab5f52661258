"""BERT: the encoder in lm's one model definition, its dynamic masking, and its training on every
parallelism layout (the same losses as one device)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_run
from lm import sharding, tasks, train
from lm.config import MeshConfig, TaskConfig
from lm.model import Transformer
from test_sharding import MESHES, PRESET_RUN

BERT = {"model.style": "bert", "task.name": "mlm_nsp", "model.nsp_head": True,
        "task.max_predictions": 6}
CLS, SEP, PAD, MASK = 2, 3, 0, 4  # lm's WordPiece layout (tasks.Masking's defaults)


def bert_batch(seed=0, batch=8, seq=32, vocab=384) -> dict:
    """Right-padded [CLS] A [SEP] B [SEP] rows of random ids, random lengths and NSP labels."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(seq // 2, seq + 1, batch)
    lengths[0] = seq
    tokens = rng.integers(5, vocab, (batch, seq))
    types = np.zeros((batch, seq), np.int32)
    for r, n in enumerate(lengths):
        cut = rng.integers(2, n - 2)
        tokens[r, [0, cut, n - 1]] = CLS, SEP, SEP
        tokens[r, n:] = PAD
        types[r, cut + 1:n] = 1
    return {"tokens": tokens.astype(np.int32), "token_types": types,
            "lengths": lengths.astype(np.int32),
            "nsp_labels": rng.integers(0, 2, batch).astype(np.int32)}


def model(**flat):
    run = small_run(**BERT, **flat)
    return Transformer(run.model, run.precision, rngs=nnx.Rngs(0))


def test_padding_never_reaches_real_tokens_and_attention_looks_both_ways():
    m = model()
    b = bert_batch()
    hidden = lambda tokens: m.hidden(jnp.asarray(tokens), token_types=b["token_types"],
                                     lengths=b["lengths"])
    x = hidden(b["tokens"])
    r, n = 1, int(b["lengths"][1])
    assert n < 32
    padded = b["tokens"].copy()
    padded[r, n:] = 77  # whatever the padding holds
    np.testing.assert_array_equal(hidden(padded)[r, :n], x[r, :n])
    later = b["tokens"].copy()
    later[0, 20] = 99  # a later token changes an earlier one's state: not causal
    assert float(jnp.abs(hidden(later)[0, 5] - x[0, 5]).max()) > 1e-4
    # the token types matter, and an unpadded row equals lengths=None
    assert float(jnp.abs(m.hidden(jnp.asarray(b["tokens"]), lengths=b["lengths"]) - x).max()) > 1e-4
    np.testing.assert_allclose(m.hidden(jnp.asarray(b["tokens"][:1]),
                                        token_types=b["token_types"][:1])[0], x[0], atol=1e-6)


def test_the_decoder_is_tied_to_the_embedding_with_its_own_bias():
    m = model()
    x = jax.random.normal(jax.random.key(0), (2, 5, 64))
    with_bias = m.logits(x)
    m.vocab_bias[...] = jnp.arange(384.0)
    np.testing.assert_allclose(m.logits(x) - with_bias, jnp.broadcast_to(jnp.arange(384.0),
                                                                         (2, 5, 384)), atol=1e-4)
    m.embed[...] = m.embed[...] * 2  # no separate output matrix
    assert float(jnp.abs(m.logits(x) - with_bias).max()) > 1
    assert not hasattr(m, "final_norm") and not hasattr(m, "unembed")
    positions = jnp.array([[4, 0], [1, 1]])
    np.testing.assert_allclose(m.logits(x, positions),
                               jnp.take_along_axis(m.logits(x), positions[..., None], 1),
                               atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_attention_implementations_agree_with_padding(dtype, tol):
    """lm's own attention (the CPU default) and jax.nn.dot_product_attention's XLA path with
    key_value_seq_lengths (the path cuDNN's takes): logits and gradients."""
    b = bert_batch()
    grads = {}
    for impl in ("auto", "xla"):
        m = model(**{"model.attention": impl, "precision.compute_dtype": dtype})
        graphdef, params = nnx.split(m)

        def loss(p):
            mm = nnx.merge(graphdef, p)
            x = mm.hidden(jnp.asarray(b["tokens"]), token_types=b["token_types"],
                          lengths=b["lengths"])
            return (mm.logits(x).astype(jnp.float32) ** 2).mean() + mm.nsp_logits(x).sum()

        grads[impl] = jax.grad(loss)(params), loss(params)
    np.testing.assert_allclose(grads["auto"][1], grads["xla"][1], rtol=tol)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["auto"][0]))
    jax.tree.map(lambda a, c: np.testing.assert_allclose(
        np.float32(a), np.float32(c), atol=tol * scale), grads["auto"][0], grads["xla"][0])


def masks(task: TaskConfig, batch: dict, seed=0, continuation=()):
    m = tasks.Masking(vocab=1000, continuation=continuation)
    return jax.device_get(tasks.mask_batch(jax.tree.map(jnp.asarray, batch),
                                           jax.random.key(seed), task, m))


def test_masking_follows_berts_recipe():
    b = bert_batch(batch=64, seq=128, vocab=1000)
    out = masks(TaskConfig(name="mlm"), b)
    tokens, positions, w = b["tokens"], out["mlm_positions"], out["mlm_weights"] > 0
    candidates = (np.arange(128) < b["lengths"][:, None]) & ~np.isin(tokens, [CLS, SEP, PAD])
    want = np.clip(np.round(0.15 * candidates.sum(1)), 1, 128)
    np.testing.assert_array_equal(w.sum(1), want)  # exactly n per row
    rows = np.arange(64)[:, None]
    chosen = np.zeros_like(candidates)
    chosen[np.broadcast_to(rows, positions.shape)[w], positions[w]] = True
    assert chosen.sum() == w.sum()  # distinct positions
    assert not (chosen & ~candidates).any()  # never [CLS], [SEP], padding
    assert abs(chosen.sum() / candidates.sum() - 0.15) < 0.01
    np.testing.assert_array_equal(out["mlm_targets"][w], tokens[rows, positions][w])
    new = out["tokens"][chosen]
    share = lambda x: x.sum() / chosen.sum()
    assert abs(share(new == MASK) - 0.8) < 0.03
    assert abs(share((new != MASK) & (new != tokens[chosen])) - 0.1) < 0.03
    assert abs(share(new == tokens[chosen]) - 0.1) < 0.03
    np.testing.assert_array_equal(out["tokens"][~chosen], tokens[~chosen])  # the rest unchanged
    again = masks(TaskConfig(name="mlm"), b)
    np.testing.assert_array_equal(again["tokens"], out["tokens"])  # a function of the key
    assert (masks(TaskConfig(name="mlm"), b, seed=1)["tokens"] != out["tokens"]).any()
    capped = masks(TaskConfig(name="mlm", max_predictions=5), b)
    assert capped["mlm_positions"].shape == (64, 5)
    np.testing.assert_array_equal((capped["mlm_weights"] > 0).sum(1), np.minimum(want, 5))


def test_whole_word_masking_chooses_words_whole():
    b = bert_batch(batch=32, seq=128, vocab=1000)
    pieces = tuple(range(500, 1000))  # ids >= 500 continue a word
    out = masks(TaskConfig(name="mlm", whole_word_mask=True), b, continuation=pieces)
    rows = np.arange(32)[:, None]
    w = out["mlm_weights"] > 0
    chosen = np.zeros(b["tokens"].shape, bool)
    chosen[np.broadcast_to(rows, w.shape)[w], out["mlm_positions"][w]] = True
    candidates = (np.arange(128) < b["lengths"][:, None]) & ~np.isin(b["tokens"], [CLS, SEP, PAD])
    continues = np.isin(b["tokens"], pieces) & candidates
    words = 0
    for r in range(32):
        start = 0
        for t in range(128):
            if not continues[r, t]:
                start = t
            elif chosen[r, t] != chosen[r, start]:
                raise AssertionError(f"row {r}: piece {t} of the word at {start} masked apart")
        words += chosen[r].any()
    assert words == 32 and abs(chosen.sum() / candidates.sum() - 0.15) < 0.02


def steps(run, mesh, batch, n=3):
    with jax.set_mesh(mesh):
        trainer = train.build(run, mesh)
        state = trainer.init()
        placed = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
                  for k, v in batch.items()}
        losses = []
        for _ in range(n):
            state, metrics = trainer.train_step(state, placed)
            losses.append([float(metrics["loss"]), float(metrics["nsp_loss"])])
        evals = train.eval_record(jax.tree.map(float, jax.device_get(
            trainer.eval_step(state.params, placed, 0))))
    return np.array(losses), jax.device_get(state.params), evals


@pytest.fixture(scope="module")
def one_device():
    run = small_run(**BERT, **PRESET_RUN)
    return steps(run, sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]),
                 bert_batch())


@pytest.mark.parametrize("name", list(MESHES))
def test_bert_trains_the_same_model_on_every_mesh(name, one_device):
    want_losses, want_params, want_eval = one_device
    run = small_run(**BERT, **PRESET_RUN)
    losses, params, evals = steps(run, sharding.make_mesh(MeshConfig(**MESHES[name])),
                                  bert_batch())
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, err_msg=name)
    assert losses[2, 0] < losses[0, 0] - 0.01  # and it trains
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6,
                                                         err_msg=name), params, want_params)
    np.testing.assert_allclose(list(evals.values()), list(want_eval.values()), rtol=1e-5)
    assert set(evals) == {"eval_loss", "eval_mlm_accuracy", "eval_nsp_accuracy"}


@pytest.mark.parametrize("case", ["microbatches4", "pipeline2-m4", "pipeline2-interleaved"])
def test_bert_in_microbatches_and_pipelines_trains_the_same_model(case, one_device):
    """The masks are drawn for the whole step before the split, the loss is normalized by the
    step's predicted tokens, and the padding lengths travel with each pipeline micro-batch."""
    flat, mesh = {"train.microbatches": 4}, MeshConfig(data=2)
    if case.startswith("pipeline"):
        flat = {"pipeline.microbatches": 4}
        if case.endswith("interleaved"):
            flat |= {"model.num_layers": 4, "pipeline.schedule": "interleaved",
                     "pipeline.virtual_stages": 2}
        mesh = MeshConfig(data=1, pipeline=2)
    want_losses, _, want_eval = one_device
    if "model.num_layers" in flat:  # another model: compare with it on one device
        want_losses, _, want_eval = steps(
            small_run(**BERT, **PRESET_RUN, **{"model.num_layers": 4}),
            sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]), bert_batch())
    run = small_run(**BERT, **PRESET_RUN, **flat)
    devices = jax.devices()[:2]
    losses, _, evals = steps(run, sharding.make_mesh(mesh, devices=devices), bert_batch())
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, err_msg=case)
    np.testing.assert_allclose(list(evals.values()), list(want_eval.values()), rtol=1e-5)


def test_an_encoder_refuses_to_generate():
    from lm.config import ConfigError
    from lm.generate import Engine
    m = model()
    with pytest.raises(ConfigError, match="lm.predict"):
        m.decode(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), None)
    with pytest.raises(ConfigError, match="encoder"):
        Engine(*nnx.split(m))


@pytest.mark.parametrize("precision", [
    {"precision.param_dtype": "bfloat16", "precision.compute_dtype": "bfloat16",
     "optim.name": "lamb"},
    {"precision.param_dtype": "float16", "precision.compute_dtype": "float16",
     "precision.master_weights": True, "optim.name": "nvlamb", "optim.lr": 1e-2}])
def test_bert_trains_in_half_precision_with_the_lamb_family(precision):
    """The same steps as in float32 (same optimizer, same masks), within half precision: bf16
    with LAMB, fp16 with master weights, dynamic loss scaling and NVLAMB."""
    mesh = sharding.make_mesh(MeshConfig(data=2), devices=jax.devices()[:2])
    flat = {"train.steps": 4, "optim.warmup_steps": 1, "optim.lr": 1e-2, **precision}
    losses, _, evals = steps(small_run(**BERT, **flat), mesh, bert_batch(), n=4)
    full = {k: v for k, v in flat.items() if not k.startswith("precision")}
    want, _, want_evals = steps(small_run(**BERT, **full), mesh, bert_batch(), n=4)
    # (half-precision parameters start from their own rounding of the initialization)
    np.testing.assert_allclose(losses[:, 0], want[:, 0], rtol=2e-2)  # masked-LM
    np.testing.assert_allclose(losses[:, 1], want[:, 1], atol=5e-2)  # next sentence, ~ln 2
    np.testing.assert_allclose(evals["eval_loss"], want_evals["eval_loss"], rtol=2e-2)
