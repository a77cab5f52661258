"""The real entry point, end to end: `python -m lm.train` for 2 steps on data=8."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_pulse(tmp_path, variant):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lm.train", "--config", f"configs/tiny.py:{variant}",
         "--workdir", str(workdir), "--config.train.steps=2", "--config.train.log_every=1",
         "--config.train.eval_every=2", "--config.train.eval_batches=1",
         "--config.train.sample_tokens=8", "--config.train.seq_len=64",
         "--config.mesh.data=8", "--config.checkpoint.every=1"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'data': 8" in proc.stderr + proc.stdout
    assert "----- sample -----" in proc.stdout

    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    for r in train_records:
        assert set(r) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
                          "tflops_per_device", "mfu", "hfu"}
        assert 0 < r["loss"] < 10 and r["grad_norm"] > 0
    # Step 1 compiles and ends the first window (log_every=1): no speed yet, nulls not zeros.
    assert train_records[0]["tokens_per_s"] == 0.0 and train_records[0]["step_time_s"] is None
    assert train_records[1]["step_time_s"] > 0 and train_records[1]["mfu"] is None  # CPU
    assert [r["step"] for r in records if "eval_loss" in r] == [2]

    config = json.loads((workdir / "config.json").read_text())
    assert config["mesh"]["data"] == 8 and config["train"]["steps"] == 2
    assert config["model"]["style"] == variant

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(workdir / "tb"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "step_time_s"} <= scalars
    assert "mfu" not in scalars  # None on CPU: left out of TensorBoard
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert [e.step for e in events.Scalars("step_time_s")] == [2]

    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]  # periodic + final
    restored = restore_final(workdir, variant)
    assert int(restored.step) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))
    # The loader's state rides in each checkpoint: the next batch after 1 and after 2 steps.
    from lm.checkpoint import Checkpointer
    ckpt = Checkpointer(str(workdir))
    saved = [ckpt.restore_loader_state(s) for s in (1, 2)]
    ckpt.close()
    assert [(d["epoch"], d["position"]) for d in saved] == [(0, 16), (0, 32)]
    assert saved[0]["seq_len"] == 64 and saved[0]["seed"] == 0
    # The embedded corpus went through lm.data.prepare, cached in the workdir.
    manifest = json.loads((workdir / "data" / "stdlib" / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "bytes" and saved[0]["fingerprint"] == \
        manifest["fingerprint"]
    from lm.data.tokenizer import ByteTokenizer, from_workdir
    assert isinstance(from_workdir(str(workdir)), ByteTokenizer)


def test_log_lines_carry_step_time_flops_and_mfu(trained_workdir):
    """Each log record: seconds per step, model TFLOP/s per device from lm.plan's FLOPs, and MFU
    / HFU against lm.hardware's peak (None on CPU, whose peak is unknown)."""
    from lm import plan
    from lm.config import from_config_dict
    run = from_config_dict(json.loads((trained_workdir / "config.json").read_text()))
    cost = plan.plan(run, jax.device_count())
    records = [json.loads(l) for l in (trained_workdir / "metrics.jsonl").read_text().splitlines()]
    (r,) = [r for r in records if "loss" in r]  # step 2 (log_every 20), the first timed step
    assert r["step"] == 2 and r["step_time_s"] > 0 and r["tflops_per_device"] > 0
    model_flops = r["tflops_per_device"] * r["step_time_s"] * jax.device_count() * 1e12
    assert model_flops == pytest.approx(cost["flops_per_step"], rel=1e-6)
    assert r["tflops_per_device_with_recompute"] == r["tflops_per_device"]  # no remat
    assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(
        run.train.batch_size * run.train.seq_len, rel=1e-6)
    assert r["mfu"] is None and r["hfu"] is None


def test_a_profile_trace_names_the_model_loss_and_optimizer_scopes(trained_workdir):
    """train.profile_steps="2:2": WORKDIR/tb/plugins/profile/RUN/HOST.xplane.pb, whose HLO
    metadata names each op by its scopes (forward `jvp(...)`, backward `transpose(jvp(...))`)."""
    traces = list((trained_workdir / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1, traces
    trace = traces[0].read_bytes()
    for scope in (b"jit(train_step)/jvp(block)/attention/", b"jit(train_step)/jvp(block)/mlp/",
                  b"jit(train_step)/transpose(jvp(block))/attention/",
                  b"jit(train_step)/jvp(loss)/", b"jit(train_step)/optimizer/"):
        assert scope in trace, scope


def test_profiler_traces_the_steps_of_its_window_this_run_takes(tmp_path):
    from lm.train import _Profiler
    resumed_past = _Profiler((2, 3), str(tmp_path / "past"))
    with resumed_past:
        for step in (4, 5):
            resumed_past.before(step)
            assert not resumed_past.after(step, None)
    assert not (tmp_path / "past").exists()
    inside = _Profiler((2, 4), str(tmp_path / "inside"))
    with inside:  # resumed at step 3, stopped (a signal) after step 3: leaving ends the trace
        inside.before(3)
        assert inside.tracing and not inside.after(3, None)
    assert not inside.tracing and inside.traced == "3-4"
    assert list((tmp_path / "inside" / "plugins" / "profile").glob("*/*.xplane.pb"))
    ended = _Profiler((1, 1), str(tmp_path / "ended"))
    with ended:
        ended.before(1)
        assert ended.after(1, None) and not ended.tracing
        ended.before(2)
        assert not ended.tracing


def restore_final(workdir, variant):
    """Restores the last checkpoint into the train state's shapes and shardings (8 devices)."""
    from flax import nnx

    from lm import sharding, train
    from lm.checkpoint import Checkpointer
    from lm.config import from_config_dict, load_config_file, override
    run = from_config_dict(override(load_config_file(f"{ROOT}/configs/tiny.py:{variant}"),
                                    **{"mesh.data": 8}))
    mesh = sharding.make_mesh(run.mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        abstract = train.build(run, mesh).abstract_state()
        ckpt = Checkpointer(str(workdir))
        state = ckpt.restore(ckpt.latest_step(), abstract)
        ckpt.close()
    return state


def test_trains_on_a_prepared_bpe_corpus(tmp_path):
    """data.path: a BPE corpus from lm.data.prepare; the tokenizer lands in the workdir; a model
    vocabulary smaller than the tokenizer's is a clear error."""
    from conftest import small_run

    from lm import train
    from lm.config import ConfigError
    from lm.data.corpus import stdlib_files
    from lm.data.prepare import prepare
    from lm.data.tokenizer import BPETokenizer, from_workdir
    data = str(tmp_path / "data")
    prepare(stdlib_files()[:60], data, vocab_size=1000, val_fraction=0.1, progress=False)
    run = small_run(**{"data.path": data, "model.vocab_size": 1024, "train.steps": 3,
                       "train.eval_every": 3, "train.eval_batches": 1, "train.sample_tokens": 4,
                       "train.progress": False, "mesh.data": 8})
    state = train.train(run, str(tmp_path / "run"))
    assert int(state.step) == 3
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [3]
    tok = from_workdir(str(tmp_path / "run"))
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 1000
    assert tok.decode(tok.encode("def f(): ✓")) == "def f(): ✓"
    with pytest.raises(ConfigError, match="model.vocab_size' \\(512\\) is smaller"):
        train.train(small_run(**{"data.path": data, "model.vocab_size": 512}),
                    str(tmp_path / "run2"))
    with pytest.raises(ConfigError, match="not a prepared data directory"):
        train.train(small_run(**{"data.path": str(tmp_path)}), str(tmp_path / "run3"))


def test_batch_not_divisible_by_data_axis_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lm.train", "--config", "configs/tiny.py",
         "--workdir", str(tmp_path), "--config.train.batch_size=12", "--config.mesh.data=8"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "train.batch_size" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def stdlib_data(tmp_path_factory):
    from lm.data.corpus import prepare_stdlib
    return prepare_stdlib(str(tmp_path_factory.mktemp("data") / "stdlib"))


@pytest.mark.parametrize("optimizer,lr,dtype", [
    ("adamw", 3e-3, "float32"), ("lamb", 2e-2, "float32"), ("nvlamb", 2e-2, "float32"),
    ("lars", 10.0, "float32"), ("sgd", 0.5, "float32"), ("adamw", 3e-3, "bfloat16"),
    ("adamw", 3e-3, "float16")])
def test_every_optimizer_and_compute_dtype_trains_tiny(tmp_path, stdlib_data, optimizer, lr,
                                                        dtype):
    """The CLI entry point (in process) on configs/tiny.py, made smaller: the loss falls."""
    from lm import train
    train.main(["--config", f"{ROOT}/configs/tiny.py", "--workdir", str(tmp_path),
                f"--config.data.path={stdlib_data}", f"--config.optim.name={optimizer}",
                f"--config.optim.lr={lr}", f"--config.precision.compute_dtype={dtype}",
                "--config.model.num_layers=2", "--config.model.d_model=64",
                "--config.model.mlp_dim=128", "--config.train.steps=40",
                "--config.train.batch_size=8", "--config.train.seq_len=64",
                "--config.train.log_every=10", "--config.train.eval_every=40",
                "--config.train.eval_batches=1", "--config.train.sample_tokens=0",
                "--config.train.progress=False", "--config.optim.warmup_steps=5"])
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    losses = [r["loss"] for r in train_records]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(r["skipped_steps"] == 0 for r in train_records)
    assert train_records[0]["loss_scale"] == (2.0 ** 16 if dtype == "float16" else 1.0)
