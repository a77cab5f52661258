"""ONNX export latency: onnxruntime on `python -m lm.export --format onnx`'s files against lm's own
jitted functions (the jax path lm.serve runs), in one run on this machine's CPU.

    python bench/onnx_latency.py [--runs 40] [--json bench/results-onnx-cpu-20261207.json]

Models (random initialisation, float32, written as checkpoints the way lm.convert writes them,
so that nothing trains):
- encoder: configs/finetune.py:classify's BERT (4 x 256, vocabulary 8192), classify head with 2
  labels, at batch 1 and 8 x sequence --seq-len; lm side `lm.finetune.encoder_function` under
  jax.jit (lm.predict / lm.serve), onnxruntime side encoder.onnx.
- decoder: configs/tiny.py (gpt2 style, 4 x 256, max_len 256): the prefill of --prompt tokens at
  batch 1, and the decode step at batch 1 and 8 (the KV cache fed back each call); lm side
  `Engine.prefill_fn` / `decode_fn` under jax.jit (what DecodeSlots runs), onnxruntime side
  prefill.onnx / decode.onnx.

Each call is timed to its result (block_until_ready; onnxruntime returns numpy), inputs already
prepared, after --warmup calls; p50 / p90 / mean over --runs. Both runtimes use their default
threading on all cores. Prints p50s and the ratio onnxruntime / lm (below 1: onnxruntime faster)
and writes everything to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402


def stats(times: list[float]) -> dict:
    t = np.asarray(times) * 1e3
    return {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
            "mean_ms": float(t.mean()), "min_ms": float(t.min())}


def timed(call, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t)
    return stats(times)


def make_checkpoint(directory: str, config: str, **flat) -> str:
    """A workdir with one random-initialised checkpoint of `config` + dotted overrides."""
    from flax import nnx

    from lm.checkpoint import Checkpointer
    from lm.config import from_config_dict, load_config_file, override
    from lm.model import Transformer
    from lm.sharding import REPLICATED
    run = from_config_dict(override(load_config_file(os.path.join(ROOT, config)), **flat))
    with nnx.logical_axis_rules(REPLICATED):
        _, params = nnx.split(Transformer(run.model, run.precision, run.task,
                                          rngs=nnx.Rngs(0)))
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(0, {"params": jax.tree.map(np.asarray, params)}, None, run.to_dict())
    ckpt.wait()
    ckpt.close()
    return directory


def encoder(a, tmp: str) -> dict:
    from lm import onnx_export
    from lm.finetune import encoder_function
    from lm.predict import load_checkpoint
    workdir = make_checkpoint(os.path.join(tmp, "enc"), "configs/finetune.py:classify",
                              **{"task.labels": '["a", "b"]', "task.num_labels": 2})
    t = time.perf_counter()
    onnx_export.export(workdir, os.path.join(tmp, "enc-onnx"))
    export_s = time.perf_counter() - t
    run, params, _ = load_checkpoint(workdir)
    forward = jax.jit(encoder_function(run))
    sess = onnx_export.sessions(os.path.join(tmp, "enc-onnx"))["encoder"]
    rng = np.random.default_rng(0)
    out = {"model": "configs/finetune.py:classify (BERT 4 x 256, vocab 8192), 2 labels",
           "seq_len": a.seq_len, "export_s": export_s}
    for batch in (1, 8):
        tokens = rng.integers(5, 8192, (batch, a.seq_len)).astype(np.int32)
        types = np.zeros_like(tokens)
        lengths = np.full((batch,), a.seq_len, np.int32)
        feeds = {"tokens": tokens, "token_types": types, "lengths": lengths}
        args = [jax.device_put(x) for x in (tokens, types, lengths)]
        lm = timed(lambda: forward(params, *args), a.warmup, a.runs)
        ort = timed(lambda: sess.run(None, feeds), a.warmup, a.runs)
        diff = float(np.abs(sess.run(None, feeds)[1] - np.asarray(forward(params, *args)["probs"])
                            ).max())
        out[f"batch{batch}"] = {"lm": lm, "onnxruntime": ort, "ratio": ort["p50_ms"] / lm["p50_ms"],
                                "max_abs_diff_probs": diff}
    return out


def decoder(a, tmp: str) -> dict:
    from lm import onnx_export
    from lm.generate import Engine
    workdir = make_checkpoint(os.path.join(tmp, "dec"), "configs/tiny.py")
    t = time.perf_counter()
    meta = onnx_export.export(workdir, os.path.join(tmp, "dec-onnx"))
    export_s = time.perf_counter() - t
    engine = Engine.from_checkpoint(workdir)
    prefill, decode = jax.jit(engine.prefill_fn), jax.jit(engine.decode_fn)
    sess = onnx_export.sessions(os.path.join(tmp, "dec-onnx"))
    past = onnx_export.cache_names(meta["num_layers"], "past")
    rng = np.random.default_rng(1)
    out = {"model": "configs/tiny.py (gpt2 style, 4 x 256, vocab 384, max_len 256)",
           "prompt": a.prompt, "export_s": export_s}
    tokens = rng.integers(0, 384, (1, a.prompt)).astype(np.int32)
    lengths = np.array([a.prompt], np.int32)
    lm = timed(lambda: prefill(engine.params, tokens, lengths), a.warmup, a.runs)
    ort = timed(lambda: sess["prefill"].run(None, {"tokens": tokens, "lengths": lengths}),
                a.warmup, a.runs)
    out["prefill_batch1"] = {"lm": lm, "onnxruntime": ort, "ratio": ort["p50_ms"] / lm["p50_ms"]}
    for batch in (1, 8):
        tokens = rng.integers(0, 384, (batch, a.prompt)).astype(np.int32)
        lengths = np.full((batch,), a.prompt, np.int32)
        _, cache = prefill(engine.params, tokens, lengths)
        got = sess["prefill"].run(None, {"tokens": tokens, "lengths": lengths})
        feeds = {"tokens": tokens[:, 0].copy(), "positions": lengths, **dict(zip(past, got[1:]))}
        step, positions = jax.device_put(tokens[:, 0]), jax.device_put(lengths)
        # The same position every call: the cost of a step does not depend on it.
        lm = timed(lambda: decode(engine.params, step, positions, cache), a.warmup, a.runs)
        ort = timed(lambda: sess["decode"].run(None, feeds), a.warmup, a.runs)
        diff = float(np.abs(sess["decode"].run(None, feeds)[0] -
                            np.asarray(decode(engine.params, step, positions, cache)[0])).max())
        out[f"decode_batch{batch}"] = {"lm": lm, "onnxruntime": ort,
                                       "ratio": ort["p50_ms"] / lm["p50_ms"],
                                       "max_abs_diff_logits": diff}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=128, help="encoder sequence length")
    p.add_argument("--prompt", type=int, default=64, help="decoder prompt length")
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "results-onnx-cpu-20261207.json"))
    a = p.parse_args()
    from importlib.metadata import version
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"device": f"{platform.processor() or platform.machine()}, "
                            f"{os.cpu_count()} CPUs visible",
                  "versions": {name: version(name) for name in ("jax", "onnxruntime", "jax2onnx")},
                  "runs": a.runs, "warmup": a.warmup,
                  "encoder": encoder(a, tmp), "decoder": decoder(a, tmp)}
    result["wall_s"] = time.perf_counter() - start
    print(f"{'function':<22} {'lm p50 ms':>10} {'ort p50 ms':>11} {'ort / lm':>9}")
    for part in ("encoder", "decoder"):
        for key, row in result[part].items():
            if isinstance(row, dict) and "ratio" in row:
                print(f"{part + ' ' + key:<22} {row['lm']['p50_ms']:>10.2f} "
                      f"{row['onnxruntime']['p50_ms']:>11.2f} {row['ratio']:>9.2f}")
    print(f"export: encoder {result['encoder']['export_s']:.1f} s, decoder "
          f"{result['decoder']['export_s']:.1f} s; whole run {result['wall_s']:.0f} s")
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
