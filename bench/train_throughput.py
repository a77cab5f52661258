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
import contextlib
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

from lm import hardware, plan, sharding, train  # noqa: E402
from lm import model as lm_model  # noqa: E402
from lm.config import from_config_dict, load_config_file, override  # noqa: E402

SHAPE = dict(layers=4, d_model=256, heads=4, kv_heads=4, mlp=1024, vocab=8192, seq=128,
             batch=16)
# For a GPU (with --dtype bfloat16): GPT-2 small (124M) at 16 x 1024 tokens; configs/llama_1b.py
# (TinyLlama's shape) at sequence 2048, whose batch --batch auto picks from lm.plan's memory.
SHAPES = {"cpu": dict(SHAPE),
          "gpt2_small": dict(layers=12, d_model=768, heads=12, kv_heads=12, mlp=3072,
                             vocab=50304, seq=1024, batch=16),
          "llama_1b": dict(layers=22, d_model=2048, heads=32, kv_heads=4, mlp=5632, vocab=32000,
                           seq=2048, batch=8)}
DTYPE = "float32"
PEER_DIR = os.environ.get("SHARED_BENCH", os.path.join(ROOT, "..", "shared", "bench"))


def run_config(style: str, scan_layers: bool = True, remat: str = "none",
               attention: str = "auto", batch: int | None = None):
    """The bench model as a RunConfig: SHAPE computed in DTYPE on one device, float32
    parameters and optimizer state."""
    flat = {"model.style": style, "model.num_layers": SHAPE["layers"],
            "model.d_model": SHAPE["d_model"], "model.num_heads": SHAPE["heads"],
            "model.num_kv_heads": SHAPE["kv_heads"] if style == "llama" else SHAPE["heads"],
            "model.mlp_dim": SHAPE["mlp"], "model.vocab_size": SHAPE["vocab"],
            "model.max_len": SHAPE["seq"], "model.scan_layers": scan_layers,
            "model.remat": remat, "model.attention": attention, "train.seq_len": SHAPE["seq"],
            "train.batch_size": batch or SHAPE["batch"], "mesh.data": 1,
            "precision.param_dtype": "float32", "precision.compute_dtype": DTYPE}
    return from_config_dict(override(load_config_file(os.path.join(ROOT, "configs/base.py")),
                                     **flat))


def flops_per_token(run) -> float:
    """lm.plan's model FLOPs (6 x matmul parameters + 12 L T d, PaLM's convention; recompute
    excluded) per token: the same count for every system."""
    return plan.plan(run, 1)["flops_per_step"] / (run.train.batch_size * run.train.seq_len)


def largest_batch(style: str, remat: str, attention: str, memory_bytes: float) -> int:
    """The largest power-of-two batch whose lm.plan estimate fits in 85% of `memory_bytes`."""
    batch = 1
    fits = lambda b: plan.plan(run_config(style, remat=remat, attention=attention, batch=b),
                               1)["total_bytes"] <= 0.85 * memory_bytes
    while fits(2 * batch) and batch < 4096:
        batch *= 2
    return batch


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


def ours(run, steps: int) -> dict:
    m, batch = run.model, run.train.batch_size
    mesh = sharding.make_mesh(run.mesh, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.integers(0, SHAPE["vocab"], (batch, SHAPE["seq"] + 1)),
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
    options = [m.style, "scan" if m.scan_layers else "unrolled"] + (
        [f"remat {m.remat}"] if m.remat != "none" else []) + (
        [f"attention {m.attention}"] if m.attention != "auto" else [])
    return {"system": f"lm ({', '.join(options)}, batch {batch})", "batch": batch,
            "train_step_s": step, "train_tokens_per_s": batch * SHAPE["seq"] / step}


def run_peer(name: str, cmd: list[str], timeout: int, env=None) -> dict | None:
    """Runs a peer script and returns its last JSON line, or None (with a note) if it failed."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode:
        print(f"  ({name} peer failed: {(out.stdout + out.stderr)[-500:]})", file=sys.stderr)
        return None
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"system": r["peer"], "batch": r.get("batch", SHAPE["batch"]),
            "train_step_s": r["train_step_s"], "train_tokens_per_s": r["train_tokens_per_s"]}


def hf_peer(style: str, python: str, device: str, batch: int, remat: bool) -> dict | None:
    """../shared/bench/hf_peer.py on the CPU (fp32); bench/hf_train_peer.py on a GPU (DTYPE
    autocast, gradient checkpointing with `remat`)."""
    if not os.path.exists(python):
        print(f"  (skipping Hugging Face peer: no interpreter at {python})", file=sys.stderr)
        return None
    s = SHAPE
    common = ["--arch", style, "--layers", str(s["layers"]), "--d-model", str(s["d_model"]),
              "--heads", str(s["heads"]), "--vocab", str(s["vocab"]), "--seq", str(s["seq"]),
              "--batch", str(batch), "--mlp", str(s["mlp"])]
    if device == "cpu":
        return run_peer("Hugging Face", [python, os.path.join(PEER_DIR, "hf_peer.py"), *common],
                        timeout=1200)
    kv = ["--kv-heads", str(s["kv_heads"])] if style == "llama" else []
    return run_peer("Hugging Face", [
        python, os.path.join(ROOT, "bench", "hf_train_peer.py"), *common, *kv,
        "--device", device, "--dtype", DTYPE] + (["--remat"] if remat else []), timeout=1200)


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
    p.add_argument("--layers", default="unrolled,scan", help="unrolled, scan or both")
    p.add_argument("--remat", default="none", help="comma list of model.remat values")
    p.add_argument("--attention", default="auto", help="comma list of model.attention values")
    p.add_argument("--steering", default="all", help="comma list of lm.model.STEERING variants: "
                   "all, none, or -NAME (all but NAME: -dense, -materialize_grad, -softmax)")
    p.add_argument("--batch", default="", help="sequences per step (default: the shape's); "
                   "'auto': the largest power of two lm.plan fits in 85%% of device memory, "
                   "per remat value")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    global DTYPE
    SHAPE.update(SHAPES[args.shape])
    DTYPE = args.dtype
    peers = set(args.peers.split(",")) - {"none", ""}

    device = jax.devices()[0]
    gpu = device.platform == "gpu"
    n = 8192 if gpu else 2048
    roof = matmul_roof(n, dtype=jnp.dtype(args.dtype))
    peak = hardware.peak_flops(device.device_kind, args.dtype)
    memory = (device.memory_stats() or {}).get("bytes_limit") if gpu else None
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__} on {device.device_kind}; "
          f"{args.dtype} {n}^3 matmul roof {roof / 1e12:.2f} TFLOP/s; datasheet peak "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; model {SHAPE}")
    rows = []
    for style in args.styles.split(","):
        results = []
        for remat in args.remat.split(","):
            for attention in args.attention.split(","):
                if args.batch == "auto":
                    batch = largest_batch(style, remat, attention, memory or 16e9)
                else:
                    batch = int(args.batch) if args.batch else SHAPE["batch"]
                if attention == args.attention.split(",")[0]:
                    peer_batch = batch  # the peer's sdpa is a fused kernel too
                for layers in args.layers.split(","):
                    for variant in args.steering.split(","):
                        with steering(variant):
                            results.append(_ours_or_note(run_config(
                                style, layers == "scan", remat, attention, batch), args.steps))
                        if variant != "all" and results[-1]:
                            results[-1]["system"] += f" steering {variant}"
            if "hf" in peers and (gpu or remat == args.remat.split(",")[0]):  # CPU: no remat
                results.append(hf_peer(style, args.hf_python, "cuda" if gpu else "cpu",
                                       peer_batch, remat != "none"))
        if "maxtext" in peers and style == "llama" and not gpu:
            results.append(maxtext_peer())
        results = [r for r in results if r]
        fpt = flops_per_token(run_config(style))
        best_peer = max((r["train_tokens_per_s"] for r in results
                         if not r["system"].startswith("lm")), default=None)
        best_ours = max((r["train_tokens_per_s"] for r in results
                         if r["system"].startswith("lm")), default=float("nan"))
        print(f"\n{style} style, {fpt / 1e6:.1f} MFLOP/token")
        print(f"  {'system':64s} {'tokens/s':>9s} {'TFLOP/s':>8s} {'of roof':>8s} {'MFU':>6s} "
              f"{'lm best / this':>15s}")
        for r in results:
            tflops = r["train_tokens_per_s"] * fpt / 1e12
            r.update(style=style, model_tflops=tflops, roof_fraction=tflops * 1e12 / roof,
                     mfu=tflops * 1e12 / peak if peak else None,
                     lm_ratio=best_ours / r["train_tokens_per_s"])
            mfu = f"{r['mfu']:6.1%}" if peak else f"{'-':>6s}"
            print(f"  {r['system']:64s} {r['train_tokens_per_s']:9.0f} {tflops:8.3f} "
                  f"{r['roof_fraction']:8.1%} {mfu} {r['lm_ratio']:14.2f}x")
        if best_peer:
            print(f"  lm vs the faster peer: {best_ours / best_peer:.2f}x (target 1.2x)")
        rows += results
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device_kind": device.device_kind, "roof_flops": roof,
                       "peak_flops": peak, "results": rows}, f, indent=2)


@contextlib.contextmanager
def steering(variant: str):
    """lm.model.STEERING for a --steering variant on this backend (restored afterwards)."""
    saved = dict(lm_model.STEERING)
    names = set(saved) if variant == "all" else set() if variant == "none" else \
        set(saved) - {variant.removeprefix("-")}
    if variant not in ("all", "none") and variant.removeprefix("-") not in saved:
        raise SystemExit(f"--steering {variant}: valid are all, none, "
                         + ", ".join(f"-{n}" for n in saved))
    backend = jax.default_backend()
    lm_model.STEERING.update({n: (backend,) if n in names else () for n in saved})
    try:
        yield
    finally:
        lm_model.STEERING.update(saved)


def _ours_or_note(run, steps: int) -> dict | None:
    """`ours`, or None with a note when the configuration does not run here (out of memory, an
    attention implementation this backend lacks): the other rows still get measured."""
    try:
        return ours(run, steps)
    except Exception as e:  # noqa: BLE001 - a benchmark row, reported and skipped
        print(f"  (lm {run.model.style} remat {run.model.remat} attention "
              f"{run.model.attention} batch {run.train.batch_size} failed: "
              f"{str(e).splitlines()[0][:300]})", file=sys.stderr)
        return None


if __name__ == "__main__":
    main()
