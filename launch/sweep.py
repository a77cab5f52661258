"""Config sweeps: run a list (or a product) of overrides of one config, then tabulate and plot.

    python launch/sweep.py SWEEP.py [--out runs/NAME] [--slurm] [--launcher "CMD ..."]

A sweep file is Python with
    config = "configs/tiny.py"                        # what --config gets
    base = {"train.steps": 200}                       # overrides every run shares (optional)
    runs = [{"optim.lr": 1e-3}, {"optim.lr": 3e-3}]   # one dict per run, and/or
    grid = {"optim.lr": [1e-3, 3e-3], "model.num_layers": [2, 4]}   # their product

Locally the runs go one after another, each in OUT/<its overrides> (a run whose workdir holds
checkpoints resumes, so rerunning a sweep continues it). At the end OUT/results.md and
OUT/results.csv hold final train / eval loss, tokens/s and wall time per run, and OUT/loss.png
the loss curves. `--slurm` instead writes OUT/sweep.sbatch, a SLURM array job with one task
per run (submit it with sbatch, then rerun with --report to tabulate). `--launcher` prefixes
each command (e.g. "python launch/local.py -n 2 --devices-per-process 4 --").
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time


def load_sweep(path: str) -> tuple[str, list[dict]]:
    spec = importlib.util.spec_from_file_location("sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise SystemExit(f"sweep: {path} defines no `config` (the --config of every run)")
    base = dict(getattr(module, "base", {}))
    runs = [dict(r) for r in getattr(module, "runs", [])]
    grid = getattr(module, "grid", {})
    if grid:
        keys = list(grid)
        runs += [dict(zip(keys, values)) for values in itertools.product(*grid.values())]
    if not runs:
        raise SystemExit(f"sweep: {path} defines no `runs` list and no `grid`")
    return module.config, [{**base, **r, "_name": run_name(r)} for r in runs]


def run_name(overrides: dict) -> str:
    name = ",".join(f"{k}={v}" for k, v in overrides.items()) or "base"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def command(config: str, workdir: str, run: dict, launcher: list[str]) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in run.items() if not k.startswith("_")]
    return [*launcher, sys.executable, "-m", "lm.train", "--config", config, "--workdir",
            workdir, *flags]


def summarise(workdir: str) -> dict:
    path = os.path.join(workdir, "metrics.jsonl")
    records = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    speeds = sorted(r["tokens_per_s"] for r in train if r.get("tokens_per_s"))
    return {"steps": train[-1]["step"] if train else 0,
            "train_loss": train[-1]["loss"] if train else float("nan"),
            "eval_loss": evals[-1]["eval_loss"] if evals else float("nan"),
            "tokens_per_s": speeds[len(speeds) // 2] if speeds else float("nan"),
            "curve": [(r["step"], r["loss"]) for r in train]}


def report(out: str, runs: list[dict], walls: dict[str, float]) -> None:
    rows = []
    for run in runs:
        s = summarise(os.path.join(out, run["_name"]))
        rows.append({"run": run["_name"], "steps": s["steps"], "train_loss": s["train_loss"],
                     "eval_loss": s["eval_loss"], "tokens_per_s": s["tokens_per_s"],
                     "wall_s": walls.get(run["_name"], float("nan")), "curve": s["curve"]})
    fields = ["run", "steps", "train_loss", "eval_loss", "tokens_per_s", "wall_s"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| run | steps | train loss | eval loss | tokens/s | wall s |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['steps']} | {r['train_loss']:.4f} | {r['eval_loss']:.4f} | "
              f"{r['tokens_per_s']:,.0f} | {r['wall_s']:.1f} |" for r in rows]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["curve"]:
            ax.plot(*zip(*r["curve"]), label=r["run"])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=120)
    print(f"wrote {out}/results.md, results.csv, loss.png")


def slurm_script(out: str, config: str, runs: list[dict], launcher: list[str]) -> str:
    cmds = [shlex.join(command(config, os.path.join(out, r["_name"]), r, launcher))
            for r in runs]
    body = "\n".join(f"  {shlex.quote(c)}" for c in cmds)
    return f"""#!/bin/bash
#SBATCH --job-name=lm-sweep
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --output={out}/slurm-%A_%a.out
# One array task per run; add your partition, nodes, GPUs and time here (see launch/slurm.sbatch
# for a multi-node run of one command).
cmds=(
{body}
)
eval "${{cmds[$SLURM_ARRAY_TASK_ID]}}"
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="a sweep file (see the module docstring)")
    p.add_argument("--out", help="output directory (default runs/sweep-<file name>)")
    p.add_argument("--slurm", action="store_true", help="write OUT/sweep.sbatch, run nothing")
    p.add_argument("--report", action="store_true", help="only tabulate and plot OUT")
    p.add_argument("--launcher", default="", help="a prefix for every command")
    args = p.parse_args(argv)
    config, runs = load_sweep(args.sweep)
    out = os.path.abspath(args.out or os.path.join(
        "runs", "sweep-" + os.path.splitext(os.path.basename(args.sweep))[0]))
    os.makedirs(out, exist_ok=True)
    launcher = shlex.split(args.launcher)
    if args.slurm:
        path = os.path.join(out, "sweep.sbatch")
        with open(path, "w") as f:
            f.write(slurm_script(out, config, runs, launcher))
        print(f"wrote {path}: sbatch it, then: python launch/sweep.py {args.sweep} --out {out} "
              "--report")
        return 0
    walls, failed = {}, []
    if not args.report:
        for i, run in enumerate(runs, 1):
            workdir = os.path.join(out, run["_name"])
            cmd = command(config, workdir, run, launcher)
            print(f"[sweep] run {i}/{len(runs)}: {shlex.join(cmd)}", flush=True)
            start = time.perf_counter()
            status = subprocess.run(cmd).returncode
            walls[run["_name"]] = time.perf_counter() - start
            if status:
                print(f"[sweep] run {run['_name']} failed with status {status}", flush=True)
                failed.append(run["_name"])
    report(out, runs, walls)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
