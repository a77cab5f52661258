"""The embedded corpus: the running interpreter's own standard library sources.

Every Python install carries ~30 MB of real, varied text (code, docstrings, comments), so the demo
and the tests train on real data with no download. Documents are split into train and eval by a
hash of their path, so the held-out set is stable across machines and runs.
"""
from __future__ import annotations

import dataclasses
import os
import sysconfig
import zlib
from collections.abc import Iterator

import numpy as np

from lm.data.tokenizer import ByteTokenizer

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_documents() -> Iterator[tuple[str, bytes]]:
    """(relative path, raw bytes) of each `.py` file of the standard library, in sorted order.

    Raw bytes on purpose: a few of the test fixtures are deliberately not valid UTF-8, and the
    byte tokenizer takes them as they are.
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    if not paths:
        raise FileNotFoundError(f"no .py files under the standard library at {root!r}")
    for path in sorted(paths):
        with open(path, "rb") as f:
            data = f.read()
        if data.strip():
            yield os.path.relpath(path, root), data


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # flat token ids, documents separated by eod
    eval: np.ndarray
    tokenizer: ByteTokenizer
    num_documents: int


def load_corpus(eval_percent: float = 2.0) -> Corpus:
    """Tokenizes the stdlib and holds out ~`eval_percent`% of the documents for evaluation."""
    tok = ByteTokenizer()
    parts: dict[bool, list[np.ndarray]] = {True: [], False: []}
    eod = np.array([tok.eod_id], np.uint16)
    n = 0
    for path, data in stdlib_documents():
        held_out = zlib.crc32(path.encode()) % 10_000 < eval_percent * 100
        parts[held_out] += [tok.encode(data), eod]
        n += 1
    if not parts[True] or not parts[False]:
        raise ValueError(f"data.eval_percent={eval_percent} leaves an empty train or eval split")
    return Corpus(train=np.concatenate(parts[False]), eval=np.concatenate(parts[True]),
                  tokenizer=tok, num_documents=n)
