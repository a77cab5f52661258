"""`python -m lm.data.downstream --out DIR`: a labelled sentence-pair task made offline from the
embedded corpus (the standard library's sources), for fine-tuning demos and tests.

"next-line": each row pairs a line of a source file (`text`) with the line that follows it
(label "next") or, in half the rows, with a line of another file (label "random"): MRPC's
sentence-pair form, and the skill BERT's next-sentence pretraining practises. Lines are the
non-blank ones of at least MIN_CHARS characters, stripped. Files go to the dev split by a hash of
their path (never the same file in both), rows are drawn with `--seed`, so the files are the
same on every machine with the same Python. Writes DIR/train.jsonl and DIR/dev.jsonl, and prints
the dev split's majority-class accuracy (the baseline a model must beat; 0.5 by construction,
up to the draw).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random

from lm.data.corpus import stdlib_files

MIN_CHARS = 16
DEV_SHARE = 10  # one file in DEV_SHARE goes to dev


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return []
    return [s for s in (line.strip() for line in text.splitlines()) if len(s) >= MIN_CHARS]


def _is_dev(path: str) -> bool:
    name = os.path.relpath(path, os.path.dirname(os.path.dirname(path)))
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % DEV_SHARE == 0


def next_line_rows(files: list[list[str]], n: int, rng: random.Random) -> list[dict]:
    """n rows from `files` (each a list of lines): half with the next line, half a random
    line of another file."""
    usable = [i for i, lines in enumerate(files) if len(lines) >= 2]
    rows = []
    while len(rows) < n:
        f = rng.choice(usable)
        k = rng.randrange(len(files[f]) - 1)
        if rng.random() < 0.5:
            rows.append({"text": files[f][k], "text_pair": files[f][k + 1], "label": "next"})
        else:
            g = rng.choice([i for i in usable if i != f] if len(usable) > 1 else usable)
            rows.append({"text": files[f][k], "text_pair": rng.choice(files[g]),
                         "label": "random"})
    return rows


def majority_accuracy(rows: list[dict]) -> float:
    counts = collections.Counter(r["label"] for r in rows)
    return max(counts.values()) / len(rows)


def make(out: str, train_rows: int = 4000, dev_rows: int = 500, seed: int = 0,
         paths: list[str] | None = None) -> dict:
    """Writes OUT/train.jsonl and OUT/dev.jsonl; returns their row counts and the dev split's
    majority-class accuracy."""
    paths = stdlib_files() if paths is None else paths
    rng = random.Random(seed)
    train = [_lines(p) for p in paths if not _is_dev(p)]
    dev = [_lines(p) for p in paths if _is_dev(p)]
    splits = {"train": next_line_rows(train, train_rows, rng),
              "dev": next_line_rows(dev, dev_rows, rng)}
    os.makedirs(out, exist_ok=True)
    for name, rows in splits.items():
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"task": "next-line", "train_rows": len(splits["train"]),
            "dev_rows": len(splits["dev"]),
            "dev_majority_accuracy": majority_accuracy(splits["dev"])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lm.data.downstream",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train-rows", type=int, default=4000)
    p.add_argument("--dev-rows", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(make(args.out, args.train_rows, args.dev_rows, args.seed)))


if __name__ == "__main__":
    main()
