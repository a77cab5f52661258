"""Memory of one train step of `configs/gpt2_small.py` per remat policy and microbatch count,
from XLA's compiled memory analysis (nothing is run or allocated; any machine can print it).

    python bench/memory.py [--batch 8] [--seq 1024] [--json out.json]

One device holding `--batch` sequences (a per-device share of the global batch), fp32, AdamW,
layers scanned. Columns, from `compiled.memory_analysis()`:
    arguments   parameters + optimizer state + batch (donated: the outputs reuse them)
    temp        everything else live at the peak: activations kept for the backward, their
                recomputation, gradients, optimizer temporaries
    activations temp - the gradient buffers (float32, one per parameter): what remat trades
    peak        arguments + outputs - aliased + temp
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lm import sharding, train  # noqa: E402
from lm.config import MeshConfig, from_config_dict, load_config_file, override  # noqa: E402

GB = 1e9


def measure(policy: str, microbatches: int, batch: int, seq: int) -> dict:
    run = from_config_dict(override(load_config_file(os.path.join(ROOT, "configs",
                                                                  "gpt2_small.py")),
                                    **{"model.remat": policy, "model.scan_layers": True,
                                       "train.microbatches": microbatches,
                                       "train.batch_size": batch, "train.seq_len": seq}))
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        trainer = train.build(run, mesh)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                jax.eval_shape(trainer.init), trainer.state_sharding)
        tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32,
                                      sharding=sharding.batch_sharding(mesh))
        m = trainer.train_step.lower(abstract, tokens).compile().memory_analysis()
    grads = sum(x.size * 4 for x in jax.tree.leaves(abstract["params"]))
    return {"remat": policy, "microbatches": microbatches,
            "arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
            "activations": m.temp_size_in_bytes - grads,
            "peak": m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = [measure(p, 1, args.batch, args.seq) for p in ("none", "full", "dots", "minimal")]
    rows += [measure(p, 4, args.batch, args.seq) for p in ("none", "full")]
    print(f"gpt2_small (124M), {args.batch} x {args.seq} tokens per device, fp32 AdamW, "
          f"{jax.devices()[0].platform}")
    print("| remat | microbatches | arguments GB | temp GB | activations GB | peak GB | "
          "activations vs none |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = rows[0]["activations"]
    for r in rows:
        print(f"| {r['remat']} | {r['microbatches']} | {r['arguments'] / GB:.2f} | "
              f"{r['temp'] / GB:.2f} | {r['activations'] / GB:.2f} | {r['peak'] / GB:.2f} | "
              f"{base / r['activations']:.1f}x smaller |")
    full = next(r for r in rows if r["remat"] == "full" and r["microbatches"] == 1)
    print(f"full remat cuts activation memory {base / full['activations']:.1f}x "
          "(target >= 3x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "seq": args.seq, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
