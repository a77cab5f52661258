"""Generation throughput of `lm.generate.Engine` against Hugging Face `generate` and the memory
roof, measured in one run on this machine.

For batch 1, 8 and 32: greedy tokens/s of prompt 16 + 64 new tokens (prefill included, as HF's
`generate` timing includes it) and the time to first token (a generation of one token). The
roof: a decode step must at least read the weights and the live KV cache once, so
tokens/s <= batch x bandwidth / (weight bytes + live cache bytes); the bandwidth is measured here
(a jitted x + 1 over an array of that many bytes, read + written: where the bytes fit a CPU
cache, the roof is the cache's).

    python bench/generate.py                          # the CPU shape, HF peer via hf_peer.py
    python bench/generate.py --shape gpt2_small --dtype bfloat16 --prompt 128 --new 128 \
        --peer-device cuda                            # on a GPU (peer: bench/hf_generate_peer.py)
    # peer set-up (CPU): python3 -m venv ~/.cache/lm-peers/hf && ~/.cache/lm-peers/hf/bin/pip \
    #     install torch==2.13.0 transformers          (or --hf-python PATH)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lm.config import from_config_dict, load_config_file, override  # noqa: E402
from lm.generate import Engine, SamplingParams  # noqa: E402
from lm.model import Transformer  # noqa: E402
from lm.quantize import quantize, weight_bytes  # noqa: E402

PEER_DIR = os.environ.get("SHARED_BENCH", os.path.join(ROOT, "..", "shared", "bench"))
SHAPES = {  # the peers' CPU shape (../shared/bench/README.md) and GPT-2 small
    "cpu": dict(layers=4, d_model=256, heads=4, mlp=1024, vocab=8192, max_len=128),
    "gpt2_small": dict(layers=12, d_model=768, heads=12, mlp=3072, vocab=50257, max_len=1024),
}


def bandwidth(nbytes: int, reps: int = 10) -> float:
    """Bytes/s of a jitted elementwise pass over an array of `nbytes` (read + write)."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    f = jax.jit(lambda x: x + 1)
    f(x).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / np.median(times)


def engine_for(shape: dict, style: str, dtype: str, cache_dtype, int8: bool) -> Engine:
    flat = {"model.style": style, "model.num_layers": shape["layers"],
            "model.d_model": shape["d_model"], "model.num_heads": shape["heads"],
            "model.num_kv_heads": shape["heads"], "model.mlp_dim": shape["mlp"],
            "model.vocab_size": shape["vocab"], "model.max_len": shape["max_len"],
            "precision.param_dtype": dtype, "precision.compute_dtype": dtype}
    run = from_config_dict(override(load_config_file(os.path.join(ROOT, "configs/base.py")),
                                    **flat))
    graphdef, params = nnx.split(Transformer(run.model, run.precision, rngs=nnx.Rngs(0)))
    return Engine(graphdef, quantize(params) if int8 else params, cache_dtype=cache_dtype)


def timed(fn, reps: int) -> float:
    fn()  # compile
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def ours(engine: Engine, batch: int, prompt: int, new: int, reps: int) -> dict:
    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, engine.cfg.vocab_size, (batch, prompt)).tolist()
    full = SamplingParams(max_new_tokens=new)
    out = engine.generate(prompts, full)
    assert all(len(x) == new for x in out)
    gen = timed(lambda: engine.generate(prompts, full), reps)
    ttft = timed(lambda: engine.generate(prompts, SamplingParams(max_new_tokens=1)), reps)
    return {"tokens_per_s": batch * new / gen, "ttft_s": ttft}


def peer(args, batch: int, new: int) -> dict | None:
    """HF generate tokens/s for batch x new tokens, or None (with a note)."""
    s = SHAPES[args.shape]
    python = shutil.which(args.hf_python) or args.hf_python
    if not os.path.exists(python):
        print(f"  (no Hugging Face peer: no interpreter at {args.hf_python})", file=sys.stderr)
        return None
    common = ["--arch", args.style, "--layers", str(s["layers"]), "--d-model", str(s["d_model"]),
              "--heads", str(s["heads"]), "--mlp", str(s["mlp"]), "--vocab", str(s["vocab"])]
    if args.peer_device == "cpu":
        cmd = [python, os.path.join(PEER_DIR, "hf_peer.py"), *common, "--steps", "1",
               "--seq", str(min(128, s["max_len"])), "--batch", "2", "--gen-batch", str(batch),
               "--prompt-len", str(args.prompt), "--new-tokens", str(new)]
    else:
        cmd = [python, os.path.join(ROOT, "bench", "hf_generate_peer.py"), *common,
               "--device", args.peer_device, "--dtype", args.dtype, "--batch", str(batch),
               "--prompt-len", str(args.prompt), "--new-tokens", str(new)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        print(f"  (peer failed: {(out.stdout + out.stderr)[-600:]})", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--style", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default="plain,int8",
                   help="comma list: plain, int8 (weights), int8kv (int8 weights + KV cache)")
    p.add_argument("--peer-device", default="cpu", help="cpu (hf_peer.py), cuda, or none")
    p.add_argument("--hf-python", default=os.environ.get(
        "LM_PEER_HF_PYTHON", os.path.expanduser("~/.cache/lm-peers/hf/bin/python")))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    shape, batches = SHAPES[args.shape], [int(b) for b in args.batches.split(",")]
    dev = jax.devices()[0]
    bw = bandwidth(2 << 30 if dev.platform == "gpu" else 256 << 20)
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__} on {dev.device_kind}; "
          f"memory bandwidth (large array) {bw / 1e9:.1f} GB/s")
    print(f"model: {args.style} {shape}, {args.dtype}; prompt {args.prompt} + {args.new} new "
          "tokens, greedy")
    variants = {"plain": (None, False), "int8": (None, True), "int8kv": ("int8", True)}
    rows = []
    peers = {}
    if args.peer_device != "none":
        print("peer: Hugging Face generate, batch " + args.batches, flush=True)
        for b in batches:
            full, first = peer(args, b, args.new), peer(args, b, 1)
            if full and first:
                peers[b] = {"tokens_per_s": full["generate_tokens_per_s"],
                            "ttft_s": b / first["generate_tokens_per_s"]}
    for name in args.variants.split(","):
        cache_dtype, int8 = variants[name]
        engine = engine_for(shape, args.style, args.dtype, cache_dtype, int8)
        wbytes = weight_bytes(engine.params)
        cfg = engine.cfg
        kv_item = 1 + 4 / cfg.head_dim if cache_dtype == "int8" else jnp.dtype(args.dtype).itemsize
        for b in batches:
            r = ours(engine, b, args.prompt, args.new, args.reps)
            live = args.prompt + args.new / 2  # mean cache positions read per step
            kv = b * live * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * kv_item
            # The bandwidth of streaming that many bytes: caches count where they fit.
            step_bw = bandwidth(int(wbytes + kv))
            roof = b * step_bw / (wbytes + kv)
            r.update(variant=name, batch=b, weight_mb=wbytes / 1e6, roof_tokens_per_s=roof,
                     step_mb=(wbytes + kv) / 1e6, step_bandwidth=step_bw,
                     peer=peers.get(b))
            rows.append(r)
    print(f"\n  {'variant':8s} {'batch':>5s} {'tokens/s':>9s} {'TTFT ms':>8s} {'HF tok/s':>9s} "
          f"{'HF TTFT':>8s} {'vs HF':>6s} {'roof tok/s':>10s} {'of roof':>7s} {'step MB':>8s} {'GB/s':>5s}")
    for r in rows:
        pr = r["peer"]
        print(f"  {r['variant']:8s} {r['batch']:5d} {r['tokens_per_s']:9.0f} "
              f"{r['ttft_s'] * 1e3:8.1f} "
              + (f"{pr['tokens_per_s']:9.0f} {pr['ttft_s'] * 1e3:8.1f} "
                 f"{r['tokens_per_s'] / pr['tokens_per_s']:5.2f}x " if pr else f"{'-':>9s} "
                 f"{'-':>8s} {'-':>6s} ")
              + f"{r['roof_tokens_per_s']:10.0f} {r['tokens_per_s'] / r['roof_tokens_per_s']:7.1%} "
              f"{r['step_mb']:8.1f} {r['step_bandwidth'] / 1e9:5.1f}")
    if 8 in peers:
        best = max(r["tokens_per_s"] for r in rows if r["batch"] == 8)
        print(f"\n  batch 8: lm {best:.0f} tokens/s vs HF {peers[8]['tokens_per_s']:.0f}: "
              f"{best / peers[8]['tokens_per_s']:.2f}x (target 3x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bw, "shape": shape, "dtype": args.dtype, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
