"""Load test of `python -m lm.serve`: the scheduler before and after batched prefill and
incremental detokenization, in one run on this machine.

1. Throughput: --clients concurrent clients send streamed greedy completions (prompts of 4..40
   tokens, 16..48 new) back to back for --seconds, against the server "before" (`--prefill one
   --detokenize full`: a prefill per request, the whole text decoded again at every token) and
   "after" (the defaults: waiting requests prefilled together, text decoded incrementally).
   Printed: requests/s, generated tokens/s, time to first token and inter-token latency p50 /
   p99 (from the arrival times of the streamed chunks).
2. Long outputs: --clients clients each ask for one completion of L tokens (ignore_eos) for L in
   --lengths; generated tokens/s per L, before and after. With incremental detokenization the
   work per token does not grow with the output, so tokens/s should not fall with L.

    python bench/serve.py [--checkpoint DIR] [--clients 16] [--seconds 20] [--batch-size 16]
        [--lengths 128,512,1024] [--json OUT]

Without --checkpoint a model of the generate benchmark's CPU shape (4 layers, d_model 256),
with a 1,152-token context, trained one step, is written first.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = {"before": ["--prefill", "one", "--detokenize", "full"], "after": []}


def make_checkpoint(directory: str, max_len: int) -> str:
    """A model of the generate benchmark's CPU shape after one training step (lm.train)."""
    workdir = os.path.join(directory, "run")
    cmd = [sys.executable, "-m", "lm.train", "--config", "configs/tiny.py", "--workdir",
           workdir, "--config.train.steps=1", "--config.train.eval_every=1",
           "--config.train.eval_batches=1", "--config.train.sample_tokens=0",
           "--config.train.progress=False",
           "--config.mesh.data=1", "--config.model.num_layers=4",
           "--config.model.d_model=256", "--config.model.num_heads=4",
           "--config.model.num_kv_heads=4", "--config.model.mlp_dim=1024",
           f"--config.model.max_len={max_len}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"could not make a checkpoint: {out.stderr[-2000:]}")
    return workdir


def start(checkpoint: str, batch: int, clients: int, extra: list[str]):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lm.serve", "--checkpoint", checkpoint,
                             "--port", "0", "--max-batch-size", str(batch),
                             "--max-queue-size", str(4 * clients), "--timeout-s", "600",
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"lm.serve did not start: {line}")
    return proc, int(line.rsplit(":", 1)[1].split()[0])


def stream_one(port: int, body: dict) -> tuple[float, float | None, list[float], int]:
    """One streamed completion: (seconds, time to first token, gaps between token chunks,
    tokens)."""
    t = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body | {"stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    arrivals, tokens = [], 0
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
        if ids:
            arrivals.append(time.monotonic())
            tokens += len(ids)
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}")
    first = arrivals[0] - t if arrivals else None
    return time.monotonic() - t, first, list(np.diff(arrivals)), tokens


def client(port: int, seed: int, until: float, results: list):
    rng = np.random.default_rng(seed)
    while time.monotonic() < until:
        prompt = rng.integers(1, 250, int(rng.integers(4, 41))).tolist()
        results.append(stream_one(port, {"prompt": prompt, "temperature": 0,
                                         "max_tokens": int(rng.integers(16, 49))}))


def summary(results: list, wall: float) -> dict:
    ttft = np.array([r[1] for r in results if r[1] is not None])
    gaps = np.array([g for r in results for g in r[2]])
    return {"requests": len(results), "requests_per_s": len(results) / wall,
            "tokens_per_s": sum(r[3] for r in results) / wall,
            "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)),
            "itl_p50_s": float(np.percentile(gaps, 50)) if gaps.size else None,
            "itl_p99_s": float(np.percentile(gaps, 99)) if gaps.size else None}


def load(port: int, clients: int, seconds: float) -> dict:
    results: list = []
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=client, args=(port, i, until, results))
               for i in range(clients)]
    t = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return summary(results, time.monotonic() - t)


def long_outputs(port: int, clients: int, length: int) -> dict:
    """`clients` concurrent completions of exactly `length` tokens each."""
    results: list = [None] * clients

    def one(i):
        results[i] = stream_one(port, {"prompt": [1 + i, 2, 3, 4], "max_tokens": length,
                                       "temperature": 0, "ignore_eos": True})
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return summary(results, time.monotonic() - t) | {"length": length}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lengths", default="128,512,1024")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    out = {"clients": args.clients, "seconds": args.seconds, "batch_size": args.batch_size,
           "throughput": {}, "long": {}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or make_checkpoint(tmp, max(lengths) + 128)
        for mode, extra in MODES.items():
            proc, port = start(checkpoint, args.batch_size, args.clients, extra)
            try:
                load(port, args.clients, min(3.0, args.seconds))  # warm up
                out["throughput"][mode] = load(port, args.clients, args.seconds)
                out["long"][mode] = [long_outputs(port, args.clients, n) for n in lengths]
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    report(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


def report(out: dict) -> None:
    print(f"lm.serve, {out['clients']} clients x {out['seconds']:.0f} s, streamed greedy "
          f"completions, {out['batch_size']} slots")
    print(f"  {'':>7s} {'req/s':>7s} {'tokens/s':>9s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
          f"{'ITL p50':>8s} {'ITL p99':>8s}")
    t = out["throughput"]
    for mode, r in t.items():
        print(f"  {mode:>7s} {r['requests_per_s']:7.2f} {r['tokens_per_s']:9.0f} "
              f"{r['ttft_p50_s']:9.3f} {r['ttft_p99_s']:9.3f} {r['itl_p50_s']:8.4f} "
              f"{r['itl_p99_s']:8.4f}")
    print(f"  after / before: {t['after']['requests_per_s'] / t['before']['requests_per_s']:.2f}x"
          f" the requests/s, TTFT p50 {t['before']['ttft_p50_s'] / t['after']['ttft_p50_s']:.2f}x "
          f"lower")
    print(f"  long outputs ({out['clients']} at once, ignore_eos): generated tokens/s")
    for mode, rows in out["long"].items():
        cells = "  ".join(f"{r['length']:5d}: {r['tokens_per_s']:7.0f}" for r in rows)
        ratio = rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(f"  {mode:>7s} {cells}   (longest / shortest {ratio:.2f}x)")


if __name__ == "__main__":
    main()
