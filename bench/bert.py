"""BERT pretraining throughput of `lm` (masked-LM + next-sentence, NVLAMB) against PyTorch +
Hugging Face transformers' `BertForPreTraining`, measured in one run on this machine.

lm trains configs/bert_{base,large}.py:phase1 with the given batch in one microbatch (no gradient
accumulation), bfloat16 compute on a GPU and float32 on the CPU; the train step masks the
synthetic sentence-pair batch itself (task.max_predictions: 20 at sequence 128). The peer runs the
same shapes (layers, hidden, heads, intermediate, vocabulary 30,528, 512 positions) in a child
process of this script (torch and XLA do not share the cores well): dropout 0.0 like lm (which has
none), torch.optim.AdamW (torch core has no LAMB; NVLAMB's extra per-tensor norms are a small
share of a step), sdpa attention, MLM labels on max_predictions positions per row (-100
elsewhere) and NSP labels, float32 on the CPU and bfloat16 autocast on a GPU. Stock
`BertForPreTraining` computes the MLM logits on every position (the labels only select the loss),
lm's head on the P predicted ones; `--peer-head masked` runs the peer's head on those P positions
too (NVIDIA's implementation does). Both are credited with the same model FLOPs (lm.plan's count:
the head on P positions), so a peer's "MFU" is the useful-work rate.

    python bench/bert.py                                   # CPU: BERT-base, seq 128, batch 8
    python bench/bert.py --size large --batch 64 --steps 10 --json OUT.json      # one GPU
    python bench/bert.py --no-peer                         # lm only

Prints sequences/s, step time, compile time, model TFLOP/s, MFU where lm.hardware knows the
device's peak, the ratios lm / peer, NVIDIA's published BERT-large phase-1 figure (580 sequences/s
on one A100, mixed precision: /work/shared/REFERENCE.md, "Performance anchors") with the MFU it
implies, and lm.plan's per-device memory for BERT-large phase 1 on 8 GPUs (mesh data=8, the
config's 128 microbatches).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"base": dict(layers=12, hidden=768, heads=12, intermediate=3072),
         "large": dict(layers=24, hidden=1024, heads=16, intermediate=4096)}
VOCAB, MAX_POSITION = 30528, 512
# NVIDIA DeepLearningExamples, BERT-large phase 1 (seq 128), mixed precision, per GPU.
NVIDIA_A100 = {"sequences_per_s": 580, "device": "A100", "source": "/work/shared/REFERENCE.md: "
               "NVIDIA BERT-large pretraining, mixed precision: 580 seq/s (seq 128) on 1 A100; "
               "4,591 on 8 A100"}
CLS, SEP, FIRST_ID = 2, 3, 5  # lm's WordPiece layout (lm.tasks.Masking's defaults)


def synthetic(batch: int, seq: int, seed: int = 0) -> dict:
    """A sentence-pair batch as numpy arrays: [CLS] A [SEP] B [SEP], no padding."""
    import numpy as np
    rng = np.random.default_rng(seed)
    tokens = rng.integers(FIRST_ID, VOCAB, (batch, seq)).astype(np.int32)
    split = rng.integers(seq // 4, 3 * seq // 4, batch)  # the first [SEP]
    rows = np.arange(batch)
    tokens[:, 0], tokens[rows, split], tokens[:, -1] = CLS, SEP, SEP
    token_types = (np.arange(seq)[None, :] > split[:, None]).astype(np.int32)
    return {"tokens": tokens, "token_types": token_types,
            "lengths": np.full(batch, seq, np.int32),
            "nsp_labels": rng.integers(0, 2, batch).astype(np.int32)}


# ---------------------------------------------------------------------------------------- lm

def bench_run(size: str, seq: int, batch: int, steps: int, dtype: str, remat: str | None,
              devices: int):
    from lm.config import from_config_dict, load_config_file, override
    flat = {"train.batch_size": batch, "train.microbatches": 1, "train.seq_len": seq,
            "train.steps": steps + 10, "optim.warmup_steps": 2,
            "precision.compute_dtype": dtype, "mesh.data": devices, "mesh.fsdp": 1,
            "mesh.tensor": 1, "mesh.sequence": 1, "mesh.pipeline": 1}
    if seq != 128:  # NVIDIA's predictions per sequence: 20 at 128, 80 at 512
        flat["task.max_predictions"] = max(1, seq * 20 // 128)
    if remat:
        flat["model.remat"] = remat
    return from_config_dict(override(load_config_file(
        os.path.join(ROOT, f"configs/bert_{size}.py:phase1")), **flat))


def large_phase1_plan() -> dict:
    """lm.plan for configs/bert_large.py:phase1 as configured (8 x 64 sequences x 128
    microbatches), on 8 GPUs, mesh data=8: per-device bytes and FLOPs."""
    from lm import plan
    from lm.config import from_config_dict, load_config_file, override
    run = from_config_dict(override(load_config_file(
        os.path.join(ROOT, "configs/bert_large.py:phase1")), **{"mesh.data": 8}))
    p = plan.plan(run, 8)
    keep = ("params", "params_bytes", "grads_bytes", "optimizer_bytes", "state_bytes",
            "activations_bytes", "workspace_bytes", "total_bytes", "flops_per_step",
            "flops_per_device", "flops_with_recompute")
    return {"config": "configs/bert_large.py:phase1", "devices": 8, "mesh": p["mesh"],
            "rules": p["rules"], "batch_size": run.train.batch_size,
            "microbatches": run.train.microbatches, "remat": run.model.remat,
            "compute_dtype": run.precision.compute_dtype,
            **{k: p[k] for k in keep}, "comm_bytes": p["comm_bytes"]}


def ours(run, steps: int, devices: int) -> dict:
    import jax
    import numpy as np
    from flax import nnx
    from lm import plan, sharding, train
    mesh = sharding.make_mesh(run.mesh, devices=jax.devices()[:devices])
    host = synthetic(run.train.batch_size, run.train.seq_len)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
                 for k, v in host.items()}
        trainer = train.build(run, mesh)
        t = time.perf_counter()
        state = jax.block_until_ready(trainer.init())
        init_s = time.perf_counter() - t
        t = time.perf_counter()
        lowered = trainer.train_step.lower(state, batch)
        step = lowered.compile()
        compile_s = time.perf_counter() - t
        # warm-up: the first runs allocate (and on a GPU autotune); on 2 CPU cores one will do
        for _ in range(2 if jax.devices()[0].platform == "gpu" else 1):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    loss = float(metrics["loss"]) + float(metrics.get("nsp_loss", 0.0))
    device = jax.devices()[0]
    peak_mem = (device.memory_stats() or {}).get("peak_bytes_in_use")
    m = run.model
    return {"system": f"lm (bert {run.model.num_layers}L, NVLAMB, "
                      f"{'scan' if m.scan_layers else 'unrolled'}, remat {m.remat}, "
                      f"attention {m.attention}, {run.precision.compute_dtype}, "
                      f"{devices} device{'s' if devices > 1 else ''})",
            "batch": run.train.batch_size, "step_s": step_s, "step_times_s": times,
            "sequences_per_s": run.train.batch_size / step_s, "compile_s": compile_s,
            "init_s": init_s, "loss": loss, "peak_bytes_in_use": peak_mem,
            "plan_total_bytes_per_device": plan.plan(run, devices)["total_bytes"],
            "max_predictions": run.task.max_predictions}


# -------------------------------------------------------------------------------------- peer

def peer_main(a) -> None:
    """The PyTorch + transformers side (a child process): prints one JSON line."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertForPreTraining
    cuda = a.device.startswith("cuda")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    s = SIZES[a.size]
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                     num_attention_heads=s["heads"], intermediate_size=s["intermediate"],
                     max_position_embeddings=MAX_POSITION, type_vocab_size=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     layer_norm_eps=1e-12, attn_implementation="sdpa")
    model = BertForPreTraining(cfg).to(a.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-6,
                            weight_decay=0.01, fused=cuda)
    host = synthetic(a.batch, a.seq)
    rng = np.random.default_rng(1)
    p = a.predictions
    # P predicted positions per row among the non-special tokens, their ids as labels
    special = (host["tokens"] == CLS) | (host["tokens"] == SEP)
    positions = np.stack([np.sort(rng.choice(np.flatnonzero(~row), p, replace=False))
                          for row in special])
    rows = np.arange(a.batch)[:, None]
    labels = np.full_like(host["tokens"], -100)
    labels[rows, positions] = host["tokens"][rows, positions]
    tokens = host["tokens"].copy()
    tokens[rows, positions] = 4  # [MASK]
    dev = lambda x: torch.as_tensor(x, dtype=torch.long, device=a.device)
    ids, types, mask = dev(tokens), dev(host["token_types"]), dev(np.ones_like(tokens))
    mlm_labels, nsp_labels = dev(labels), dev(host["nsp_labels"])
    pos_t = dev(positions)
    autocast = a.dtype != "float32"

    def loss_fn():
        if a.peer_head == "all":  # stock: logits on every position, -100 drops them
            return model(input_ids=ids, token_type_ids=types, attention_mask=mask,
                         labels=mlm_labels, next_sentence_label=nsp_labels).loss
        seq_out, pooled = model.bert(input_ids=ids, token_type_ids=types,
                                     attention_mask=mask)[:2]
        picked = seq_out[torch.arange(a.batch, device=a.device)[:, None], pos_t]  # [B, P, h]
        scores = model.cls.predictions(picked)
        nsp = model.cls.seq_relationship(pooled)
        ce = torch.nn.functional.cross_entropy
        return (ce(scores.float().reshape(-1, VOCAB), mlm_labels[
            torch.arange(a.batch, device=a.device)[:, None], pos_t].reshape(-1)) +
            ce(nsp.float(), nsp_labels))

    def step():
        with torch.autocast(a.device.split(":")[0], dtype=getattr(torch, a.dtype),
                            enabled=autocast):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return loss

    t = time.perf_counter()
    step()
    first_s = time.perf_counter() - t
    for _ in range(3 if cuda else 0):  # warm-up (on the CPU the first step is enough)
        step()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    dt = float(np.median(times))
    import transformers
    print(json.dumps({
        "system": f"torch {torch.__version__} + transformers {transformers.__version__} "
                  f"BertForPreTraining ({model.config._attn_implementation} attention, AdamW, "
                  f"dropout 0, MLM head on {'all T' if a.peer_head == 'all' else 'the P'} "
                  f"positions, {a.device}, {a.dtype}{' autocast' if autocast else ''})",
        "batch": a.batch, "step_s": dt, "step_times_s": times,
        "sequences_per_s": a.batch / dt, "first_step_s": first_s, "loss": float(loss.detach()),
        "params": sum(p.numel() for p in model.parameters()),
        "attention": model.config._attn_implementation, "head": a.peer_head,
        "torch_threads": torch.get_num_threads()}))


def peer(a, device: str, dtype: str, predictions: int, head: str) -> dict | None:
    cmd = [a.peer_python, os.path.abspath(__file__), "--as-peer", "--size", a.size,
           "--seq", str(a.seq), "--batch", str(a.batch), "--steps", str(a.steps),
           "--device", device, "--dtype", dtype, "--predictions", str(predictions),
           "--peer-head", head]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.peer_timeout)
    except subprocess.TimeoutExpired:
        print(f"  (peer timed out after {a.peer_timeout} s)", file=sys.stderr)
        return None
    if out.returncode:
        print(f"  (peer failed: {(out.stdout + out.stderr)[-800:]})", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="base")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=0, help="sequences per step (default: 8 on the "
                   "CPU, 64 per device on a GPU)")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default: 3 on the CPU, 10 "
                   "on a GPU)")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--peer-head", default="all", help="comma list: 'all' (stock "
                   "BertForPreTraining: MLM logits on every position), 'masked' (on the P "
                   "predicted positions, as lm and NVIDIA)")
    p.add_argument("--peer-python", default=sys.executable,
                   help="interpreter with torch + transformers")
    p.add_argument("--peer-timeout", type=int, default=900)
    p.add_argument("--devices", default="1", help="'1' or 'all': lm's mesh (data-parallel)")
    p.add_argument("--remat", help="model.remat (default: the config's, 'dots')")
    p.add_argument("--json", help="also write the results here")
    # the child process's own arguments
    p.add_argument("--as-peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--predictions", type=int, default=20, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.as_peer:
        return peer_main(a)

    sys.path.insert(0, ROOT)
    import jax
    from lm import hardware, plan
    device = jax.devices()[0]
    gpu = device.platform == "gpu"
    n_dev = jax.device_count() if a.devices == "all" else int(a.devices)
    a.batch = a.batch or (64 * n_dev if gpu else 8)
    a.steps = a.steps or (10 if gpu else 3)
    dtype = "bfloat16" if gpu else "float32"
    run = bench_run(a.size, a.seq, a.batch, a.steps, dtype, a.remat, n_dev)
    pl = plan.plan(run, n_dev)
    flops = pl["flops_per_step"]
    peak = hardware.peak_flops(device.device_kind, dtype)
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__} on {n_dev} x "
          f"{device.device_kind}; BERT-{a.size} seq {a.seq} batch {a.batch}, "
          f"{run.task.max_predictions} predictions/row, {dtype}; {pl['params']:,} parameters, "
          f"{flops / a.batch / 1e9:.1f} GFLOP/sequence (lm.plan); datasheet peak "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}", flush=True)

    rows = [ours(run, a.steps, n_dev)]
    print(f"  lm done: {rows[0]['sequences_per_s']:.2f} seq/s, compile "
          f"{rows[0]['compile_s']:.1f} s", flush=True)
    if a.peer:
        for head in a.peer_head.split(","):
            r = peer(a, "cuda" if gpu else "cpu", dtype, run.task.max_predictions, head)
            if r:
                rows.append(r)
                print(f"  peer ({head}) done: {r['sequences_per_s']:.2f} seq/s", flush=True)
    lm_sps = rows[0]["sequences_per_s"]
    for r in rows:
        tflops = r["sequences_per_s"] * flops / a.batch / 1e12
        r.update(model_tflops=tflops, mfu=tflops * 1e12 / (peak * (n_dev if r is rows[0] else 1))
                 if peak else None, lm_ratio=lm_sps / r["sequences_per_s"])
    print(f"\n  {'system':118s} {'seq/s':>8s} {'step ms':>8s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'lm/this':>8s}")
    for r in rows:
        mfu = f"{r['mfu']:6.1%}" if r["mfu"] is not None else f"{'-':>6s}"
        print(f"  {r['system']:118s} {r['sequences_per_s']:8.2f} {r['step_s'] * 1e3:8.1f} "
              f"{r['model_tflops']:8.3f} {mfu} {r['lm_ratio']:7.2f}x")
    print(f"  lm compile {rows[0]['compile_s']:.1f} s (lower + XLA compile), init "
          f"{rows[0]['init_s']:.1f} s")

    # NVIDIA's figure is BERT-large seq 128 on one A100: its MFU on A100's bf16 peak.
    large = bench_run("large", 128, 64, 1, "bfloat16", None, 1)
    per_seq = plan.plan(large, 1)["flops_per_step"] / 64
    a100 = hardware.peak_flops("A100", "bfloat16")
    nvidia = dict(NVIDIA_A100, flops_per_sequence=per_seq,
                  mfu=NVIDIA_A100["sequences_per_s"] * per_seq / a100, a100_peak_flops=a100)
    line = (f"NVIDIA BERT-large phase 1 (seq 128), mixed precision: "
            f"{nvidia['sequences_per_s']} seq/s per A100 = {nvidia['mfu']:.1%} MFU of "
            f"{a100 / 1e12:.0f} TFLOP/s")
    if a.size == "large" and a.seq == 128 and peak:
        per_dev = lm_sps / n_dev
        nvidia["lm_sequences_per_s_per_device"] = per_dev
        nvidia["lm_vs_nvidia_per_device"] = per_dev / nvidia["sequences_per_s"]
        nvidia["lm_mfu_vs_nvidia_mfu"] = rows[0]["mfu"] / nvidia["mfu"]
        line += (f"; lm here {per_dev:.0f} seq/s per device = "
                 f"{nvidia['lm_vs_nvidia_per_device']:.2f}x theirs "
                 f"({nvidia['lm_mfu_vs_nvidia_mfu']:.2f}x their MFU)")
    print(line)
    big = large_phase1_plan()
    print(f"lm.plan, BERT-large phase 1 on 8 GPUs (data=8, batch {big['batch_size']} in "
          f"{big['microbatches']} microbatches, remat {big['remat']}, {big['compute_dtype']}): "
          + ", ".join(f"{k.removesuffix('_bytes')} {big[k] / 1e9:.2f} GB" for k in (
              "params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
              "workspace_bytes", "total_bytes")) + " per device")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device_kind": device.device_kind, "devices": n_dev,
                       "cpus": os.cpu_count(), "jax": jax.__version__, "size": a.size,
                       "seq": a.seq, "batch": a.batch, "steps": a.steps, "dtype": dtype,
                       "max_predictions": run.task.max_predictions, "params": pl["params"],
                       "flops_per_step": flops, "peak_flops": peak, "results": rows,
                       "nvidia_reference": nvidia, "plan_bert_large_phase1_8gpu": big},
                      f, indent=2)


if __name__ == "__main__":
    main()
