"""Checkpoints, exact resume and faults, through the real `python -m lm.train` where it matters:
SIGKILL and SIGTERM mid-run, damaged checkpoints, another mesh, a non-finite loss, a bad disk."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, small_run
from lm import sharding, train
from lm.checkpoint import Checkpointer, load_params
from lm.config import MeshConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lm.data.corpus import prepare_stdlib
    return prepare_stdlib(str(tmp_path_factory.mktemp("data") / "stdlib"))


def command(workdir, data, *extra):
    # configs/tiny.py at full size (~0.3 s a step here: slow enough to be killed mid-run), one
    # device, a constant learning rate after warmup so that train.steps does not change it.
    return [sys.executable, "-m", "lm.train", "--config", "configs/tiny.py", "--workdir",
            str(workdir), f"--config.data.path={data}", "--config.mesh.data=1",
            "--config.train.log_every=1", "--config.train.eval_every=1000",
            "--config.train.sample_tokens=0", "--config.train.progress=False",
            "--config.optim.schedule=constant", "--config.optim.warmup_steps=5", *extra]


def losses(workdir):
    """step -> loss, the last record of each step (a resumed run logs its steps again)."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


ONE_DEVICE = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def run(cmd, timeout=600):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=ONE_DEVICE)


def start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=ONE_DEVICE)


def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_sigkill_after_and_during_a_save_resumes_bit_for_bit(tmp_path, data):
    whole = run(command(tmp_path / "whole", data, "--config.train.steps=20",
                        "--config.checkpoint.every=10"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    want = losses(tmp_path / "whole")
    assert sorted(want) == list(range(1, 21))

    def kill_then_resume(workdir, every, when, resumed):
        proc = start(command(workdir, data, "--config.train.steps=20",
                             f"--config.checkpoint.every={every}"))
        wait_for(when, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert max(losses(workdir)) < 20  # it really died mid-run
        assert Checkpointer(str(workdir), read_only=True).all_steps() == [resumed]
        again = run(command(workdir, data, "--config.train.steps=20",
                            f"--config.checkpoint.every={every}"))
        assert again.returncode == 0, again.stderr[-2000:]
        assert f"resumed from step {resumed}" in again.stdout + again.stderr
        got = losses(workdir)
        assert [got[s] for s in range(resumed + 1, 21)] == [want[s] for s in range(resumed + 1,
                                                                                   21)]

    # After the step-10 checkpoint is complete.
    kill_then_resume(tmp_path / "after", 10, lambda: (tmp_path / "after" / "checkpoints" /
                                                      "10").is_dir(), resumed=10)
    # During the asynchronous save of step 10 (orbax writes STEP.orbax-checkpoint-tmp, renamed
    # when complete; ~0.6 s here): the next start resumes from step 5, the last complete one.
    during = tmp_path / "during" / "checkpoints"
    kill_then_resume(tmp_path / "during", 5, lambda: (during / "5").is_dir() and any(
        p.name.startswith("10.orbax-checkpoint-tmp") for p in during.iterdir()), resumed=5)
    assert not (during / "10").exists()


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path, data):
    workdir = tmp_path / "run"
    proc = start(command(workdir, data, "--config.train.steps=1000"))
    metrics = workdir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = max(losses(workdir))
    assert 3 <= stopped < 1000
    assert f"received SIGTERM: saved step {stopped}" in out + err
    assert Checkpointer(str(workdir), read_only=True).all_steps() == [stopped]

    again = run(command(workdir, data, f"--config.train.steps={stopped + 2}"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from step {stopped}" in again.stdout + again.stderr
    assert max(losses(workdir)) == stopped + 2


def test_damaged_checkpoints_fall_back_and_incompatible_ones_are_refused_renaming_nothing(
        tmp_path, data):
    workdir = tmp_path / "run"
    ckpts = workdir / "checkpoints"
    first = run(command(workdir, data, "--config.train.steps=8", "--config.checkpoint.every=1",
                        "--config.checkpoint.keep=2", "--config.checkpoint.keep_every=4"))
    assert first.returncode == 0, first.stderr[-2000:]
    # keep 2 most recent, and every multiple of 4
    assert Checkpointer(str(workdir), read_only=True).all_steps() == [4, 7, 8]

    # Another optimizer: refused (exit 2) naming the optimizer state; nothing renamed.
    other = run(command(workdir, data, "--config.train.steps=9", "--config.optim.name=sgd"))
    assert other.returncode == 2, other.stderr[-2000:]
    assert "optim.name: saved 'adamw', now 'sgd'" in other.stderr
    assert "the optimizer state differs" in other.stderr and "Traceback" not in other.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["4", "7", "8"]

    # Truncated state files: set aside as 8.damaged, resumed from 7.
    for root, _, files in os.walk(ckpts / "8" / "state"):
        for name in files:  # truncate every file of the newest checkpoint's state
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    again = run(command(workdir, data, "--config.train.steps=9"))
    assert again.returncode == 0, again.stderr[-2000:]
    log = again.stdout + again.stderr
    assert "checkpoint step 8" in log and "is damaged" in log and "resumed from step 7" in log
    assert (ckpts / "8.damaged").is_dir()  # set aside, not deleted
    assert sorted(losses(workdir)) == list(range(1, 10))
    # 4 is still kept: the first run promised it (keep_every=4), whatever this run says.
    assert Checkpointer(str(workdir), read_only=True).all_steps() == [4, 7, 9]

    # A truncated config item of the newest step: generation reads the step before (and renames
    # nothing: a reader leaves the workdir alone); training sets it aside and resumes.
    config = ckpts / "9" / "config" / "metadata"
    config.write_bytes(config.read_bytes()[:len(config.read_bytes()) // 2])
    gen = subprocess.run([sys.executable, "-m", "lm.generate", "--checkpoint", str(workdir),
                          "--prompt", "def ", "--max-new-tokens", "4", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=ONE_DEVICE)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert f"checkpoint {ckpts / '9'} is damaged" in gen.stderr and "nothing renamed" in gen.stderr
    assert len(json.loads(gen.stdout)["token_ids"]) >= 1
    assert (ckpts / "9").is_dir()
    resumed = run(command(workdir, data, "--config.train.steps=10"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 7" in resumed.stdout + resumed.stderr
    assert (ckpts / "9.damaged").is_dir()


def test_transient_restore_failures_rename_nothing_and_one_step_has_no_fallback(
        tmp_path, monkeypatch):
    """Out of memory while restoring is not damage: the error is named, nothing is renamed.
    (OOM cannot be provoked here, so orbax's restore is made to raise what XLA raises.)"""
    import shutil

    from lm.config import ConfigError
    run_cfg = small_run(**{"train.steps": 2, "mesh.data": 1})
    mesh = sharding.make_mesh(run_cfg.mesh, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        trainer = train.build(run_cfg, mesh)
        ckpt = Checkpointer(str(tmp_path))
        for step in (1, 2):
            ckpt.save(step, trainer.init(), {}, run_cfg.to_dict())
        ckpt.close()
        abstract = trainer.abstract_state()

        def out_of_memory(*args, **kwargs):
            raise ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2G")
        ckpt = Checkpointer(str(tmp_path))
        monkeypatch.setattr(ckpt.manager, "restore", out_of_memory)
        with pytest.raises(ConfigError, match="cannot read checkpoint .*RESOURCE_EXHAUSTED"):
            ckpt.restore_latest(abstract, run_cfg.to_dict(), log=print)
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
        monkeypatch.undo()
        ckpt.close()

        # A damaged step named explicitly is an error (no silent fallback); the workdir falls
        # back to step 1.
        shutil.rmtree(tmp_path / "checkpoints" / "2" / "state" / "d")
        with pytest.raises(ConfigError, match="checkpoints/2 .*it is damaged"):
            load_params(str(tmp_path / "checkpoints" / "2"), lambda _: abstract.params)
        messages = []
        _, _, step, _ = load_params(str(tmp_path), lambda _: abstract.params, messages.append)
        assert step == 1 and "checkpoints/2 is damaged" in messages[0]
        assert (tmp_path / "checkpoints" / "2").is_dir()


def test_a_checkpoint_restores_onto_other_meshes_and_as_parameters_only(tmp_path):
    flat = {"train.steps": 3, "optim.warmup_steps": 1}
    batches = [jax.random.randint(jax.random.key(i), (8, 33), 0, 256) for i in range(3)]

    def trainer_on(shape):
        mesh = sharding.make_mesh(MeshConfig(**shape),
                                  devices=jax.devices()[:int(np.prod(list(shape.values())))])
        return mesh, train.build(small_run(**flat, **{f"mesh.{k}": v for k, v in shape.items()}),
                                 mesh)

    mesh, trainer = trainer_on({"data": 8})
    with jax.set_mesh(mesh):
        state = trainer.init()
        for b in batches[:2]:
            state, _ = trainer.train_step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
        ckpt = Checkpointer(str(tmp_path))
        ckpt.save(2, state)
        ckpt.close()
        saved_params = jax.device_get(state.params)
        _, metrics = trainer.train_step(state, jax.device_put(batches[2],
                                                              sharding.batch_sharding(mesh)))
    want = float(metrics["loss"])

    for shape in ({"data": 1, "fsdp": 4, "tensor": 2}, {"data": 1}):
        mesh, trainer = trainer_on(shape)
        with jax.set_mesh(mesh):
            ckpt = Checkpointer(str(tmp_path), read_only=True)
            restored = ckpt.restore(2, trainer.abstract_state())
            ckpt.close()
            wq = restored.params["blocks"]["attn"]["wq"][...]
            assert wq.sharding.mesh.shape == mesh.shape
            _, metrics = trainer.train_step(restored, jax.device_put(
                batches[2], sharding.batch_sharding(mesh)))
        assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5), shape

    # Parameters only, under another optimizer (LAMB: another optimizer-state tree).
    run_lamb = small_run(**flat, **{"optim.name": "lamb", "mesh.data": 1})
    mesh = sharding.make_mesh(run_lamb.mesh, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        trainer = train.build(run_lamb, mesh)
        abstract = trainer.abstract_state().params
        _, _, step, params = load_params(str(tmp_path), lambda _: abstract)
        fresh = trainer.init_from_params(params)
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(fresh.params), saved_params)
    assert int(fresh.step) == 0


def test_a_non_finite_loss_stops_the_run_and_names_a_checkpoint_whose_loss_is_finite(
        tmp_path, data):
    workdir = tmp_path / "run"
    diverge = command(workdir, data, "--config.train.steps=50", "--config.optim.name=sgd",
                      "--config.optim.lr=1e6", "--config.optim.warmup_steps=0",
                      "--config.checkpoint.every=1")
    proc = run(diverge)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "the loss is nan at step" in proc.stderr or "the loss is inf at step" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = int(proc.stderr.split(" at step ")[1].split(":")[0])
    steps = Checkpointer(str(workdir), read_only=True).all_steps()
    # The loss of step `bad` came from the parameters of step bad - 1: that checkpoint is set
    # aside (renamed, not deleted), and the one named is older.
    assert steps and max(steps) == bad - 2
    assert (workdir / "checkpoints" / f"{bad - 1}.nonfinite").is_dir()
    assert f"The last good checkpoint is step {bad - 2}" in proc.stderr
    first = losses(workdir)
    assert all(np.isfinite(first[s]) for s in range(1, bad))

    again = run(diverge)  # the same command: it resumes from the named checkpoint
    assert f"resumed from step {bad - 2}" in again.stdout + again.stderr, again.stderr[-2000:]
    assert np.isfinite(losses(workdir)[bad - 1])  # the next step's loss is finite


def test_consecutive_skipped_steps_under_fp16_loss_scaling_stop_the_run(tmp_path, data):
    # float16 compute turns on dynamic loss scaling (non-finite steps are skipped); a huge
    # learning rate makes every step after the first overflow. A smaller model for speed.
    proc = run(command(tmp_path / "run", data, "--config.train.steps=200",
                       "--config.precision.compute_dtype=float16", "--config.optim.name=sgd",
                       "--config.optim.lr=1e6", "--config.optim.warmup_steps=0",
                       "--config.checkpoint.every=20", "--config.model.num_layers=1",
                       "--config.model.d_model=64", "--config.model.mlp_dim=128",
                       "--config.train.seq_len=32", "--config.train.batch_size=4"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "50 consecutive steps were skipped (steps 2-51" in proc.stderr
    assert "loss scale 1 at step 51" in proc.stderr  # backed off to precision.min_scale
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert max(r["step"] for r in records) < 60  # it stopped, not ran to 200
    assert [r["skipped_steps"] for r in records if r["step"] <= 51] == list(range(51))
    # Checkpoints 20 and 40 hold the step-1 parameters that overflowed: set aside, none named.
    assert Checkpointer(str(tmp_path / "run"), read_only=True).all_steps() == []
    assert (tmp_path / "run" / "checkpoints" / "40.nonfinite").is_dir()
    assert "The last good checkpoint is none" in proc.stderr


def test_an_unwritable_workdir_and_a_full_disk_are_clear_errors(tmp_path, data):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run(command(blocker / "run", data, "--config.train.steps=2"))
    assert proc.returncode == 2 and "is not writable" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

    disk = tmp_path / "small-disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk")
    try:
        proc = run(command(disk / "run", data, "--config.train.steps=2"), timeout=300)
    finally:
        subprocess.run(["umount", str(disk)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    # (orbax's writer thread also logs its own traceback before ours)
    assert "lm.train: error: cannot write checkpoints" in proc.stderr
    assert "No space left" in proc.stderr


def test_the_train_state_is_stored_in_the_dict_layout_of_older_checkpoints(tmp_path):
    """On disk the state is the dict lm has always written (master weights as opt_state
    {"master", "tx"}): a checkpoint written as that dict restores into a TrainState, and a
    TrainState reads back as that dict."""
    run = small_run(**{"precision.param_dtype": "bfloat16", "precision.master_weights": True,
                       "mesh.data": 2})
    mesh = sharding.make_mesh(run.mesh, devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        trainer = train.build(run, mesh)
        state = trainer.init()
        as_dict = lambda s: {"step": s.step, "params": s.params, "loss_scale": s.loss_scale,
                             "opt_state": {"master": s.master, "tx": s.opt_state}}
        old = Checkpointer(str(tmp_path / "old"), async_save=False)
        old.save(1, as_dict(state))
        restored = old.restore(1, trainer.abstract_state())
        old.close()
        new = Checkpointer(str(tmp_path / "new"), async_save=False)
        new.save(1, state)
        read_as_dict = new.restore(1, as_dict(trainer.abstract_state()))
        new.close()
    assert isinstance(restored, train.TrainState) and restored.master is not None
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, jax.device_get(a),
                                     jax.device_get(b))
    same(restored, state)
    same(read_as_dict, as_dict(state))


def test_resume_may_change_how_layers_run_but_not_the_model():
    """model.remat / scan_layers / attention only change execution: a run resumes with others;
    a changed shape (or optimizer) is incompatible, by name."""
    from lm.checkpoint import _config_diff
    from lm.config import defaults
    saved = defaults().to_dict()
    now = defaults().to_dict()
    now["model"].update(remat="full", scan_layers=False, attention="xla")
    assert _config_diff(saved, now) == []
    now["model"]["num_layers"] += 1
    now["optim"]["name"] = "lamb"
    assert _config_diff(saved, now) == [
        f"model.num_layers: saved {saved['model']['num_layers']}, now "
        f"{now['model']['num_layers']}", "optim.name: saved 'adamw', now 'lamb'"]
