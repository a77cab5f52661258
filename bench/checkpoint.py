"""How long a checkpoint save blocks the train loop, asynchronous vs synchronous, for
`configs/gpt2_small.py` (124M parameters + AdamW state, filled with noise: ~1.5 GB), measured in one run.

    python bench/checkpoint.py [--saves 3] [--json bench/results-checkpoint-cpu.json]

Blocking time = from `Checkpointer.save` to the moment the loop could dispatch the next step
(async: the device-to-host copy; sync: the whole write). Total = until the step is on disk.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lm import sharding, train  # noqa: E402
from lm.checkpoint import Checkpointer  # noqa: E402
from lm.config import from_config_dict, load_config_file, override  # noqa: E402


def measure(state, async_save: bool, saves: int, root: str) -> dict:
    workdir = tempfile.mkdtemp(dir=root)
    ckpt = Checkpointer(workdir, keep=saves + 1, async_save=async_save)
    blocking, total = [], []
    for i in range(1, saves + 1):
        t0 = time.perf_counter()
        ckpt.save(i, state)
        t1 = time.perf_counter()
        ckpt.wait()
        t2 = time.perf_counter()
        blocking.append(t1 - t0)
        total.append(t2 - t0)
    ckpt.close()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
               os.walk(os.path.join(workdir, "checkpoints", str(saves))) for f in fs)
    shutil.rmtree(workdir)
    return {"async": async_save, "blocking_s": float(np.median(blocking)),
            "total_s": float(np.median(total)), "bytes": size}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    args = p.parse_args()
    run = from_config_dict(override(load_config_file(os.path.join(ROOT, "configs/gpt2_small.py")),
                                    **{"mesh.data": 1}))
    mesh = sharding.make_mesh(run.mesh, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        state = train.build(run, mesh).init()
        # Fill every float leaf with noise: fresh Adam moments are zeros, which compress away
        # and would flatter the write.
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        state = treedef.unflatten([
            jax.random.normal(k, x.shape, x.dtype) * 0.01 if jax.numpy.issubdtype(
                x.dtype, jax.numpy.floating) and x.ndim else x for k, x in zip(keys, leaves)])
        jax.block_until_ready(state)
    n = sum(x.size for x in jax.tree.leaves(state.params))
    rows = [measure(state, a, args.saves, args.dir) for a in (False, True)]
    print(f"gpt2_small: {n:,} parameters, checkpoint {rows[0]['bytes'] / 1e9:.2f} GB on "
          f"{jax.devices()[0].device_kind}")
    print("| save | blocks the loop s | until on disk s |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {'async' if r['async'] else 'sync'} | {r['blocking_s']:.3f} | "
              f"{r['total_s']:.3f} |")
    print(f"async blocks {rows[0]['blocking_s'] / rows[1]['blocking_s']:.1f}x less than sync")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "params": n, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
