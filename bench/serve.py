"""Load test of `python -m lm.serve`: N concurrent clients for a fixed time, with and without
batching, on this machine.

Each client sends greedy completions (prompts of 4..40 tokens, 16..48 new tokens) back to back
for --seconds; printed: requests/s, generated tokens/s, p50 / p99 latency and time to first
token (streamed), for --max-batch-size 1 (no batching: one request decodes at a time) and the
batched server.

    python bench/serve.py [--checkpoint DIR] [--clients 16] [--seconds 20] [--batch-size 16]

Without --checkpoint a model of the generate benchmark's CPU shape, trained one step, is
written as a checkpoint first.
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


def make_checkpoint(directory: str) -> str:
    """A model of the generate benchmark's CPU shape after one training step (lm.train)."""
    workdir = os.path.join(directory, "run")
    cmd = [sys.executable, "-m", "lm.train", "--config", "configs/tiny.py", "--workdir",
           workdir, "--config.train.steps=1", "--config.train.eval_every=1",
           "--config.train.eval_batches=1", "--config.train.sample_tokens=0",
           "--config.train.progress=False",
           "--config.mesh.data=1", "--config.model.num_layers=4",
           "--config.model.d_model=256", "--config.model.num_heads=4",
           "--config.model.num_kv_heads=4", "--config.model.mlp_dim=1024",
           "--config.model.max_len=128"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"could not make a checkpoint: {out.stderr[-2000:]}")
    return workdir


def start(checkpoint: str, batch: int, clients: int):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lm.serve", "--checkpoint", checkpoint,
                             "--port", "0", "--max-batch-size", str(batch),
                             "--max-queue-size", str(4 * clients), "--timeout-s", "600"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"lm.serve did not start: {line}")
    return proc, int(line.rsplit(":", 1)[1].split()[0])


def client(port: int, seed: int, until: float, results: list):
    rng = np.random.default_rng(seed)
    while time.monotonic() < until:
        prompt = rng.integers(1, 250, int(rng.integers(4, 41))).tolist()
        body = json.dumps({"prompt": prompt, "max_tokens": int(rng.integers(16, 49)),
                           "temperature": 0, "stream": True})
        t = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        first, tokens = None, 0
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            ids = chunk["choices"][0].get("token_ids") or []
            if ids and first is None:
                first = time.monotonic() - t
            tokens += len(ids)
        conn.close()
        if resp.status == 200:
            results.append((time.monotonic() - t, first, tokens))


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
    wall = time.monotonic() - t
    lat = np.array([r[0] for r in results])
    ttft = np.array([r[1] for r in results if r[1] is not None])
    return {"requests": len(results), "requests_per_s": len(results) / wall,
            "tokens_per_s": sum(r[2] for r in results) / wall,
            "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
            "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or make_checkpoint(tmp)
        rows = []
        for batch in (1, args.batch_size):
            proc, port = start(checkpoint, batch, args.clients)
            try:
                load(port, args.clients, min(3.0, args.seconds))  # warm up
                r = load(port, args.clients, args.seconds) | {"max_batch_size": batch}
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            rows.append(r)
    print(f"lm.serve, {args.clients} clients x {args.seconds:.0f} s, streamed greedy completions")
    print(f"  {'max batch':>9s} {'req/s':>7s} {'tokens/s':>9s} {'p50 s':>7s} {'p99 s':>7s} "
          f"{'TTFT p50':>9s} {'TTFT p99':>9s}")
    for r in rows:
        print(f"  {r['max_batch_size']:9d} {r['requests_per_s']:7.2f} {r['tokens_per_s']:9.0f} "
              f"{r['p50_s']:7.2f} {r['p99_s']:7.2f} {r['ttft_p50_s']:9.3f} {r['ttft_p99_s']:9.3f}")
    print(f"  batching: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x the tokens/s, "
          f"p50 latency {rows[0]['p50_s'] / rows[1]['p50_s']:.2f}x lower")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
