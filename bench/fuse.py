"""Fused q/k/v and gate/up projections (lm.fuse) against the unfused layers, in one run.

Times the prefill (batch 8 x 128 tokens into an empty cache) and the decode step (batch 1 and
8, as lm.serve's slots run it: one jitted step, the cache donated) of a llama-style model with
grouped-query attention, fused and unfused, in alternating rounds (the machine is shared: each
round times both, the ratio is taken per round and its median reported). Also counts the
matmuls (dot / convolution instructions, and oneDNN / Eigen matmul custom calls) in the HLO
before and after XLA's optimizations: if XLA merged the sibling matmuls of the unfused model
itself (its DotMerger pass), the optimized unfused program would have as few as the fused one.

    python bench/fuse.py [--rounds 5] [--out bench/results-fuse-cpu-DATE.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lm.config import ModelConfig  # noqa: E402
from lm.fuse import fuse  # noqa: E402
from lm.generate import Engine  # noqa: E402
from lm.model import Transformer, init_cache  # noqa: E402

MODEL = dict(style="llama", num_layers=4, d_model=512, num_heads=8, num_kv_heads=2,
             mlp_dim=1408, vocab_size=8192, max_len=256)
PREFILL = (8, 128)
DECODE_BATCHES = (1, 8)
DECODE_POSITION = 128  # the cache holds this many tokens when a step is timed


def matmuls(hlo: str) -> dict[str, int]:
    """Instructions that multiply matrices in an HLO module's text (optimized HLO, or the
    StableHLO jax lowers to), by kind."""
    return {"dot": len(re.findall(r"\bdot\(|stablehlo\.dot(?:_general)?\b", hlo)),
            "convolution": len(re.findall(r"\bconvolution\(|stablehlo\.convolution\b", hlo)),
            "matmul_custom_call": len(re.findall(r'custom_call_target="[^"]*(?:matmul|MatMul|'
                                                 r'gemm)[^"]*"', hlo))}


def programs(engine: Engine):
    """name -> (jitted function, its arguments, donated argument index or None)."""
    cfg = engine.cfg
    out = {}
    b, p = PREFILL
    tokens = jax.random.randint(jax.random.key(0), (b, p), 0, cfg.vocab_size)
    lengths = jnp.full((b,), p, jnp.int32)
    out[f"prefill_b{b}_t{p}"] = (jax.jit(engine.prefill_fn), (engine.params, tokens, lengths),
                                 None)
    for batch in DECODE_BATCHES:
        cache = init_cache(cfg, batch, cfg.max_len, "float32")
        tok = jnp.ones((batch,), jnp.int32)
        pos = jnp.full((batch,), DECODE_POSITION, jnp.int32)
        out[f"decode_b{batch}"] = (jax.jit(engine.decode_fn, donate_argnums=(3,)),
                                   (engine.params, tok, pos, cache), 3)
    return out


def time_calls(fn, args, donated, calls: int) -> float:
    """Median seconds of `calls` calls (a donated cache is threaded through)."""
    args = list(args)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        result = fn(*args)
        jax.block_until_ready(result)
        times.append(time.perf_counter() - t)
        if donated is not None:
            args[donated] = result[1]
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefill-calls", type=int, default=3)
    parser.add_argument("--decode-calls", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench",
                                                      "results-fuse-cpu-20261207.json"))
    args = parser.parse_args()

    cfg = ModelConfig(**MODEL)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    engines = {"unfused": Engine(graphdef, params), "fused": Engine(*fuse(graphdef, params))}
    progs = {name: programs(e) for name, e in engines.items()}

    hlo, check = {}, {}
    for name, ps in progs.items():
        hlo[name] = {}
        for prog, (fn, fargs, _) in ps.items():
            lowered = fn.lower(*fargs)
            hlo[name][prog] = {"before_optimization": matmuls(lowered.as_text()),
                               "optimized": matmuls(lowered.compile().as_text())}
        # Compile and check the two agree (prefill logits).
        fn, fargs, _ = ps[f"prefill_b{PREFILL[0]}_t{PREFILL[1]}"]
        check[name] = np.asarray(fn(*fargs)[0])
    max_diff = float(np.abs(check["fused"] - check["unfused"]).max())
    print(f"prefill logits, fused vs unfused: max |diff| {max_diff:.2e}")
    for prog in progs["unfused"]:
        print(f"{prog}: matmuls per program, optimized HLO: unfused "
              f"{hlo['unfused'][prog]['optimized']} fused {hlo['fused'][prog]['optimized']}")

    times: dict[str, dict[str, list[float]]] = {n: {p: [] for p in progs[n]} for n in progs}
    for _ in range(2):  # warm-up: compiled above, first calls allocate
        for name, ps in progs.items():
            for prog, (fn, fargs, donated) in ps.items():
                time_calls(fn, fargs if donated is None else _fresh(fargs, donated), donated, 1)
    for r in range(args.rounds):
        for name in (("unfused", "fused") if r % 2 == 0 else ("fused", "unfused")):
            for prog, (fn, fargs, donated) in progs[name].items():
                calls = args.prefill_calls if donated is None else args.decode_calls
                fresh = fargs if donated is None else _fresh(fargs, donated)
                times[name][prog].append(time_calls(fn, fresh, donated, calls))
    summary = {}
    for prog in progs["unfused"]:
        ratios = [u / f for u, f in zip(times["unfused"][prog], times["fused"][prog])]
        summary[prog] = {"unfused_ms": 1e3 * float(np.median(times["unfused"][prog])),
                         "fused_ms": 1e3 * float(np.median(times["fused"][prog])),
                         "speedup_median": float(np.median(ratios)),
                         "speedup_per_round": ratios}
        s = summary[prog]
        print(f"{prog}: unfused {s['unfused_ms']:.2f} ms, fused {s['fused_ms']:.2f} ms, "
              f"unfused/fused {s['speedup_median']:.3f}x (rounds: "
              f"{', '.join(f'{x:.3f}' for x in ratios)})")

    result = {"bench": "fuse", "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
              "machine": platform.machine(), "jax": jax.__version__,
              "load_avg": os.getloadavg(), "model": MODEL, "prefill": PREFILL,
              "decode_position": DECODE_POSITION, "rounds": args.rounds,
              "prefill_logits_max_abs_diff": max_diff, "hlo_matmuls": hlo,
              "timings": summary}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


def _fresh(fargs, donated):
    """The arguments with a new copy of the donated cache (a donated buffer is gone)."""
    fargs = list(fargs)
    fargs[donated] = jax.tree.map(jnp.copy, fargs[donated])
    return fargs


if __name__ == "__main__":
    main()
