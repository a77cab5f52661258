"""int8 inference, measured in one run: accuracy of calibrated int8 (`lm.quantize`) against
float32 for a decoder and a fine-tuned classifier, and the speed of its int8 x int8 -> int32
matmuls (and of weight-only int8) against float on this machine.

    python bench/int8.py [--decoder W] [--classifier W --task-dir D] [--json OUT]
    python bench/int8.py --speed-only --dtype bfloat16      # on a GPU

Accuracy: W (default: configs/tiny.py trained 150 steps here, ~2 minutes on 2 CPU cores) is
calibrated on its training split with each method; held-out perplexity (4 x 16 x 128 tokens)
and greedy agreement (8 held-out prompts x 16 tokens) against float32. The classifier (default:
configs/finetune.py:classify fine-tuned from random initialisation on lm.data.downstream's
`corrupted` task, 240 steps) is calibrated on its train.jsonl texts; dev accuracy float vs int8.
Speed: a gpt2-style model, 4 layers x 768 (random weights, calibrated on random tokens: the
speed does not depend on the values), prefill 8 x 128 and decode steps at batch 1 and 8 with 128
cached positions, in `--dtype`; each round times every form in turn, medians reported.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lm.config import from_config_dict, load_config_file, override  # noqa: E402
from lm.generate import Engine, SamplingParams  # noqa: E402
from lm.model import Transformer, init_cache  # noqa: E402
from lm.quantize import METHODS, calibrate, quantize, quantize_static  # noqa: E402

ONE_DEVICE = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def run(*args: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ONE_DEVICE,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")


def quantized(checkpoint: str, calibrate_from: str, method: str, out: str, *extra: str) -> str:
    run("-m", "lm.quantize", "--checkpoint", checkpoint, "--calibrate", calibrate_from,
        "--method", method, "--out", out, *extra)
    return out


def decoder_accuracy(workdir: str, tmp: str) -> dict:
    from lm.data.dataset import Dataset
    from lm.data.loader import Loader, LoaderState
    data = os.path.join(workdir, "data", "stdlib")
    val = Loader(Dataset(data).split("val"), 16, 128, 0, shuffle=False)
    batches = [np.asarray(val.batch_at(LoaderState(0, i * 16))) for i in range(4)]
    prompts = [[int(t) for t in row[:24]] for row in batches[3][:8]]
    greedy = SamplingParams(max_new_tokens=16)

    def measure(engine: Engine) -> tuple[float, list]:
        loss = jax.jit(lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
            nnx.merge(engine.graphdef, p)(b[:, :-1]).astype(jnp.float32), b[:, 1:]).mean())
        ppl = float(np.exp(np.mean([loss(engine.params, jnp.asarray(b)) for b in batches])))
        return ppl, engine.generate(prompts, greedy)

    float_engine = Engine.from_checkpoint(workdir)
    ppl, ids = measure(float_engine)
    result = {"float32": {"perplexity": ppl}}
    forms = {"weight_only": float_engine.replace(params=quantize(float_engine.params))}
    for method in METHODS:
        forms[method] = Engine.from_checkpoint(quantized(
            workdir, data, method, os.path.join(tmp, f"dec-{method}"), "--samples", "64"))
    for name, engine in forms.items():
        p, got = measure(engine)
        result[name] = {"perplexity": p, "relative": p / ppl - 1,
                        "greedy_identical": sum(a == b for a, b in zip(ids, got)),
                        "greedy_tokens_equal": float(np.mean([a == b for x, y in zip(ids, got)
                                                              for a, b in zip(x, y)]))}
        print(f"decoder {name}: perplexity {p:.4f} vs {ppl:.4f} ({p / ppl - 1:+.3%}), greedy "
              f"{result[name]['greedy_identical']}/8 identical", flush=True)
    return result


def wordpiece(task_dir: str) -> str:
    """A WordPiece vocabulary (8,192) trained on the task's training texts; its file."""
    from lm.data.tokenizer import train_wordpiece
    with open(os.path.join(task_dir, "train.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    tok = train_wordpiece([r[k] for r in rows for k in ("text", "text_pair") if r.get(k)], 8192)
    return os.path.join(task_dir, tok.save(task_dir)["file"])


def classifier_accuracy(workdir: str, task_dir: str, tmp: str) -> dict:
    from lm.finetune import Encoder
    with open(os.path.join(task_dir, "dev.jsonl")) as f:
        dev = [json.loads(line) for line in f if line.strip()]
    rows = [{k: v for k, v in r.items() if k != "label"} for r in dev]

    def accuracy(path: str) -> float:
        out = Encoder.from_checkpoint(path).classify(rows)
        return float(np.mean([o["label"] == r["label"] for o, r in zip(out, dev)]))

    base = accuracy(workdir)
    result = {"float32": {"dev_accuracy": base, "dev_rows": len(dev)}}
    for method in METHODS:
        acc = accuracy(quantized(workdir, os.path.join(task_dir, "train.jsonl"), method,
                                 os.path.join(tmp, f"cls-{method}"), "--samples", "64",
                                 "--seq-len", "64"))
        result[method] = {"dev_accuracy": acc, "relative": acc / base - 1}
        print(f"classifier {method}: dev accuracy {acc:.4f} vs {base:.4f} "
              f"({acc / base - 1:+.2%})", flush=True)
    return result


def speed(dtype: str, rounds: int) -> dict:
    cfg = from_config_dict(override(load_config_file(os.path.join(ROOT, "configs/base.py")), **{
        "model.num_layers": 4, "model.d_model": 768, "model.num_heads": 12,
        "model.num_kv_heads": 12, "model.mlp_dim": 3072, "model.vocab_size": 8192,
        "model.max_len": 256, "precision.param_dtype": dtype, "precision.compute_dtype": dtype}))
    model = Transformer(cfg.model, cfg.precision, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    amax, _ = calibrate(lambda p, t: nnx.merge(graphdef, p).hidden(t), params,
                        [rng.integers(0, 8192, (8, 128)).astype(np.int32)], "max")
    forms = {"float": params, "int8_weight_only": quantize(params),
             "int8": quantize_static(params, amax)}
    programs = {}
    for name, p in forms.items():
        engine = Engine(graphdef, p)
        prefill = jax.jit(engine.prefill_fn)
        decode = jax.jit(engine.decode_fn)
        tokens = jnp.asarray(rng.integers(0, 8192, (8, 128)), jnp.int32)
        lengths = jnp.full((8,), 128, jnp.int32)
        programs[(name, "prefill 8 x 128")] = (prefill, (p, tokens, lengths))
        for b in (1, 8):
            cache = init_cache(cfg.model, b, 256, engine.cache_dtype)
            programs[(name, f"decode step, batch {b}")] = (decode, (
                p, tokens[:b, 0], jnp.full((b,), 128, jnp.int32), cache))
    for fn, args in programs.values():  # compile
        jax.block_until_ready(fn(*args))
    times: dict = {k: [] for k in programs}
    for _ in range(rounds):
        for key, (fn, args) in programs.items():
            reps = 1 if key[1].startswith("prefill") else 10
            t = time.perf_counter()
            for _ in range(reps):
                out = fn(*args)
            jax.block_until_ready(out)
            times[key].append((time.perf_counter() - t) / reps)
    result = {}
    for (name, program), ts in times.items():
        ms = 1000 * float(np.median(ts))
        result.setdefault(program, {})[name] = ms
    for program, by in result.items():
        by["float_over_int8"] = by["float"] / by["int8"]
        by["float_over_weight_only"] = by["float"] / by["int8_weight_only"]
        print(f"{program}: float {by['float']:.2f} ms, int8 {by['int8']:.2f} ms "
              f"({by['float_over_int8']:.2f}x), weight-only {by['int8_weight_only']:.2f} ms "
              f"({by['float_over_weight_only']:.2f}x)", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decoder", help="a trained decoder workdir (default: train tiny here)")
    p.add_argument("--classifier", help="a fine-tuned classify workdir (with --task-dir)")
    p.add_argument("--task-dir", help="its lm.data.downstream task (train.jsonl, dev.jsonl)")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="lm-bench-int8-")
    result = {"device": jax.devices()[0].device_kind, "dtype": args.dtype}
    if not args.speed_only:
        decoder = args.decoder or os.path.join(tmp, "decoder")
        if not args.decoder:
            run("-m", "lm.train", "--config", "configs/tiny.py", "--workdir", decoder,
                "--config.train.steps=150", "--config.train.eval_every=150",
                "--config.train.eval_batches=1", "--config.train.sample_tokens=0",
                "--config.train.progress=False", "--config.mesh.data=1",
                "--config.optim.warmup_steps=20")
        result["decoder"] = decoder_accuracy(decoder, tmp)
        classifier, task_dir = args.classifier, args.task_dir
        if not classifier:
            from lm.data import downstream
            task_dir = os.path.join(tmp, "task")
            downstream.make(task_dir, task="corrupted")
            classifier = os.path.join(tmp, "classifier")
            run("-m", "lm.train", "--config", "configs/finetune.py:classify", "--workdir",
                classifier, f"--config.data.path={task_dir}/train.jsonl",
                f"--config.data.eval_path={task_dir}/dev.jsonl", "--config.train.steps=240",
                "--config.train.eval_every=240", "--config.train.seq_len=64",
                "--config.train.progress=False", f"--config.data.tokenizer={wordpiece(task_dir)}")
        result["classifier"] = classifier_accuracy(classifier, task_dir, tmp)
    result["speed"] = speed(args.dtype, args.rounds)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
