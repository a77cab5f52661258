"""`python -m lm.data.verify DIR`: the full check of a prepared directory (`lm.data.prepare`).

Reads every shard: its size, the crc32 of each block, its sha256 and its token ids (all below
the tokenizer's vocabulary size), against DIR/manifest.json. Opening a `Dataset` (every run)
checks only sizes and a sample of blocks; this is the check to run after copying a corpus or
when a disk is suspect. Prints a summary; exits 0 when every shard is intact, 1 naming the
damaged ones, 2 when DIR is not a prepared directory.
"""
from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from lm.data.dataset import Dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm.data.verify",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("dir", help="a directory written by `python -m lm.data.prepare`")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        data = Dataset(args.dir, check=False)
    except (ValueError, OSError) as e:
        print(f"lm.data.verify: error: {e}", file=sys.stderr)
        sys.exit(2)
    start = time.perf_counter()
    checked = tqdm(data.check(full=True), desc="verifying", total=len(data.shards),
                   unit="shard", disable=args.no_progress, file=sys.stderr)
    bad = [problem for problem in checked if problem]
    tokens = sum(s["tokens"] for s in data.shards)
    print(f"lm.data.verify: {data.path}: {len(data.shards)} shards, {tokens:,} tokens, "
          f"read in {time.perf_counter() - start:.1f} s")
    for problem in bad:
        print(f"lm.data.verify: damaged: {problem}")
    if bad:
        print(f"lm.data.verify: {len(bad)} of {len(data.shards)} shards are damaged: prepare "
              "the data again")
        sys.exit(1)
    print(f"lm.data.verify: every shard matches its size and sha256 in the manifest and holds "
          f"token ids below the vocabulary size ({data.tokenizer.vocab_size:,})")


if __name__ == "__main__":
    main()
