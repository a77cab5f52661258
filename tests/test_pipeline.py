"""Pipeline parallelism: every schedule, alone and with data / fsdp / tensor axes, trains the same
model as no pipeline; bad layouts are clear errors."""
import os

import jax
import numpy as np
import pytest

from conftest import small_run
from lm import plan, sharding, train
from lm.config import ConfigError, MeshConfig
from lm.pipeline import Pipeline

# SGD (updates linear in the gradients, see test_sharding), 8 layers so that 4 stages x 2
# virtual stages divide them, 16 sequences so that 8 micro-batches split over 2 data devices.
BASE = {"train.steps": 3, "optim.name": "sgd", "optim.warmup_steps": 1, "optim.lr": 0.5,
        "model.num_layers": 8, "train.batch_size": 16}


def three_steps(run, mesh):
    batch = jax.random.randint(jax.random.key(0), (16, 33), 0, 256)
    with jax.set_mesh(mesh):
        trainer = train.build(run, mesh)
        state = trainer.init()
        losses = []
        for _ in range(3):
            state, metrics = trainer.train_step(state, jax.device_put(
                batch, sharding.batch_sharding(mesh)))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.fixture(scope="module")
def no_pipeline():
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    return three_steps(small_run(**BASE), mesh)


CASES = {  # name: (mesh, pipeline settings, other overrides)
    "pp2-gpipe-m4": (dict(data=1, pipeline=2), dict(microbatches=4), {}),
    "pp4-gpipe-m8": (dict(data=1, pipeline=4), dict(microbatches=8), {}),
    "pp2-interleaved-m4": (dict(data=1, pipeline=2),
                           dict(schedule="interleaved", virtual_stages=2, microbatches=4), {}),
    "pp4-interleaved-m8": (dict(data=1, pipeline=4),
                           dict(schedule="interleaved", virtual_stages=2, microbatches=8), {}),
    "pp2-data2-tensor2-gpipe-m8": (dict(data=2, tensor=2, pipeline=2), dict(microbatches=8), {}),
    "pp4-data2-interleaved-m4": (dict(data=2, pipeline=4),
                                 dict(schedule="interleaved", virtual_stages=2, microbatches=4),
                                 {}),
    "pp2-fsdp2-tensor2-zero3-interleaved-m4": (
        dict(data=1, fsdp=2, tensor=2, pipeline=2),
        dict(schedule="interleaved", virtual_stages=2, microbatches=4),
        {"mesh.rules": "zero3+tp"}),
    "pp2-data2-accumulate2-remat-m4": (dict(data=2, pipeline=2), dict(microbatches=4),
                                       {"train.microbatches": 2, "model.remat": "full"}),
    # 1F1B: the backward scheduled by hand (lm.pipeline.run_1f1b), the same layouts.
    "pp2-1f1b-m4": (dict(data=1, pipeline=2), dict(schedule="1f1b", microbatches=4), {}),
    "pp4-1f1b-m8": (dict(data=1, pipeline=4), dict(schedule="1f1b", microbatches=8), {}),
    "pp2-data2-tensor2-1f1b-m8": (dict(data=2, tensor=2, pipeline=2),
                                  dict(schedule="1f1b", microbatches=8), {}),
    "pp2-fsdp2-tensor2-zero3-1f1b-m4": (dict(data=1, fsdp=2, tensor=2, pipeline=2),
                                        dict(schedule="1f1b", microbatches=4),
                                        {"mesh.rules": "zero3+tp"}),
    "pp2-data2-accumulate2-remat-1f1b-m4": (dict(data=2, pipeline=2),
                                            dict(schedule="1f1b", microbatches=4),
                                            {"train.microbatches": 2, "model.remat": "full"}),
    # Interleaved 1F1B (Megatron's): v = 2 passes round the ring, groups of S micro-batches.
    "pp2-1f1b-v2-m4": (dict(data=1, pipeline=2),
                       dict(schedule="1f1b", virtual_stages=2, microbatches=4), {}),
    "pp4-1f1b-v2-m8": (dict(data=1, pipeline=4),
                       dict(schedule="1f1b", virtual_stages=2, microbatches=8), {}),
    "pp2-fsdp2-tensor2-zero3-1f1b-v2-m4": (dict(data=1, fsdp=2, tensor=2, pipeline=2),
                                           dict(schedule="1f1b", virtual_stages=2,
                                                microbatches=4), {"mesh.rules": "zero3+tp"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_trains_the_same_model(case, no_pipeline):
    mesh_shape, pipe, extra = CASES[case]
    run = small_run(**BASE, **{f"pipeline.{k}": v for k, v in pipe.items()}, **extra)
    devices = jax.devices()[:int(np.prod(list(mesh_shape.values())))]
    mesh = sharding.make_mesh(MeshConfig(**mesh_shape), devices=devices)
    losses, params = three_steps(run, mesh)
    want_losses, want_params = no_pipeline
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert losses[2] < losses[0] - 0.01  # and it trains
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params, want_params)


def test_stage_parameters_live_on_their_stage():
    run = small_run(**BASE, **{"pipeline.microbatches": 4})
    mesh = sharding.make_mesh(MeshConfig(data=2, pipeline=4))
    with jax.set_mesh(mesh):
        trainer = train.build(run, mesh)
        state = trainer.init()
        batch = jax.ShapeDtypeStruct((16, 33), "int32", sharding=sharding.batch_sharding(mesh))
        hlo = trainer.train_step.lower(state, batch).compile().as_text()
    wq = state.params["blocks"]["attn"]["wq"][...]
    assert wq.shape[0] == 8 and wq.sharding.spec[0] == "pipeline"
    # Each device holds 2 of the 8 layers, and activations move between stages point to point.
    assert {s.data.shape[0] for s in wq.addressable_shards} == {2}
    assert "collective-permute" in hlo


@pytest.mark.parametrize("flat,message", [
    ({"model.num_layers": 6, "pipeline.microbatches": 4}, "num_layers (6) must be divisible"),
    ({"pipeline.microbatches": 2}, "multiple of mesh.pipeline (4)"),
    ({"pipeline.microbatches": 4, "pipeline.schedule": "interleaved",
      "pipeline.virtual_stages": 4}, "mesh.pipeline x pipeline.virtual_stages (4 x 4)"),
    ({"pipeline.microbatches": 8, "mesh.data": 4, "mesh.pipeline": 2},
     "must split over mesh.data x mesh.fsdp (4)"),
])
def test_bad_pipeline_layouts_are_clear_errors(flat, message):
    flat = {**BASE, "mesh.data": 2, "mesh.pipeline": 4, **flat}
    run = small_run(**flat)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.build(run, sharding.make_mesh(run.mesh))


def test_config_rejects_bad_pipeline_settings():
    with pytest.raises(ConfigError, match="pipeline.schedule"):
        small_run(**{"pipeline.schedule": "zigzag"})
    with pytest.raises(ConfigError, match="must be 1 for schedule 'gpipe'"):
        small_run(**{"pipeline.virtual_stages": 2})
    with pytest.raises(ConfigError, match="task.name 'lm' so far"):
        run = small_run(**{**BASE, "model.style": "bert", "task.name": "mlm",
                           "mesh.pipeline": 2, "pipeline.schedule": "1f1b",
                           "pipeline.microbatches": 4})
        train.build(run, sharding.make_mesh(run.mesh, devices=jax.devices()[:2]))
    with pytest.raises(ConfigError, match="must divide the batch"):
        small_run(**{"pipeline.microbatches": 3})


def test_bubble_and_plan():
    assert Pipeline(4, 8).bubble == pytest.approx(3 / 11)
    assert Pipeline(4, 8, schedule="1f1b").bubble == pytest.approx(3 / 11)
    assert Pipeline(4, 32, schedule="1f1b").kept_microbatches == 7  # 2S - 1, whatever M
    assert Pipeline(4, 32).kept_microbatches == 35
    assert Pipeline(4, 8, 2).bubble == pytest.approx(3 / 19)
    run = small_run(**BASE, **{"mesh.data": 2, "mesh.pipeline": 4, "pipeline.microbatches": 8})
    p = plan.plan(run, devices=8)
    assert p["pipeline_bubble"] == pytest.approx(3 / 11)
    assert p["pipeline"]["layers_per_stage"] == 2
    assert p["comm_bytes"]["pipeline"] > 0
    # Per stage: the layer parameters are split 4 ways, GPipe keeps every micro-batch in flight.
    flat = plan.plan(small_run(**BASE, **{"mesh.data": 2, "mesh.pipeline": 1}), devices=2)
    assert p["params_bytes"] < flat["params_bytes"] / 2
    more = plan.plan(small_run(**BASE, **{"mesh.data": 2, "mesh.pipeline": 4,
                                          "pipeline.microbatches": 4}), devices=8)
    assert more["pipeline_bubble"] > p["pipeline_bubble"]


def test_1f1b_memory_is_flat_in_the_micro_batches_and_planned():
    """A fixed micro-batch (2 sequences of 128), M = 4 and 16 over 4 stages: XLA's compiled
    memory per device grows with M under gpipe and stays flat under 1F1B (its stages keep at
    most 2S - 1 micro-batches' inputs), and lm.plan's estimate is within 15% of it."""
    model = {**BASE, "model.d_model": 128, "model.mlp_dim": 512, "model.max_len": 128,
             "train.seq_len": 128, "mesh.data": 1, "mesh.pipeline": 4}
    xla, est = {}, {}
    for schedule in ("gpipe", "1f1b"):
        for m in (4, 16):
            run = small_run(**{**model, "train.batch_size": 2 * m, "pipeline.microbatches": m,
                               "pipeline.schedule": schedule})
            xla[schedule, m] = plan.compiled_memory(run, jax.devices()[:4])["total_bytes"]
            est[schedule, m] = plan.plan(run, devices=4)["total_bytes"]
    print({k: round(v / 1e6, 1) for k, v in xla.items()})
    assert xla["gpipe", 16] > 1.5 * xla["gpipe", 4]
    assert xla["1f1b", 16] < 1.02 * xla["1f1b", 4]
    assert xla["1f1b", 16] < xla["gpipe", 16] / 2
    for key in est:
        if key[0] == "1f1b":
            assert abs(est[key] / xla[key] - 1) < 0.15, (key, est[key], xla[key])


@pytest.mark.parametrize("schedule", ["interleaved", "1f1b"])
def test_lm_train_runs_a_pipeline(tmp_path, schedule):
    """The real entry point with pipeline 2 x data 4: training, evaluation, the final sample
    (generated without the pipeline from the stage-sharded parameters) and the checkpoint."""
    import json
    import subprocess
    import sys

    from conftest import ROOT
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lm.train", "--config", "configs/tiny.py", "--workdir",
         str(workdir), "--config.train.steps=3", "--config.train.log_every=1",
         "--config.train.eval_every=3", "--config.train.eval_batches=1",
         "--config.train.sample_tokens=8", "--config.train.seq_len=64", "--config.mesh.data=4",
         "--config.mesh.pipeline=2", f"--config.pipeline.schedule={schedule}",
         f"--config.pipeline.virtual_stages={2 if schedule == 'interleaved' else 1}",
         "--config.pipeline.microbatches=4"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "----- sample -----" in proc.stdout
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
    assert [r["step"] for r in records if "eval_loss" in r] == [3]
    assert os.listdir(workdir / "checkpoints") == ["3"]
