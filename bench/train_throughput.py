"""Training throughput of `lm` against its peers, measured in one run on this machine.

The model is the one the peer scripts in ../shared/bench build: 4 layers, d_model 256, 4 heads,
vocab 8192, seq 128, global batch 16, fp32, AdamW. GPT-2 style runs against Hugging Face's GPT-2;
Llama style (SwiGLU 1024) against Hugging Face's Llama and MaxText 0.2.5. Prints tokens/s, model
TFLOP/s (the same FLOP count for every system), the ratio to each peer and the fraction of this
machine's measured fp32 matmul roof.

    python bench/train_throughput.py                        # ours + every peer that is set up
    python bench/train_throughput.py --peers none           # ours only
    # peers: python3 -m venv ~/.cache/lm-peers/hf && ~/.cache/lm-peers/hf/bin/pip install \
    #            torch==2.13.0 transformers      (or --hf-python PATH)
    #        MaxText builds its own env on first use (needs python3.12; ~2 minutes)

Runs one system at a time: on 2 cores a concurrent run would halve both.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lm import sharding, train  # noqa: E402
from lm.config import from_config_dict, load_config_file, override  # noqa: E402

SHAPE = dict(layers=4, d_model=256, heads=4, mlp=1024, vocab=8192, seq=128, batch=16)
# --shape gpt2_small: GPT-2 small (124M) at 16 x 1024 tokens, for a GPU (with --dtype bfloat16).
SHAPES = {"cpu": dict(SHAPE),
          "gpt2_small": dict(layers=12, d_model=768, heads=12, mlp=3072, vocab=50304, seq=1024,
                             batch=16)}
DTYPE = "float32"
PEER_DIR = os.environ.get("SHARED_BENCH", os.path.join(ROOT, "..", "shared", "bench"))


def flops_per_token(style: str) -> float:
    """6 x matmul parameters (layers + output head; the input lookup is free) + attention
    12 * L * T * d (PaLM's convention, full T x T)."""
    d, L, f, v, t = SHAPE["d_model"], SHAPE["layers"], SHAPE["mlp"], SHAPE["vocab"], SHAPE["seq"]
    mlp = (3 if style == "llama" else 2) * d * f
    return 6 * (L * (4 * d * d + mlp) + d * v) + 12 * L * t * d


def matmul_roof(n: int = 2048, reps: int = 10, dtype=jnp.float32) -> float:
    """FLOP/s of a jitted fp32 n^3 matmul: the practical roof of this machine."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / np.median(times)


def ours(style: str, steps: int, scan_layers: bool) -> dict:
    flat = {"model.style": style, "model.num_layers": SHAPE["layers"],
            "model.d_model": SHAPE["d_model"], "model.num_heads": SHAPE["heads"],
            "model.num_kv_heads": SHAPE["heads"], "model.mlp_dim": SHAPE["mlp"],
            "model.vocab_size": SHAPE["vocab"], "model.max_len": SHAPE["seq"],
            "model.scan_layers": scan_layers, "train.seq_len": SHAPE["seq"],
            "train.batch_size": SHAPE["batch"], "mesh.data": 1,
            "precision.param_dtype": "float32", "precision.compute_dtype": DTYPE}
    run = from_config_dict(override(load_config_file(os.path.join(ROOT, "configs/base.py")),
                                    **flat))
    mesh = sharding.make_mesh(run.mesh, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.integers(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"] + 1)),
                           jnp.int32) for _ in range(4)]
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        trainer = train.build(run, mesh)
        state = trainer.init()
        for i in range(3):  # compile + warm up
            state, metrics = trainer.train_step(state, batches[i % 4])
        jax.block_until_ready(metrics)
        times = []
        for i in range(steps):
            t = time.perf_counter()
            state, metrics = trainer.train_step(state, batches[i % 4])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    step = float(np.median(times))
    return {"system": f"lm ({style}, {'scan' if scan_layers else 'unrolled'})",
            "train_step_s": step, "train_tokens_per_s": SHAPE["batch"] * SHAPE["seq"] / step}


def run_peer(name: str, cmd: list[str], timeout: int, env=None) -> dict | None:
    """Runs a peer script and returns its last JSON line, or None (with a note) if it failed."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode:
        print(f"  ({name} peer failed: {(out.stdout + out.stderr)[-500:]})", file=sys.stderr)
        return None
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"system": r["peer"], "train_step_s": r["train_step_s"],
            "train_tokens_per_s": r["train_tokens_per_s"]}


def hf_peer(style: str, python: str) -> dict | None:
    if not os.path.exists(python):
        print(f"  (skipping Hugging Face peer: no interpreter at {python})", file=sys.stderr)
        return None
    s = SHAPE
    return run_peer("Hugging Face", [
        python, os.path.join(PEER_DIR, "hf_peer.py"), "--arch", style,
        "--layers", str(s["layers"]), "--d-model", str(s["d_model"]), "--heads", str(s["heads"]),
        "--vocab", str(s["vocab"]), "--seq", str(s["seq"]), "--batch", str(s["batch"]),
        "--mlp", str(SHAPE["mlp"])], timeout=1200)


def maxtext_peer() -> dict | None:
    s = SHAPE
    args = [s["layers"], s["d_model"], s["heads"], s["heads"], s["mlp"], s["vocab"], s["seq"],
            s["batch"]]
    env = dict(os.environ)
    py312 = os.path.expanduser("~/.pyenv/versions/3.12.1/bin")
    if os.path.isdir(py312):  # pyenv's shim for python3.12 fails when 3.12 is not selected
        env["PATH"] = py312 + os.pathsep + env["PATH"]
    return run_peer("MaxText", ["bash", os.path.join(PEER_DIR, "maxtext_peer.sh"),
                                *map(str, args)], timeout=1800, env=env)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--styles", default="gpt2,llama")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--peers", default="hf,maxtext", help="comma list of hf, maxtext, or none")
    p.add_argument("--hf-python", default=os.environ.get(
        "LM_PEER_HF_PYTHON", os.path.expanduser("~/.cache/lm-peers/hf/bin/python")))
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on a GPU)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    global DTYPE
    SHAPE.update(SHAPES[args.shape])
    DTYPE = args.dtype
    peers = set(args.peers.split(",")) - {"none", ""}

    gpu = jax.devices()[0].platform == "gpu"
    n = 8192 if gpu else 2048
    roof = matmul_roof(n, dtype=jnp.dtype(args.dtype))
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}; {args.dtype} {n}^3 matmul roof "
          f"{roof / 1e12:.2f} TFLOP/s; model {SHAPE}")
    rows = []
    for style in args.styles.split(","):
        fpt = flops_per_token(style)
        results = [ours(style, args.steps, scan_layers=False),
                   ours(style, args.steps, scan_layers=True)]
        if "hf" in peers:
            results.append(hf_peer(style, args.hf_python))
        if "maxtext" in peers and style == "llama":
            results.append(maxtext_peer())
        results = [r for r in results if r]
        best_peer = max((r["train_tokens_per_s"] for r in results
                         if not r["system"].startswith("lm")), default=None)
        best_ours = max(r["train_tokens_per_s"] for r in results if r["system"].startswith("lm"))
        print(f"\n{style} style, {fpt / 1e6:.1f} MFLOP/token")
        print(f"  {'system':58s} {'tokens/s':>9s} {'TFLOP/s':>8s} {'of roof':>8s} {'lm best / this':>15s}")
        for r in results:
            tflops = r["train_tokens_per_s"] * fpt / 1e12
            r.update(style=style, model_tflops=tflops, roof_fraction=tflops * 1e12 / roof,
                     lm_ratio=best_ours / r["train_tokens_per_s"])
            print(f"  {r['system']:58s} {r['train_tokens_per_s']:9.0f} {tflops:8.3f} "
                  f"{r['roof_fraction']:8.1%} {r['lm_ratio']:14.2f}x")
        if best_peer:
            print(f"  lm vs the faster peer: {best_ours / best_peer:.2f}x (target 1.5x)")
        rows += results
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"roof_flops": roof, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
