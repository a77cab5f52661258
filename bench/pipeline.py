"""Pipeline schedules on fake CPU devices: step time against the ideal, the bubble predicted vs
measured, and compiled memory per device against the number of micro-batches.

    python bench/pipeline.py [--steps 5] [--json bench/results-pipeline-cpu.json]

The fake devices of one CPU share its cores, so a pipelined step executes every stage's work
one after another: the bubble shows up as extra compute (stages running on stale data while
they wait), not as idle time. The ideal is the same step without a pipeline on one device;
measured bubble = 1 - ideal / pipelined, predicted (S - 1) / (v M + S - 1) (1F1B: as
gpipe; its backward also recomputes each stage's forward, which the ideal does not). Memory comes from
XLA's memory analysis of the compiled step (arguments + temporaries, per device) with a fixed
micro-batch size, so the batch grows with M.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

S_DEVICES = 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={S_DEVICES}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lm import plan, sharding, train  # noqa: E402
from lm.config import from_config_dict, load_config_file, override  # noqa: E402
from lm.pipeline import Pipeline  # noqa: E402

MODEL = {"model.num_layers": 8, "model.d_model": 256, "model.num_heads": 4,
         "model.num_kv_heads": 4, "model.mlp_dim": 1024, "model.vocab_size": 384,
         "model.max_len": 128, "model.scan_layers": True, "train.seq_len": 128}


def make_run(stages: int, micro: int, virtual: int, batch: int, remat: str = "none",
             schedule: str = ""):
    flat = {**MODEL, "train.batch_size": batch, "mesh.data": 1, "mesh.pipeline": stages,
            "model.remat": remat}
    if stages > 1:
        flat.update({"pipeline.microbatches": micro, "pipeline.virtual_stages": virtual,
                     "pipeline.schedule": schedule or ("interleaved" if virtual > 1 else
                                                       "gpipe")})
    return from_config_dict(override(load_config_file(os.path.join(ROOT, "configs/base.py")),
                                     **flat))


def step_time(run, steps: int) -> float:
    mesh = sharding.make_mesh(run.mesh, devices=jax.devices()[:run.mesh.pipeline])
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 384, (run.train.batch_size, run.train.seq_len + 1)).astype(np.int32)
    with jax.set_mesh(mesh):
        trainer = train.build(run, mesh)
        state = trainer.init()
        batch = jax.device_put(tokens, sharding.batch_sharding(mesh))
        for _ in range(2):  # compile, warm up
            state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def compiled_bytes(run) -> float:
    return plan.compiled_memory(run, devices=jax.devices()[:run.mesh.pipeline])["total_bytes"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--first-row", type=int, default=0, help="skip the first timing rows")
    p.add_argument("--first-memory", type=int, default=0,
                   help="skip the first schedules of the memory table (0 gpipe, 1 interleaved)")
    args = p.parse_args()
    results = {"device": jax.devices()[0].device_kind, "model": MODEL, "timing": [],
               "memory": []}

    batch, stages = 32, 4
    ideal = step_time(make_run(1, 1, 1, batch), args.steps)
    print(f"{MODEL['model.num_layers']} layers, d_model {MODEL['model.d_model']}, "
          f"batch {batch} x {MODEL['train.seq_len']}, {stages} stages on fake CPU devices; "
          f"no pipeline, 1 device: {ideal * 1e3:.0f} ms/step")
    print("| schedule | M | v | step ms | vs ideal | bubble predicted | bubble measured |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for schedule, virtual, micro in [("gpipe", 1, 4), ("gpipe", 1, 8), ("gpipe", 1, 16),
                                     ("interleaved", 2, 4), ("interleaved", 2, 8),
                                     ("interleaved", 2, 16), ("1f1b", 1, 4), ("1f1b", 1, 8),
                                     ("1f1b", 1, 16), ("1f1b", 2, 8)][args.first_row:]:
        run = make_run(stages, micro, virtual, batch, schedule=schedule)
        t = step_time(run, args.steps)
        predicted = Pipeline(stages, micro, virtual, schedule).bubble
        measured = 1 - ideal / t
        row = {"schedule": schedule, "stages": stages,
               "microbatches": micro, "virtual_stages": virtual, "step_s": t,
               "ideal_s": ideal, "bubble_predicted": predicted, "bubble_measured": measured}
        results["timing"].append(row)
        print(f"| {row['schedule']} | {micro} | {virtual} | {t * 1e3:.0f} | {t / ideal:.2f}x | "
              f"{predicted:.1%} | {measured:.1%} |", flush=True)

    print("\ncompiled memory per device (arguments + temp), 2 sequences per micro-batch, "
          f"{stages} stages; the plan's estimate beside it")
    print("| schedule | remat | M | XLA MB | lm.plan MB |")
    print("|---|---|---:|---:|---:|")
    for schedule, virtual in [("gpipe", 1), ("interleaved", 2), ("1f1b", 1),
                              ("1f1b", 2)][args.first_memory:]:
        for remat in ("none", "full"):
            for micro in (4, 8, 16, 32):
                run = make_run(stages, micro, virtual, batch=2 * micro, remat=remat,
                               schedule=schedule)
                xla = compiled_bytes(run)
                est = plan.plan(run, devices=stages)["total_bytes"]
                row = {"schedule": schedule, "virtual_stages": virtual, "remat": remat,
                       "microbatches": micro, "xla_bytes": xla, "plan_bytes": est}
                results["memory"].append(row)
                print(f"| {row['schedule']} | {remat} | {micro} | {xla / 1e6:.1f} | "
                      f"{est / 1e6:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
