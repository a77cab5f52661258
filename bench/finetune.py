"""The point of pretraining, measured: fine-tuning the pretrained `configs/tiny.py:bert` on the
shipped offline task (lm.data.downstream) against the same fine-tuning from random
initialisation (same config, budget, tokenizer and shape), next to the majority class.

    python bench/finetune.py [--pretrained W] [--task corrupted] [--steps 240]
        [--json bench/results-finetune-cpu-DATE.json]

Without --pretrained it first runs `python -m lm.train --config configs/tiny.py:bert` as shipped
(400 steps; ~10 minutes on 2 CPU cores) into a temporary workdir. Stated in advance (the issue's
margins): from pretraining the dev accuracy beats the majority class by >= MARGIN_MAJORITY and
random initialisation by >= MARGIN_RANDOM; the output says whether this run met them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MARGIN_MAJORITY, MARGIN_RANDOM = 0.10, 0.05


def lm_train(*args: str) -> float:
    """Runs `python -m lm.train ARGS` on one device; returns its wall seconds."""
    start = time.perf_counter()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "-m", "lm.train", *args,
                           "--config.train.progress=False"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"lm.train {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def last_eval(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "eval_accuracy" in r][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained", help="a tiny:bert workdir (default: pretrain one now)")
    p.add_argument("--task", default="corrupted", choices=("corrupted", "next-line"))
    p.add_argument("--steps", type=int, default=240, help="fine-tuning steps of each run")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    from lm.data import downstream

    tmp = tempfile.mkdtemp(prefix="lm-bench-finetune-")
    result = {"task": args.task, "steps": args.steps, "seq_len": args.seq_len}
    pretrained = args.pretrained
    if pretrained is None:
        pretrained = os.path.join(tmp, "pretrained")
        result["pretrain_s"] = lm_train("--config", "configs/tiny.py:bert",
                                        "--workdir", pretrained)
    with open(os.path.join(pretrained, "metrics.jsonl")) as f:
        pre = [r for r in map(json.loads, f) if "eval_mlm_accuracy" in r][-1]
    result["pretrained"] = {"step": pre["step"], **{k: pre[k] for k in pre if k != "step"}}
    task = downstream.make(os.path.join(tmp, "task"), task=args.task)
    result["dev_majority_accuracy"] = task["dev_majority_accuracy"]
    common = ["--config", "configs/finetune.py:classify",
              f"--config.data.path={tmp}/task/train.jsonl",
              f"--config.data.eval_path={tmp}/task/dev.jsonl", f"--config.train.steps={args.steps}",
              f"--config.train.eval_every={args.steps}", f"--config.train.seq_len={args.seq_len}"]
    runs = {"from_pretrained": [f"--config.train.init_from={pretrained}"],
            "from_random_init": [f"--config.data.tokenizer={pretrained}/tokenizer.json"]}
    for name, extra in runs.items():
        workdir = os.path.join(tmp, name)
        seconds = lm_train(*common, "--workdir", workdir, *extra)
        ev = last_eval(workdir)
        result[name] = {"eval_accuracy": ev["eval_accuracy"], "eval_f1": ev["eval_f1"],
                        "eval_loss": ev["eval_loss"], "wall_s": seconds}
    a, b = result["from_pretrained"]["eval_accuracy"], result["from_random_init"]["eval_accuracy"]
    majority = result["dev_majority_accuracy"]
    result["margins_stated"] = {"over_majority": MARGIN_MAJORITY, "over_random": MARGIN_RANDOM}
    result["met"] = {"over_majority": a - majority >= MARGIN_MAJORITY,
                     "over_random": a - b >= MARGIN_RANDOM}
    print(f"task {args.task}: majority {majority:.3f}, from pretrained {a:.3f} "
          f"(+{a - majority:.3f}), from random init {b:.3f}; pretraining adds {a - b:+.3f} "
          f"(stated: >= {MARGIN_MAJORITY} over majority, >= {MARGIN_RANDOM} over random: "
          f"{'met' if all(result['met'].values()) else 'NOT met'})")
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
