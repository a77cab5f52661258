"""2:4 structured sparsity on the CPU: what it costs in accuracy after NVIDIA's ASP recipe
(prune a trained dense model, retrain with the masks fixed), and whether XLA turns it into
speed.

    python bench/sparsity.py [--dense-steps 200] [--retrain-steps 100]
        [--json bench/results-sparsity-cpu-DATE.json]

Accuracy: configs/tiny.py (4 x 256, byte-level, the embedded corpus) trained dense for
--dense-steps; from that checkpoint (train.init_from, the same fresh optimizer settings and the
same data for both) either --retrain-steps more dense steps or prune to 2:4 and as many masked
steps (train.sparsity=2:4). Held-out perplexity (exp of the mean next-byte loss over
--eval-batches validation batches) of the dense model, right after pruning, and of both
continuations. The issue's target: 2:4 within 1% of dense after retraining.

Speed: a layer-sized matmul x [rows, K] @ w [K, N] with w dense, with the same w 2:4-pruned
(XLA runs the same dense kernel: no sparse kernels on CPU), and from lm.sparsity's compressed
form decompressed inside the jit before the matmul (what a weight-streaming inference path
would do). Interleaved repeats, medians.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lm import sharding, sparsity, train  # noqa: E402
from lm.checkpoint import load_params  # noqa: E402
from lm.config import from_config_dict, load_config_file, override  # noqa: E402
from lm.data.loader import LoaderState  # noqa: E402
from lm.model import Transformer  # noqa: E402

TARGET = 0.01  # 2:4 perplexity within 1% of dense after retraining


def tiny(**flat):
    return from_config_dict(override(load_config_file(os.path.join(ROOT, "configs/tiny.py")),
                                     **{"mesh.data": 1, "train.sample_tokens": 0,
                                        "train.progress": False} | flat))


def perplexity(run, workdir: str, prune: bool, batches: int) -> float:
    """exp(mean held-out loss) of the newest checkpoint in `workdir` (2:4-pruned first if
    `prune`), over the first `batches` validation batches, as lm.train evaluates."""
    mesh = sharding.make_mesh(run.mesh, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        trainer = train.build(run, mesh)
        abstract = trainer.abstract_state().params
        _, _, _, params = load_params(workdir, lambda _: abstract, lambda _: None)
        if prune:
            params = jax.jit(sparsity.prune)(params)
            assert sparsity.is_2_4(params)
        _, eval_data = train._loaders(run, train.open_dataset(run, workdir), mesh)
        t = run.train
        sums = [trainer.eval_step(params, eval_data.batch_at(LoaderState(0, i * t.batch_size)),
                                  i) for i in range(batches)]
    record = train.eval_record(jax.tree.map(lambda *x: float(np.sum(x)), *jax.device_get(sums)))
    return math.exp(record["eval_loss"])


def accuracy(args, tmp: str) -> dict:
    dense_dir = os.path.join(tmp, "dense")
    common = {"train.eval_batches": args.eval_batches, "train.log_every": 20}
    t0 = time.perf_counter()
    train.train(tiny(**common, **{"train.steps": args.dense_steps,
                                  "train.eval_every": args.dense_steps}), dense_dir)
    dense_s = time.perf_counter() - t0
    data = os.path.join(dense_dir, "data", "stdlib")  # prepared once, shared by every run
    # Both continuations: the dense checkpoint's parameters, a fresh optimizer, the same data.
    cont = common | {"data.path": data, "train.init_from": dense_dir,
                     "train.steps": args.retrain_steps, "train.eval_every": args.retrain_steps,
                     "optim.lr": args.retrain_lr, "optim.warmup_steps": 10}
    out = {"dense_steps": args.dense_steps, "retrain_steps": args.retrain_steps,
           "retrain_lr": args.retrain_lr, "eval_batches": args.eval_batches,
           "eval_tokens": args.eval_batches * 16 * 128, "dense_train_s": dense_s}
    probe = tiny(**{"data.path": data})
    out["ppl_dense"] = perplexity(probe, dense_dir, False, args.eval_batches)
    out["ppl_pruned_before_retraining"] = perplexity(probe, dense_dir, True, args.eval_batches)
    for name, extra in (("dense_continued", {}), ("sparse_2_4_retrained",
                                                  {"train.sparsity": "2:4"})):
        workdir = os.path.join(tmp, name)
        t0 = time.perf_counter()
        state = train.train(tiny(**cont, **extra), workdir)
        out[f"{name}_train_s"] = time.perf_counter() - t0
        if extra:
            assert sparsity.is_2_4(jax.device_get(state.params))
        out[f"ppl_{name}"] = perplexity(probe, workdir, False, args.eval_batches)
    gap = out["ppl_sparse_2_4_retrained"] / out["ppl_dense_continued"] - 1
    out |= {"retrained_vs_dense": gap, "target": TARGET, "target_met": bool(gap <= TARGET),
            "pruned_vs_dense": out["ppl_pruned_before_retraining"] / out["ppl_dense"] - 1}
    return out


def timed(f, *args, repeats: int) -> list[float]:
    jax.block_until_ready(f(*args))  # compile
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        out.append(time.perf_counter() - t0)
    return out


def speed(rows: int, k: int, n: int, rounds: int) -> dict:
    x = jax.random.normal(jax.random.key(0), (rows, k), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (1, k, n), jnp.float32) * 0.02
    pruned = sparsity.prune_weight(w, 1)
    small = sparsity.compress_weight(pruned, 1)
    matmul = jax.jit(lambda x, w: x @ w[0])
    via_decompress = jax.jit(lambda x, s: x @ sparsity.decompress_weight(s)[0])
    decompress_only = jax.jit(lambda s: sparsity.decompress_weight(s))
    assert np.array_equal(matmul(x, pruned), via_decompress(x, small))
    times = {"dense": [], "pruned_dense_kernel": [], "decompress_then_matmul": [],
             "decompress_only": []}
    for _ in range(rounds):  # interleaved: a busy machine slows all of them alike
        times["dense"] += timed(matmul, x, w, repeats=5)
        times["pruned_dense_kernel"] += timed(matmul, x, pruned, repeats=5)
        times["decompress_then_matmul"] += timed(via_decompress, x, small, repeats=5)
        times["decompress_only"] += timed(decompress_only, small, repeats=5)
    med = {name: float(np.median(t)) for name, t in times.items()}
    return {"shape": f"[{rows}, {k}] @ [{k}, {n}] float32",
            "median_s": med, "gflops_dense": 2 * rows * k * n / med["dense"] / 1e9,
            "pruned_over_dense": med["pruned_dense_kernel"] / med["dense"],
            "decompress_then_matmul_over_dense": med["decompress_then_matmul"] / med["dense"],
            "weight_bytes_dense": int(w.nbytes), "weight_bytes_compressed": small.nbytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dense-steps", type=int, default=200)
    p.add_argument("--retrain-steps", type=int, default=100)
    p.add_argument("--retrain-lr", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    result = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count()}
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="lm-bench-sparsity-")
    if not args.skip_accuracy:
        result["accuracy"] = acc = accuracy(args, tmp)
        print(f"perplexity: dense {acc['ppl_dense']:.4f} after {acc['dense_steps']} steps, "
              f"2:4-pruned {acc['ppl_pruned_before_retraining']:.4f} "
              f"({acc['pruned_vs_dense']:+.2%}); after {acc['retrain_steps']} more steps: dense "
              f"{acc['ppl_dense_continued']:.4f}, 2:4 {acc['ppl_sparse_2_4_retrained']:.4f} "
              f"({acc['retrained_vs_dense']:+.2%}; target <= +{TARGET:.0%}: "
              f"{'met' if acc['target_met'] else 'NOT met'})", flush=True)
    # The tiny config's MLP input projection over one batch (16 x 128 tokens), and GPT-2
    # small's (768 -> 3072).
    result["speed"] = [speed(2048, 256, 1024, args.rounds), speed(2048, 768, 3072, args.rounds)]
    for s in result["speed"]:
        print(f"matmul {s['shape']}: dense {s['median_s']['dense'] * 1e3:.2f} ms "
              f"({s['gflops_dense']:.1f} GFLOP/s); 2:4-pruned weight, same kernel "
              f"{s['pruned_over_dense']:.2f}x the time; decompress + matmul "
              f"{s['decompress_then_matmul_over_dense']:.2f}x; weight bytes "
              f"{s['weight_bytes_dense']:,} -> {s['weight_bytes_compressed']:,}", flush=True)
    run = tiny()
    params = jax.eval_shape(lambda: nnx.state(Transformer(run.model, run.precision, run.task,
                                                          rngs=nnx.Rngs(params=0))))
    dense_bytes = sparsity.weight_bytes(params)
    compressed = jax.eval_shape(sparsity.compress, params)
    result["tiny_model_bytes"] = {"dense": dense_bytes,
                                  "compressed": sparsity.weight_bytes(compressed)}
    result["wall_s"] = time.perf_counter() - start
    print(f"configs/tiny.py parameters: {dense_bytes:,} bytes dense, "
          f"{result['tiny_model_bytes']['compressed']:,} with the layer matmuls compressed; "
          f"{result['wall_s']:.0f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
