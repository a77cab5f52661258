"""Encoder serving figures of `lm` against PyTorch + Hugging Face transformers, measured in one run
on this machine: batch-1 question-answering latency, `/classify` requests/s with and without the
dynamic batcher, and the fine-tuning step in float16 (loss-scaled) against float32.

1. Latency (default; --no-latency skips it): BERT-base / BERT-large with a span (SQuAD) head at
   batch 1, sequence --seq-len (a [CLS] question [SEP] context [SEP] pair, no padding): lm's
   `lm.finetune.encoder_function` under jax.jit (what lm.serve and lm.predict run) against
   `BertForQuestionAnswering(BertConfig(same sizes)).eval()` under torch.inference_mode (sdpa
   attention), in a child process of this script (torch and XLA do not share the cores well).
   p50 / p99 / mean over --runs calls after --warmup, each call timed to its result on the device
   (block_until_ready / cuda.synchronize), inputs already on the device. --dtype float32 on the
   CPU; on a GPU also bfloat16: lm computes in bfloat16 with the weights stored in bfloat16
   (--param-dtype compute, the default, as the peer's `model.to(dtype)`) or in float32 and cast
   per call (--param-dtype float32: a float32 checkpoint as lm.serve loads it); the peer runs
   float16 and bfloat16 weights (when torch has CUDA; else lm only, and the output says so).
   float32 on a GPU is TF32 on both sides (XLA's default; torch's matmul precision "high").
2. --serve: requests/s through `python -m lm.serve`'s `/classify` under --clients concurrent
   clients (threads, one keep-alive connection each, one row per POST, back to back for
   --seconds after --serve-warmup s), with the dynamic batcher (--serve-batch rows at most,
   --serve-preferred sizes, --serve-delay-ms) against --max-batch-size 1, on a classify
   checkpoint this script trains for one step in a temporary directory (byte tokenizer,
   --serve-model: `small` is configs/finetune.py's 4 x 256 BERT, `tiny` 2 x 32, `base` BERT-base
   shape). Also p50 / p99 request latency and the server's mean forward batch (/metrics).
3. --train-step: `lm.train`'s jitted train_step of configs/finetune.py:classify (AdamW) with a
   BERT-base body (--train-model base; `tiny`: the config's 4 x 256 model, the CPU default) at
   batch --train-batch x --seq-len, precision.compute_dtype per --train-dtypes (default float32
   and float16: float32 parameters, dynamic loss scaling), median step time after a warm-up.
   Only meaningful on a GPU (XLA:CPU has no fast float16); on the CPU it runs and says so.

    python bench/encoder_latency.py                                 # CPU: base + large, fp32
    python bench/encoder_latency.py --models large --dtype bfloat16,float32 --train-step \\
        --json OUT.json                                             # one GPU
    python bench/encoder_latency.py --no-latency --serve --serve-model small --seconds 20

Prints a table per part with the ratios lm / peer (latency: below 1 is lm faster) and writes
the raw figures to --json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"base": dict(layers=12, hidden=768, heads=12, intermediate=3072),
         "large": dict(layers=24, hidden=1024, heads=16, intermediate=4096)}
VOCAB, MAX_POSITION = 30528, 512
CLS, SEP, FIRST_ID = 2, 3, 5  # lm's WordPiece layout
QUESTION = 16  # question tokens of the latency input
# /classify checkpoints (byte tokenizer: vocabulary 258) for --serve
SERVE_MODELS = {"tiny": dict(num_layers=2, d_model=32, num_heads=2, num_kv_heads=2, mlp_dim=64),
                "small": dict(num_layers=4, d_model=256, num_heads=4, num_kv_heads=4,
                              mlp_dim=1024),
                "base": dict(num_layers=12, d_model=768, num_heads=12, num_kv_heads=12,
                             mlp_dim=3072)}
WORDS = ("the film was good bad long short dull bright plot cast score music day night fine "
         "awful loved hated great thin would watch again classic wonderful boring not my cup "
         "of tea").split()


def stats(times: list[float]) -> dict:
    import numpy as np
    t = np.asarray(times) * 1e3
    return {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
            "mean_ms": float(t.mean()), "min_ms": float(t.min()), "times_ms": t.tolist()}


def qa_input(seq: int, seed: int = 0) -> dict:
    """One [CLS] question [SEP] context [SEP] row of `seq` tokens as numpy arrays."""
    import numpy as np
    rng = np.random.default_rng(seed)
    tokens = rng.integers(FIRST_ID, VOCAB, (1, seq)).astype(np.int32)
    q = min(QUESTION, seq - 3)
    tokens[0, 0], tokens[0, q + 1], tokens[0, -1] = CLS, SEP, SEP
    types = (np.arange(seq)[None, :] > q + 1).astype(np.int32)
    return {"tokens": tokens, "token_types": types, "lengths": np.full(1, seq, np.int32)}


# ------------------------------------------------------------------------------ 1. latency

def span_run(size: str, seq: int, dtype: str, param_dtype: str):
    from lm.config import from_config_dict, load_config_file, override
    return from_config_dict(override(load_config_file(
        os.path.join(ROOT, f"configs/bert_{size}.py:phase1")), **{
            "task.name": "span", "model.nsp_head": False, "model.remat": "none",
            "train.seq_len": seq, "train.batch_size": 1, "train.microbatches": 1,
            "precision.compute_dtype": dtype,
            "precision.param_dtype": dtype if param_dtype == "compute" else param_dtype,
            "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.sequence": 1,
            "mesh.pipeline": 1}))


def ours_latency(size: str, seq: int, dtype: str, param_dtype: str, runs: int,
                 warmup: int) -> dict:
    import jax
    from flax import nnx
    from lm.finetune import encoder_function
    from lm.model import Transformer
    run = span_run(size, seq, dtype, param_dtype)
    params = nnx.state(Transformer(run.model, run.precision, run.task, rngs=nnx.Rngs(0)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    fn = jax.jit(encoder_function(run))
    x = {k: jax.device_put(v) for k, v in qa_input(seq).items()}
    t = time.perf_counter()
    compiled = fn.lower(params, x["tokens"], x["token_types"], x["lengths"]).compile()
    compile_s = time.perf_counter() - t
    call = lambda: jax.block_until_ready(compiled(params, x["tokens"], x["token_types"],
                                                  x["lengths"]))
    for _ in range(warmup):
        out = call()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t)
    pd = run.precision.param_dtype
    return {"system": f"lm encoder_function (jit, bert {run.model.num_layers}L, attention "
                      f"{run.model.attention}, {dtype}, params {pd})",
            "model": size, "dtype": dtype, "param_dtype": pd, "params": int(n_params),
            "compile_s": compile_s, "start_argmax": int(out["start"][0].argmax()),
            **stats(times)}


def peer_main(a) -> None:
    """The PyTorch + transformers side (a child process): prints one JSON line."""
    import numpy as np
    import torch
    import transformers
    from transformers import BertConfig, BertForQuestionAnswering
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(json.dumps({"unavailable": f"torch {torch.__version__} has no CUDA"}))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    if cuda:  # float32 as XLA runs it on the GPU by default: TF32 matmuls
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    s = SIZES[a.size]
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                     num_attention_heads=s["heads"], intermediate_size=s["intermediate"],
                     max_position_embeddings=MAX_POSITION, type_vocab_size=2,
                     layer_norm_eps=1e-12, attn_implementation="sdpa")
    model = BertForQuestionAnswering(cfg).eval().to(a.device, getattr(torch, a.dtype))
    host = qa_input(a.seq_len)
    dev = lambda v: torch.as_tensor(v, dtype=torch.long, device=a.device)
    ids, types = dev(host["tokens"]), dev(host["token_types"])
    mask = dev(np.ones_like(host["tokens"]))

    def call():
        out = model(input_ids=ids, token_type_ids=types, attention_mask=mask)
        if cuda:
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        t = time.perf_counter()
        out = call()
        first_s = time.perf_counter() - t
        for _ in range(a.warmup):
            out = call()
        times = []
        for _ in range(a.runs):
            t = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - t)
    print(json.dumps({
        "system": f"torch {torch.__version__} + transformers {transformers.__version__} "
                  f"BertForQuestionAnswering (eval, inference_mode, "
                  f"{model.config._attn_implementation} attention, {a.device}, {a.dtype})",
        "model": a.size, "dtype": a.dtype, "params": sum(p.numel() for p in model.parameters()),
        "first_call_s": first_s, "start_argmax": int(out.start_logits[0].argmax()),
        "torch_threads": torch.get_num_threads(), **stats(times)}))


def peer_latency(a, size: str, device: str, dtype: str) -> dict | None:
    cmd = [a.peer_python, os.path.abspath(__file__), "--as-peer", "--size", size,
           "--seq-len", str(a.seq_len), "--runs", str(a.runs), "--warmup", str(a.warmup),
           "--device", device, "--peer-dtype", dtype]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.peer_timeout)
    except subprocess.TimeoutExpired:
        print(f"  (peer timed out after {a.peer_timeout} s)", file=sys.stderr)
        return None
    if out.returncode:
        print(f"  (peer failed: {(out.stdout + out.stderr)[-800:]})", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def latency(a, gpu: bool) -> dict:
    rows, notes = [], []
    for size in a.models.split(","):
        for dtype in a.dtype.split(","):
            for pd in a.param_dtype.split(","):
                if dtype == "float32" and pd != a.param_dtype.split(",")[0]:
                    continue  # float32 params either way
                r = ours_latency(size, a.seq_len, dtype, pd, a.runs, a.warmup)
                rows.append(r)
                print(f"  lm {size} {dtype} (params {r['param_dtype']}): p50 "
                      f"{r['p50_ms']:.2f} ms, compile {r['compile_s']:.1f} s", flush=True)
            if not a.peer:
                continue
            peer_dtypes = ["float32"] if dtype == "float32" else (
                ["float16", "bfloat16"] if gpu else [])
            if not peer_dtypes:
                notes.append(f"{size} {dtype}: no peer on the CPU (torch runs float32 there)")
            for pdt in peer_dtypes:
                r = peer_latency(a, size, "cuda" if gpu else "cpu", pdt)
                if r and "unavailable" in r:
                    notes.append(f"{size} {pdt}: peer not run: {r['unavailable']} (lm only)")
                    print(f"  (peer {pdt}: {r['unavailable']}: lm only)", flush=True)
                elif r:
                    rows.append({**r, "peer_for": dtype})
                    print(f"  peer {size} {pdt}: p50 {r['p50_ms']:.2f} ms", flush=True)
    ratios = []
    for r in rows:
        if "peer_for" not in r:
            continue
        for o in rows:
            if "peer_for" in o or o["model"] != r["model"] or o["dtype"] != r["peer_for"]:
                continue
            ratios.append({"model": r["model"], "lm": o["system"], "peer": r["system"],
                           "lm_dtype": f"{o['dtype']} (params {o['param_dtype']})",
                           "peer_dtype": r["dtype"],
                           "p50_ratio": o["p50_ms"] / r["p50_ms"],
                           "p99_ratio": o["p99_ms"] / r["p99_ms"],
                           "mean_ratio": o["mean_ms"] / r["mean_ms"]})
    print(f"\n  batch 1, sequence {a.seq_len}, {a.runs} runs after {a.warmup} warm-up")
    print(f"  {'system':124s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s}")
    for r in rows:
        print(f"  {r['system'][:124]:124s} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['mean_ms']:8.2f}")
    for q in ratios:
        print(f"  lm / peer, BERT-{q['model']}, lm {q['lm_dtype']} vs torch {q['peer_dtype']}: "
              f"p50 {q['p50_ratio']:.2f}x, p99 {q['p99_ratio']:.2f}x, mean "
              f"{q['mean_ratio']:.2f}x (below 1: lm faster)")
    for n in notes:
        print(f"  note: {n}")
    return {"seq_len": a.seq_len, "batch": 1, "runs": a.runs, "warmup": a.warmup,
            "results": rows, "ratios": ratios, "notes": notes}


# -------------------------------------------------------------------------------- 2. serve

def make_checkpoint(directory: str, model: str) -> str:
    """A classify checkpoint (labels a / b, byte tokenizer) after one step of lm.train."""
    import random
    rng = random.Random(0)
    data = os.path.join(directory, "train.jsonl")
    with open(data, "w") as f:
        for i in range(64):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(3, 12))),
                                "label": "ab"[i % 2]}) + "\n")
    workdir = os.path.join(directory, "run")
    sizes = [f"--config.model.{k}={v}" for k, v in SERVE_MODELS[model].items()]
    cmd = [sys.executable, "-m", "lm.train", "--config", "configs/finetune.py:classify",
           "--workdir", workdir, f"--config.data.path={data}", "--config.data.eval_path=",
           "--config.data.tokenizer=bytes", "--config.model.vocab_size=258",
           "--config.model.max_len=128", "--config.train.seq_len=128", *sizes,
           "--config.train.steps=1", "--config.train.batch_size=8",
           "--config.train.progress=False", "--config.train.eval_every=1000",
           "--config.optim.warmup_steps=0", "--config.mesh.data=1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"could not make a checkpoint: {out.stderr[-2000:]}")
    return workdir


def start_server(checkpoint: str, args: list[str]):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lm.serve", "--checkpoint", checkpoint,
                             "--port", "0", "--timeout-s", "600", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"lm.serve did not start: {line}")
    return proc, int(line.rsplit(":", 1)[1].split()[0]), time.perf_counter() - t


def post(conn, body: bytes) -> int:
    conn.request("POST", "/classify", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def mean_batch(port: int) -> float | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    got = {m[0]: float(m[1]) for m in re.findall(
        r"^lm_encoder_batch_size_(sum|count) (\S+)$", text, re.M)}
    return got["sum"] / got["count"] if got.get("count") else None


def load(port: int, clients: int, seconds: float, warmup: float) -> dict:
    """`clients` threads POSTing one row each back to back; counted: the requests that finish
    in the `seconds` after `warmup`."""
    import random

    import numpy as np
    t0 = time.perf_counter()
    begin, end = t0 + warmup, t0 + warmup + seconds
    done: list[tuple[float, float]] = []  # (finish, latency)
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int):
        rng = random.Random(i)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            text = " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))
            body = json.dumps({"inputs": [{"text": text}]}).encode()
            t = time.perf_counter()
            if t >= end:
                break
            try:
                status = post(conn, body)
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                continue
            f = time.perf_counter()
            with lock:
                if status != 200:
                    errors.append(f"HTTP {status}")
                elif begin <= t and f <= end:
                    done.append((f, f - t))
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    lat = np.asarray([d[1] for d in done]) * 1e3
    return {"requests": len(done), "requests_per_s": len(done) / seconds,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "errors": len(errors), "first_errors": errors[:5]}


def serve(a) -> dict:
    settings = {"batcher": ["--max-batch-size", str(a.serve_batch), "--max-queue-delay-ms",
                            str(a.serve_delay_ms), "--max-queue-size", str(8 * a.clients)]
                + (["--preferred-batch-sizes", a.serve_preferred] if a.serve_preferred else []),
                "batch1": ["--max-batch-size", "1", "--max-queue-size", str(8 * a.clients)]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ckpt = make_checkpoint(tmp, a.serve_model)
        print(f"  classify checkpoint ({a.serve_model}: {SERVE_MODELS[a.serve_model]}, "
              f"bytes) trained in {time.perf_counter() - t:.1f} s", flush=True)
        for name, args in settings.items():
            proc, port, start_s = start_server(ckpt, args)
            try:
                r = load(port, a.clients, a.seconds, a.serve_warmup)
                r.update(setting=name, server_args=" ".join(args), startup_s=start_s,
                         mean_batch_rows=mean_batch(port))
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            rows.append(r)
            print(f"  {name}: {r['requests_per_s']:.1f} req/s (started in {start_s:.1f} s)",
                  flush=True)
    ratio = rows[0]["requests_per_s"] / rows[1]["requests_per_s"] if rows[1][
        "requests_per_s"] else None
    print(f"\n  /classify, {a.clients} clients x {a.seconds:g} s, one row per request, model "
          f"{a.serve_model}")
    print(f"  {'setting':8s} {'server flags':96s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'batch':>6s} {'errors':>6s}")
    for r in rows:
        mb = f"{r['mean_batch_rows']:6.1f}" if r["mean_batch_rows"] else f"{'-':>6s}"
        print(f"  {r['setting']:8s} {r['server_args']:96s} {r['requests_per_s']:8.1f} "
              f"{r['p50_ms'] or 0:8.1f} {r['p99_ms'] or 0:8.1f} {mb} {r['errors']:6d}")
    if ratio:
        print(f"  batcher / batch 1: {ratio:.2f}x requests/s")
    return {"model": a.serve_model, "model_shape": {**SERVE_MODELS[a.serve_model],
                                                    "vocab_size": 258, "max_len": 128},
            "checkpoint": "configs/finetune.py:classify, byte tokenizer, 1 step of lm.train",
            "clients": a.clients, "seconds": a.seconds, "warmup_s": a.serve_warmup,
            "results": rows, "batcher_vs_batch1": ratio}


# --------------------------------------------------------------------------- 3. train step

def classify_run(model: str, batch: int, seq: int, dtype: str, steps: int):
    from lm.config import from_config_dict, load_config_file, override
    flat = {"task.num_labels": 2, "task.labels": '["a","b"]', "train.batch_size": batch,
            "train.microbatches": 1, "train.seq_len": seq, "train.steps": steps + 10,
            "optim.warmup_steps": 2, "precision.compute_dtype": dtype,
            "precision.param_dtype": "float32", "mesh.data": 1, "mesh.fsdp": 1,
            "mesh.tensor": 1, "mesh.sequence": 1, "mesh.pipeline": 1}
    if model == "base":
        s = SIZES["base"]
        flat.update({"model.num_layers": s["layers"], "model.d_model": s["hidden"],
                     "model.num_heads": s["heads"], "model.num_kv_heads": s["heads"],
                     "model.mlp_dim": s["intermediate"], "model.vocab_size": VOCAB,
                     "model.max_len": MAX_POSITION, "model.type_vocab_size": 2})
    else:
        flat["model.max_len"] = max(seq, 128)
    return from_config_dict(override(load_config_file(
        os.path.join(ROOT, "configs/finetune.py:classify")), **flat))


def train_step_time(model: str, batch: int, seq: int, dtype: str, steps: int,
                    warmup: int) -> dict:
    import jax
    import numpy as np
    from flax import nnx
    from lm import sharding, train
    run = classify_run(model, batch, seq, dtype, steps)
    mesh = sharding.make_mesh(run.mesh, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    host = qa_input(seq)
    host = {"tokens": rng.integers(FIRST_ID, run.model.vocab_size, (batch, seq)).astype(
                np.int32),
            "token_types": np.repeat(host["token_types"], batch, 0),
            "lengths": rng.integers(seq // 2, seq + 1, batch).astype(np.int32),
            "labels": rng.integers(0, 2, batch).astype(np.int32)}
    host["tokens"][:, 0] = CLS
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        data = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
                for k, v in host.items()}
        trainer = train.build(run, mesh)
        state = jax.block_until_ready(trainer.init())
        t = time.perf_counter()
        step = trainer.train_step.lower(state, data).compile()
        compile_s = time.perf_counter() - t
        for _ in range(warmup):
            state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = step(state, data)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    m = jax.device_get(metrics)
    step_s = float(np.median(times))
    p = run.precision
    return {"system": f"lm train_step (classify, {run.model.num_layers}L x {run.model.d_model}, "
                      f"AdamW, compute {p.compute_dtype}, params {p.param_dtype}"
                      f"{', dynamic loss scale' if p.dynamic else ''})",
            "model": model, "compute_dtype": p.compute_dtype, "param_dtype": p.param_dtype,
            "loss_scaled": bool(p.dynamic), "batch": batch, "seq_len": seq, "step_s": step_s,
            "step_times_s": times, "sequences_per_s": batch / step_s, "compile_s": compile_s,
            "loss": float(m["loss"]), "loss_scale": float(m.get("loss_scale", 1.0)),
            "skipped_steps": int(m.get("skipped_steps", 0))}


def train_steps(a, gpu: bool) -> dict:
    model = a.train_model or ("base" if gpu else "tiny")
    batch = a.train_batch or (32 if gpu else 8)
    steps = a.train_steps or (10 if gpu else 3)
    rows = []
    for dtype in a.train_dtypes.split(","):
        r = train_step_time(model, batch, a.seq_len, dtype, steps, 3 if gpu else 1)
        rows.append(r)
        print(f"  train step {dtype}: {r['step_s'] * 1e3:.1f} ms, compile "
              f"{r['compile_s']:.1f} s", flush=True)
    ref = next((r for r in rows if r["compute_dtype"] == "float32"), rows[0])
    for r in rows:
        r["vs_float32"] = ref["step_s"] / r["step_s"]  # speed-up over float32
    note = None if gpu else "cpu: not meaningful (XLA:CPU has no fast float16 or bfloat16)"
    print(f"\n  train step, batch {batch} x {a.seq_len}, {steps} steps (median)"
          + (f"; {note}" if note else ""))
    print(f"  {'system':104s} {'step ms':>8s} {'seq/s':>8s} {'vs fp32':>8s} {'scale':>8s}")
    for r in rows:
        print(f"  {r['system'][:104]:104s} {r['step_s'] * 1e3:8.1f} {r['sequences_per_s']:8.1f}"
              f" {r['vs_float32']:7.2f}x {r['loss_scale']:8g}")
    return {"model": model, "batch": batch, "seq_len": a.seq_len, "steps": steps,
            "results": rows, "note": note}


# -------------------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="base,large", help="comma list of base, large")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=20, help="timed calls per system")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--dtype", default="", help="comma list of float32, bfloat16 (default: "
                   "float32 on the CPU, bfloat16,float32 on a GPU)")
    p.add_argument("--param-dtype", default="compute", help="lm's stored weights at a "
                   "half-precision --dtype, comma list: 'compute' (that dtype, as the peer's) "
                   "and / or 'float32' (cast per call, as a float32 checkpoint is served)")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--peer-python", default=sys.executable,
                   help="interpreter with torch + transformers")
    p.add_argument("--peer-timeout", type=int, default=900)
    p.add_argument("--serve", action="store_true", help="run part 2: /classify requests/s")
    p.add_argument("--serve-model", choices=sorted(SERVE_MODELS), default="small")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0, help="timed load per setting")
    p.add_argument("--serve-warmup", type=float, default=3.0, help="untimed load first (s)")
    p.add_argument("--serve-batch", type=int, default=32, help="the batcher's --max-batch-size")
    p.add_argument("--serve-preferred", default="8,16,32",
                   help="its --preferred-batch-sizes ('' for none)")
    p.add_argument("--serve-delay-ms", type=float, default=5.0,
                   help="its --max-queue-delay-ms")
    p.add_argument("--train-step", action="store_true", help="run part 3: fp16 vs fp32 step")
    p.add_argument("--train-model", choices=["base", "tiny"],
                   help="default: base on a GPU, tiny on the CPU")
    p.add_argument("--train-batch", type=int, default=0, help="default: 32 (GPU), 8 (CPU)")
    p.add_argument("--train-steps", type=int, default=0, help="default: 10 (GPU), 3 (CPU)")
    p.add_argument("--train-dtypes", default="float32,float16")
    p.add_argument("--json", help="also write the results here")
    # the child process's own arguments
    p.add_argument("--as-peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", default="base", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--peer-dtype", default="float32", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.as_peer:
        a.dtype = a.peer_dtype
        return peer_main(a)

    sys.path.insert(0, ROOT)
    import jax
    device = jax.devices()[0]
    gpu = device.platform == "gpu"
    a.dtype = a.dtype or ("bfloat16,float32" if gpu else "float32")
    load0 = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs (load average {load0[0]:.1f}), jax {jax.__version__}"
          f" on {device.device_kind}", flush=True)
    out = {"device_kind": device.device_kind, "platform": device.platform,
           "cpus": os.cpu_count(), "jax": jax.__version__, "load_average_start": load0}
    if a.latency:
        print("== latency")
        out["latency"] = latency(a, gpu)
    if a.serve:
        print("== serve")
        out["serve"] = serve(a)
    if a.train_step:
        print("== train step")
        out["train_step"] = train_steps(a, gpu)
    out["load_average_end"] = os.getloadavg()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
