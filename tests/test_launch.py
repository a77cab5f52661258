"""Multi-process runs through the real launcher: launch/local.py starts real jax.distributed
processes (gloo on CPU); a crash stops the rest; sweeps tabulate and plot."""
import csv
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT

LAUNCH = os.path.join(ROOT, "launch", "local.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lm.data.corpus import prepare_stdlib
    return prepare_stdlib(str(tmp_path_factory.mktemp("data") / "stdlib"))


def train_cmd(workdir, data, steps=5):
    return [sys.executable, "-m", "lm.train", "--config", "configs/tiny.py", "--workdir",
            str(workdir), f"--config.data.path={data}", "--config.mesh.data=2",
            "--config.mesh.fsdp=2", f"--config.train.steps={steps}", "--config.train.log_every=1",
            "--config.train.eval_every=1000", "--config.train.eval_batches=1",
            "--config.train.sample_tokens=8", "--config.train.progress=False",
            "--config.model.num_layers=2", "--config.model.d_model=64",
            "--config.model.mlp_dim=128", "--config.train.batch_size=8",
            "--config.train.seq_len=64"]


def losses(workdir):
    return [json.loads(l)["loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(l)]


def test_two_processes_train_the_same_model_as_one(tmp_path, data):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    one = subprocess.run(train_cmd(tmp_path / "one", data), capture_output=True, text=True,
                         cwd=ROOT, timeout=600,
                         env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [sys.executable, LAUNCH, "-n", "2", "--devices-per-process", "2", "--"]
    two = subprocess.run([*launch, *train_cmd(tmp_path / "two", data),
                          "--config.checkpoint.every=4"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert two.returncode == 0, two.stdout[-3000:]
    # Both processes ran, process 0 alone wrote the metrics (5 records, not 10).
    assert "[0] " in two.stdout and "[1] " in two.stdout
    assert "'data': 2, 'fsdp': 2" in two.stdout
    want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(got) == 5
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Checkpoints written jointly restore in this single process (onto 4 of its devices).
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["4", "5"]
    from conftest import small_run
    from lm import sharding, train
    from lm.checkpoint import Checkpointer
    run = small_run(**{"model.num_layers": 2, "model.d_model": 64, "model.mlp_dim": 128,
                       "mesh.data": 2, "mesh.fsdp": 2, "model.max_len": 256})
    mesh = sharding.make_mesh(run.mesh, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        abstract = train.build(run, mesh).abstract_state()
        states = []
        for name in ("one", "two"):
            ckpt = Checkpointer(str(tmp_path / name), read_only=True)
            states.append(jax.device_get(ckpt.restore(5, abstract)))
            ckpt.close()
    assert int(states[1].step) == 5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *states)

    # Step 5 damaged: both processes judge it, agree, process 0 alone moves it aside, and both
    # resume from step 4 (the loss of step 5 is the unbroken run's again).
    for root, _, files in os.walk(tmp_path / "two" / "checkpoints" / "5" / "state"):
        for name in files:
            os.truncate(os.path.join(root, name), 0)
    again = subprocess.run([*launch, *train_cmd(tmp_path / "two", data, steps=5)],
                           capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "resumed from step 4" in again.stdout and "checkpoint step 5" in again.stdout
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["4", "5", "5.damaged"]
    np.testing.assert_allclose(losses(tmp_path / "two")[-1], want[4], rtol=1e-5)


def test_a_crashing_process_stops_the_others(tmp_path):
    script = ("import os, sys, time\n"
              "rank = int(os.environ['LM_PROCESS_ID'])\n"
              "print('started', rank, os.environ['LM_NUM_PROCESSES'], flush=True)\n"
              "time.sleep(1)\n"
              "sys.exit(7) if rank == 1 else time.sleep(300)\n")
    start = time.time()
    proc = subprocess.run([sys.executable, LAUNCH, "-n", "2", "--grace", "2", "--", sys.executable,
                           "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, proc.stdout
    assert time.time() - start < 60  # process 0 did not sleep its 300 s
    assert "[0] started 0 2" in proc.stdout and "[1] started 1 2" in proc.stdout
    assert "[launch] process 1 exited with status 7; stopping the others" in proc.stdout


def test_partial_distributed_flags_are_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lm.train", "--config", "configs/tiny.py",
                           "--workdir", str(tmp_path), "--num_processes=2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "--coordinator" in proc.stderr and "Traceback" not in proc.stderr


def test_a_sweep_of_two_runs_writes_the_table_and_the_plot(tmp_path, data):
    sweep = tmp_path / "two_lrs.py"
    sweep.write_text(
        'config = "configs/tiny.py"\n'
        f'base = {{"train.steps": 3, "data.path": "{data}", "train.sample_tokens": 0,\n'
        '        "train.progress": False, "train.log_every": 1, "train.eval_every": 3,\n'
        '        "train.eval_batches": 1, "model.num_layers": 2, "model.d_model": 64,\n'
        '        "model.mlp_dim": 128, "train.batch_size": 8, "train.seq_len": 64,\n'
        '        "mesh.data": 1}\n'
        'runs = [{"optim.lr": 0.001}, {"optim.lr": 0.01}]\n')
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sweep.py"), str(sweep),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [r["run"] for r in rows] == ["optim.lr=0.001", "optim.lr=0.01"]
    for r in rows:
        assert int(r["steps"]) == 3 and 0 < float(r["train_loss"]) < 10
        assert 0 < float(r["eval_loss"]) < 10 and float(r["wall_s"]) > 0
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| optim.lr=0.01 | 3 |" in table
    assert (tmp_path / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --slurm writes an array job instead of running anything.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sweep.py"), str(sweep),
                           "--out", str(tmp_path / "slurm"), "--slurm"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    script = (tmp_path / "slurm" / "sweep.sbatch").read_text()
    assert proc.returncode == 0 and "#SBATCH --array=0-1" in script
    assert script.count("--config.optim.lr=") == 2
