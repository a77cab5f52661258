"""int8: weight-only, and calibrated weights + activations (`python -m lm.quantize`)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import ROOT, small_run
from lm.generate import Engine, SamplingParams
from lm.quantize import (Int8Array, Int8Matmul, calibrate, calibration_batches, entropy_amax,
                         map_matmuls, percentile_amax, quantize, quantize_static,
                         weight_bytes)

ONE_DEVICE = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """configs/tiny.py trained 150 steps on one device (it learned: held-out perplexity ~13 where
    an untrained byte model has ~360)."""
    workdir = tmp_path_factory.mktemp("int8") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lm.train", "--config", "configs/tiny.py", "--workdir",
         str(workdir), "--config.train.steps=150", "--config.train.eval_every=150",
         "--config.train.eval_batches=1", "--config.train.sample_tokens=0",
         "--config.train.progress=False", "--config.mesh.data=1",
         "--config.optim.warmup_steps=20"], capture_output=True, text=True, cwd=ROOT,
        timeout=900, env=ONE_DEVICE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return workdir


def held_out(workdir, n=4):
    from lm.data.dataset import Dataset
    from lm.data.loader import Loader, LoaderState
    val = Loader(Dataset(str(workdir / "data" / "stdlib")).split("val"), 16, 128, 0,
                 shuffle=False)
    return [np.asarray(val.batch_at(LoaderState(0, i * 16))) for i in range(n)]


def perplexity(graphdef, params, batches) -> float:
    loss = jax.jit(lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, p)(b[:, :-1]).astype(jnp.float32), b[:, 1:]).mean())
    return float(np.exp(np.mean([loss(params, jnp.asarray(b)) for b in batches])))


def test_weight_only_int8_keeps_held_out_perplexity_within_1_percent(tiny):
    """Weight-only int8 of every layer matmul (the memory option): held-out perplexity within 1%
    relative of float32, weights ~3x smaller."""
    engine = Engine.from_checkpoint(str(tiny))
    params, qparams = engine.params, quantize(engine.params)
    wo = qparams["blocks"]["attn"]["wo"][...]
    assert isinstance(wo, Int8Array) and wo.q.dtype == jnp.int8
    assert wo.scale.shape == (4, 1, 1, 256)  # one scale per layer and output channel
    assert weight_bytes(qparams) < weight_bytes(params) / 2.5
    batches = held_out(tiny)
    fp32, int8 = (perplexity(engine.graphdef, p, batches) for p in (params, qparams))
    assert fp32 < 30  # it learned (byte-level: ~e^5.9 = 360 untrained, ~13 here)
    print(f"held-out perplexity fp32 {fp32:.4f}, weight-only int8 {int8:.4f}")
    assert abs(int8 / fp32 - 1) < 0.01, (fp32, int8)
    proc = subprocess.run([sys.executable, "-m", "lm.generate", "--checkpoint", str(tiny),
                           "--prompt", "def ", "--max-new-tokens", "8", "--quantize", "int8",
                           "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and len(json.loads(proc.stdout)["token_ids"]) >= 1, proc.stderr


def test_calibrated_int8_checkpoint_keeps_perplexity_and_greedy_output(tiny, tmp_path):
    """`lm.quantize --method entropy` on the training split: a checkpoint whose layer matmuls
    run int8 x int8 -> int32, held-out perplexity within 1% of float32, and greedy continuations
    of held-out prompts that mostly match (threshold: at least 6 of 8 prompts' 16 tokens
    identical; measured 8 of 8). lm.generate, lm.serve and lm.export load it like any other."""
    out = tmp_path / "int8"
    proc = subprocess.run([sys.executable, "-m", "lm.quantize", "--checkpoint", str(tiny),
                           "--calibrate", str(tiny / "data" / "stdlib"), "--method", "entropy",
                           "--samples", "32", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=ONE_DEVICE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "quantization.json").read_text())
    assert report["calibration_tokens"] == 32 * 128
    assert sorted(report["int8"]) == ["blocks/attn/wk", "blocks/attn/wo", "blocks/attn/wq",
                                      "blocks/attn/wv", "blocks/mlp/wi", "blocks/mlp/wo"]
    for path, amax in report["amax"].items():  # clipped at or below what was seen
        assert len(amax) == 4 and all(0 < a <= m * (1 + 1e-6) for a, m in zip(
            amax, report["observed_max"][path])), path

    f, q = Engine.from_checkpoint(str(tiny)), Engine.from_checkpoint(str(out))
    wq = q.params["blocks"]["attn"]["wq"][...]
    assert isinstance(wq, Int8Matmul) and wq.q.dtype == jnp.int8 and wq.x_scale.shape == (4,)
    hlo = jax.jit(lambda p, t: nnx.merge(q.graphdef, p)(t)).lower(
        q.params, np.zeros((1, 8), np.int32)).as_text()
    assert "xi8>, tensor<256x4x64xi8>) -> tensor<1x8x4x64xi32>" in hlo  # the int8 matmul
    assert q.tokenizer is not None

    batches = held_out(tiny)
    fp32, int8 = perplexity(f.graphdef, f.params, batches), perplexity(q.graphdef, q.params,
                                                                       batches)
    print(f"held-out perplexity fp32 {fp32:.4f}, calibrated int8 {int8:.4f}")
    assert fp32 < 30 and abs(int8 / fp32 - 1) < 0.01, (fp32, int8)
    prompts = [[int(t) for t in row[:24]] for row in batches[3][:8]]
    greedy = SamplingParams(max_new_tokens=16)
    same = sum(a == b for a, b in zip(f.generate(prompts, greedy), q.generate(prompts, greedy)))
    print(f"greedy continuations identical: {same} of 8")
    assert same >= 6

    gen = subprocess.run([sys.executable, "-m", "lm.generate", "--checkpoint", str(out),
                          "--prompt", "def ", "--max-new-tokens", "8", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=ONE_DEVICE)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert json.loads(gen.stdout)["token_ids"] == q.generate(
        [list(q.tokenizer.encode_prompt("def "))], SamplingParams(max_new_tokens=8))[0]
    from lm.serve import build
    slots, _, _ = build(str(out), max_batch_size=2)  # what lm.serve --checkpoint runs
    served = [[slots.insert(i, ids, SamplingParams(max_new_tokens=4))] for i, ids in
              enumerate(prompts[:2])]
    for _ in range(3):
        for ids, token in zip(served, slots.step().token_b):
            ids.append(int(token))
    assert served == q.generate(prompts[:2], SamplingParams(max_new_tokens=4))
    from lm.export import export, load
    export(str(out), str(tmp_path / "export"))
    assert load(str(tmp_path / "export")).generate(prompts[:2], 8) == q.generate(
        prompts[:2], SamplingParams(max_new_tokens=8))

    onnx = subprocess.run([sys.executable, "-m", "lm.export", "--checkpoint", str(out), "--out",
                           str(tmp_path / "onnx"), "--format", "onnx"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env=ONE_DEVICE)
    assert onnx.returncode == 2 and "int8 checkpoint" in onnx.stderr, onnx.stderr[-800:]

    # A second calibration into the same directory, or of the int8 checkpoint, is refused.
    for checkpoint, where in ((tiny, out), (out, tmp_path / "again")):
        bad = subprocess.run([sys.executable, "-m", "lm.quantize", "--checkpoint",
                              str(checkpoint), "--calibrate", str(tiny / "data" / "stdlib"),
                              "--out", str(where)], capture_output=True, text=True, cwd=ROOT,
                             timeout=300, env=ONE_DEVICE)
        assert bad.returncode == 2 and ("already holds checkpoints" in bad.stderr or
                                        "already quantized" in bad.stderr), bad.stderr[-800:]
    assert not (tmp_path / "again").exists()
    train = subprocess.run([sys.executable, "-m", "lm.train", "--config", "configs/tiny.py",
                            "--workdir", str(tmp_path / "t"), "--config.model.quantized=int8"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300, env=ONE_DEVICE)
    assert train.returncode != 0 and "for inference" in train.stderr, train.stderr[-800:]


def test_calibration_thresholds_on_a_known_distribution():
    """|x| ~ half-normal(1) plus 0.01% outliers at 50: max keeps the outliers, the 99.9th
    percentile and the entropy threshold clip them, and entropy keeps the bulk (> 3 sigma)."""
    rng = np.random.default_rng(0)
    a = np.abs(np.concatenate([rng.normal(size=1_000_000), np.full(100, 50.0)]))
    top = float(a.max())
    hist = np.histogram(a, bins=2048, range=(0, top))[0]
    p999 = percentile_amax(hist, top, 99.9)
    assert abs(p999 - np.percentile(a, 99.9)) <= top / 2048 * 1.01
    ent = entropy_amax(hist, top)
    print(f"max {top:.2f}, p99.9 {p999:.3f}, entropy {ent:.3f}")
    assert 3 < ent < 0.5 * top
    assert percentile_amax(hist, top, 100.0) == pytest.approx(top)


def test_int8_matmul_and_an_encoder_calibrated_in_process():
    """A BERT-style encoder (any style takes the same path): calibrated on its own inputs, its
    final hidden states stay within 5% (relative, RMS) of float32's, every matmul int8."""
    run = small_run(**{"model.style": "bert", "model.norm_eps": 1e-12, "task.name": "mlm"})
    from lm.model import Transformer
    model = Transformer(run.model, run.precision, run.task, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    # Weights 10x their init (std 0.2): the layers, not the embeddings, then make the output.
    params = map_matmuls(params, lambda _, w, __: w * 10)
    rng = np.random.default_rng(1)
    batches = [rng.integers(5, 384, (4, 32)).astype(np.int32) for _ in range(3)]
    forward = lambda p, t: nnx.merge(graphdef, p).hidden(t)
    for method in ("max", "percentile", "entropy"):
        amax, maxima = calibrate(forward, params, batches, method)
        assert set(amax) == {"blocks/attn/wq", "blocks/attn/wk", "blocks/attn/wv",
                             "blocks/attn/wo", "blocks/mlp/wi", "blocks/mlp/wo"}
        qparams = quantize_static(params, amax)
        held = rng.integers(5, 384, (4, 32)).astype(np.int32)
        want, got = jax.jit(forward)(params, held), jax.jit(forward)(qparams, held)
        err = float(jnp.sqrt(jnp.mean((got - want) ** 2) / jnp.mean(want ** 2)))
        print(f"{method}: relative RMS error {err:.4f}")
        assert 1e-4 < err < 0.05, (method, err)  # int8 ran, and is close
    assert "xi8>) -> tensor<4x32x4x16xi32>" in jax.jit(forward).lower(qparams, held).as_text()
    with pytest.raises(ValueError, match="expected one of max, percentile, entropy"):
        calibrate(forward, params, batches, "kl")


def test_calibration_text_and_jsonl_files(tmp_path):
    from lm.config import ConfigError
    from lm.data.tokenizer import ByteTokenizer
    (tmp_path / "a.txt").write_text("x" * 100)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "y" * 70}) + "\n\n" +
                                      json.dumps({"text": "z" * 40, "id": 1}) + "\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "w" * 40}) + "\n" +
                                      json.dumps({"body": "z" * 40}) + "\n")
    tok = ByteTokenizer()
    with pytest.raises(ConfigError, match=r"c.jsonl:2: no string field 'text'"):
        calibration_batches([str(tmp_path / "*.jsonl")], tok, 16, 99, 4)
    got = calibration_batches([str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl")], tok, 16,
                              99, 4)
    assert sum(len(b) for b in got) == (100 + 70 + 40) // 16 and got[0].shape == (4, 16)
    assert bytes(got[0][0].tolist()) == b"x" * 16
    with pytest.raises(ConfigError, match="not a file or a prepared data directory"):
        calibration_batches([str(tmp_path / "missing.txt")], tok, 16, 9, 4)
    with pytest.raises(ConfigError, match="fewer than one window"):
        calibration_batches([str(tmp_path / "a.txt")], tok, 128, 9, 4)
