"""Data pipeline throughput, measured in one run on this machine.

1. Preparation: MB/s of raw JSONL text turned into token ids on all cores, `lm.data.prepare`
   against the same tokenizer (a byte-level BPE, 8,192 entries, trained here) run through
   Hugging Face `datasets`: `load_dataset("json")` + `.map(batched=True, num_proc=N)`, the usual
   way to tokenize a corpus for training. Both start from the same files with cold caches; each
   is run `--repeats` times, alternating, and the best time kept.
2. Loading: tokens/s that the loader delivers (memory-mapped shards, shuffled, packed, put on the
   device) against the tokens/s that the train step of `configs/tiny.py` consumes.

    pip install -e '.[bench]'
    python bench/data_throughput.py [--mb 64] [--workers N] [--json out.json]

The corpus is the standard library's Python sources (no download), as JSONL records, repeated
to `--mb` megabytes over 16 files.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lm.data.corpus import stdlib_files  # noqa: E402
from lm.data.prepare import prepare  # noqa: E402
from lm.data.tokenizer import train_bpe  # noqa: E402


def make_corpus(directory: str, megabytes: float, files: int = 16) -> list[str]:
    texts = []
    for path in stdlib_files():
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        if text.strip():
            texts.append(text)
    target, written, paths, i = megabytes * 1e6, 0, [], 0
    handles = [open(os.path.join(directory, f"part-{k:02d}.jsonl"), "w") for k in range(files)]
    while written < target:
        line = json.dumps({"text": texts[i % len(texts)], "id": i}) + "\n"
        handles[i % files].write(line)
        written += len(texts[i % len(texts)].encode())
        i += 1
    for h in handles:
        paths.append(h.name)
        h.close()
    return paths


def run_ours(files: list[str], tokenizer: str, out: str, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    prepare(files, out, tokenizer=tokenizer, workers=workers, val_fraction=0.01, progress=False,
            log=io.StringIO())
    return time.perf_counter() - t


_peer_tokenizer = None


def _peer_encode(batch: dict, tokenizer_path: str) -> dict:
    global _peer_tokenizer
    if _peer_tokenizer is None:
        from tokenizers import Tokenizer
        _peer_tokenizer = Tokenizer.from_file(tokenizer_path)
    encodings = _peer_tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)
    return {"input_ids": [e.ids for e in encodings]}


def run_datasets(files: list[str], tokenizer: str, cache: str, workers: int) -> float:
    import datasets
    datasets.disable_progress_bars()
    shutil.rmtree(cache, ignore_errors=True)
    t = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache)
    ds = ds.map(_peer_encode, batched=True, num_proc=workers, remove_columns=ds.column_names,
                fn_kwargs={"tokenizer_path": tokenizer})
    ds.flatten_indices()
    elapsed = time.perf_counter() - t
    del ds
    return elapsed


def loader_vs_training(data_dir: str, steps: int = 30) -> dict:
    """Tokens/s of the loader for configs/tiny.py's batches vs its train step's consumption."""
    import jax
    from flax import nnx

    from lm import sharding, train
    from lm.config import from_config_dict, load_config_file
    from lm.data.dataset import Dataset
    from lm.data.loader import Loader
    run = from_config_dict(load_config_file(os.path.join(ROOT, "configs", "tiny.py")))
    t = run.train
    mesh = sharding.make_mesh(run.mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    stream = Dataset(data_dir).split("train")
    loader = Loader(stream, t.batch_size, t.seq_len, t.seed, batch_sharding)
    for _ in range(5):
        next(loader).block_until_ready()
    n = 500
    start = time.perf_counter()
    for _ in range(n):
        batch = next(loader)
    batch.block_until_ready()
    loader_tps = n * t.batch_size * t.seq_len / (time.perf_counter() - start)
    # A GPU-sized host batch (64 x 2048) through the same path, for scale.
    big = Loader(stream, 64, 2048, t.seed, batch_sharding)
    next(big).block_until_ready()
    start = time.perf_counter()
    for _ in range(20):
        batch = next(big)
    batch.block_until_ready()
    big_tps = 20 * 64 * 2048 / (time.perf_counter() - start)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        trainer = train.build(run, mesh)
        state = trainer.init()
        batch = next(loader)
        state, m = trainer.train_step(state, batch)
        jax.block_until_ready(m)
        start = time.perf_counter()
        for _ in range(steps):
            state, m = trainer.train_step(state, batch)
        jax.block_until_ready(m)
        train_tps = steps * t.batch_size * t.seq_len / (time.perf_counter() - start)
    return {"loader_tokens_per_s": loader_tps, "loader_64x2048_tokens_per_s": big_tps, "train_tokens_per_s": train_tps,
            "loader_over_train": loader_tps / train_tps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=64, help="corpus size in MB of raw text")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peers", choices=["datasets", "none"], default="datasets")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="lm-data-bench-")
    try:
        os.makedirs(os.path.join(work, "raw"))
        files = make_corpus(os.path.join(work, "raw"), args.mb)
        raw_mb = sum(len(json.loads(line)["text"].encode()) for f in files
                     for line in open(f)) / 1e6
        print(f"corpus: {raw_mb:,.1f} MB of text in {len(files)} JSONL files; "
              f"{args.workers} workers", flush=True)
        tok = train_bpe((json.loads(line)["text"] for line in open(files[0])), 8192)
        tok.save(work)
        tok_path = os.path.join(work, "tokenizer.json")

        # The roof: the tokenizer alone on all cores (Rust threads), texts already in memory.
        texts = [json.loads(line)["text"] for f in files for line in open(f)]
        t = time.perf_counter()
        tok.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        roof = raw_mb / (time.perf_counter() - t)
        del texts
        print(f"  tokenizer alone      {roof:7.2f} MB/s (in memory, no I/O)", flush=True)

        ours, peer = [], []
        for _ in range(args.repeats):
            ours.append(run_ours(files, tok_path, os.path.join(work, "out"), args.workers))
            print(f"  lm.data.prepare      {raw_mb / ours[-1]:7.2f} MB/s ({ours[-1]:.1f} s)",
                  flush=True)
            if args.peers == "datasets":
                peer.append(run_datasets(files, tok_path, os.path.join(work, "hf"), args.workers))
                print(f"  datasets.map         {raw_mb / peer[-1]:7.2f} MB/s ({peer[-1]:.1f} s)",
                      flush=True)
        results = {"raw_mb": raw_mb, "workers": args.workers, "cores": os.cpu_count(),
                   "prepare_mb_per_s": raw_mb / min(ours), "tokenizer_alone_mb_per_s": roof}
        if peer:
            results["datasets_mb_per_s"] = raw_mb / min(peer)
            results["prepare_over_datasets"] = min(peer) / min(ours)
        with open(os.path.join(work, "out", "manifest.json")) as f:
            results["train_tokens"] = json.load(f)["splits"]["train"]["tokens"]
        results.update(loader_vs_training(os.path.join(work, "out")))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"preparation: lm {results['prepare_mb_per_s']:.2f} MB/s "
          f"({results['prepare_mb_per_s'] / results['tokenizer_alone_mb_per_s']:.0%} of the "
          "tokenizer alone)", end="")
    if peer:
        print(f", datasets {results['datasets_mb_per_s']:.2f} MB/s -> "
              f"{results['prepare_over_datasets']:.2f}x (target >= 1.0)", end="")
    print(f"\nloader: {results['loader_tokens_per_s']:,.0f} tokens/s vs tiny's train step "
          f"{results['train_tokens_per_s']:,.0f} tokens/s -> {results['loader_over_train']:.0f}x "
          f"(target >= 20x); 64 x 2048 batches: {results['loader_64x2048_tokens_per_s']:,.0f} "
          "tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
