"""`python -m lm.data.downstream --out DIR [--task corrupted|next-line]`: a labelled task made
offline from the embedded corpus (the standard library's sources), for fine-tuning demos and
tests.

"corrupted" (the default; CoLA's single-sentence acceptability form): a line of a source file,
kept as it is (label "original") or, in half the rows, with REPLACED of its words swapped for
words of other files' lines (label "corrupted"). Telling them apart takes a model of what fits
in context, which masked-LM pretraining learns and a model trained on the rows alone must
infer from them (ELECTRA's replaced-token detection, per line).
"next-line" (MRPC's sentence-pair form): a line (`text`) with the line that follows it (label
"next") or, in half the rows, a line of another file (label "random"): what BERT's
next-sentence pretraining practises. Lines are the non-blank ones of at least MIN_CHARS
characters, stripped; words are their whitespace-separated parts. Files go to the dev split by
a hash of their path (never the same file in both), rows are drawn with `--seed`, so the files
are the same on every machine with the same Python. Writes DIR/train.jsonl and DIR/dev.jsonl,
and prints the dev split's majority-class accuracy (the baseline a model must beat; 0.5 by
construction, up to the draw).
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
REPLACED = 2
TASKS = ("corrupted", "next-line")
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


def corrupted_rows(files: list[list[str]], n: int, rng: random.Random) -> list[dict]:
    """n rows from `files`: half of them lines as they are, half with REPLACED words swapped
    for words of another file's line (never the same word)."""
    usable = [i for i, lines in enumerate(files) if lines]
    rows = []
    while len(rows) < n:
        f = rng.choice(usable)
        words = rng.choice(files[f]).split()
        if len(words) < REPLACED + 1:
            continue
        if rng.random() < 0.5:
            rows.append({"text": " ".join(words), "label": "original"})
            continue
        g = rng.choice([i for i in usable if i != f] if len(usable) > 1 else usable)
        donors = [w for w in rng.choice(files[g]).split() if w not in words]
        if len(donors) < REPLACED:
            continue
        for k, w in zip(rng.sample(range(len(words)), REPLACED), rng.sample(donors, REPLACED)):
            words[k] = w
        rows.append({"text": " ".join(words), "label": "corrupted"})
    return rows


def majority_accuracy(rows: list[dict]) -> float:
    counts = collections.Counter(r["label"] for r in rows)
    return max(counts.values()) / len(rows)


def make(out: str, train_rows: int = 4000, dev_rows: int = 500, seed: int = 0,
         paths: list[str] | None = None, task: str = "corrupted") -> dict:
    """Writes OUT/train.jsonl and OUT/dev.jsonl of `task`; returns their row counts and the dev
    split's majority-class accuracy."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    rows_of = corrupted_rows if task == "corrupted" else next_line_rows
    paths = stdlib_files() if paths is None else paths
    rng = random.Random(seed)
    train = [_lines(p) for p in paths if not _is_dev(p)]
    dev = [_lines(p) for p in paths if _is_dev(p)]
    splits = {"train": rows_of(train, train_rows, rng), "dev": rows_of(dev, dev_rows, rng)}
    os.makedirs(out, exist_ok=True)
    for name, rows in splits.items():
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"task": task, "train_rows": len(splits["train"]),
            "dev_rows": len(splits["dev"]),
            "dev_majority_accuracy": majority_accuracy(splits["dev"])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lm.data.downstream",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--task", choices=TASKS, default="corrupted")
    p.add_argument("--train-rows", type=int, default=4000)
    p.add_argument("--dev-rows", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(make(args.out, args.train_rows, args.dev_rows, args.seed,
                          task=args.task)))


if __name__ == "__main__":
    main()
