"""The embedded corpus: the running interpreter's own standard library sources.

Every Python install carries ~30 MB of real, varied text (code, docstrings, comments), so the demo
and the tests train on real data with no download. It goes through the same preparation as a
user's corpus (`lm.data.prepare`), cached in the run's work directory; documents are files, held
out for validation by a hash of their path, so the split is stable everywhere.

The tokenizer is the byte tokenizer, or ("wordpiece:N", for the BERT configs) a cased WordPiece
vocabulary of N entries trained on a 4 MB sample of the train split (the first files in path
order), not all ~31 MB: on 2 idle cores training 8,192 entries takes 0.8 s on the sample against
5 s on everything (3 s against 18-20 s on busy ones), and leaves 0.02% of the ~8.8M tokens
[UNK]. Tokenizing dominates: `wordpiece:8192` prepares in ~10 s on idle cores (~25 s busy),
bytes in ~1 s.
"""
from __future__ import annotations

import io
import os
import re
import sysconfig

from lm.data.prepare import prepare

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_WORDPIECE = re.compile(r"wordpiece:([1-9][0-9]*)")
WORDPIECE_SAMPLE_BYTES = 4 << 20


def stdlib_files() -> list[str]:
    """The `.py` files of the standard library, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    if not paths:
        raise FileNotFoundError(f"no .py files under the standard library at {root!r}")
    return sorted(paths)


def tokenizer_options(tokenizer: str) -> dict:
    """`prepare` keywords for a `data.tokenizer` string: 'bytes' or 'wordpiece:N'."""
    if tokenizer == "bytes":
        return {"tokenizer": "bytes"}
    if m := _WORDPIECE.fullmatch(tokenizer):
        return {"wordpiece_vocab_size": int(m.group(1)),
                "tokenizer_sample_bytes": WORDPIECE_SAMPLE_BYTES}
    raise ValueError(f"unknown embedded-corpus tokenizer {tokenizer!r}: expected 'bytes' or "
                     "'wordpiece:N' (N, the vocabulary size, a positive integer, e.g. "
                     "'wordpiece:8192')")


def prepare_stdlib(out: str, val_fraction: float = 0.02, workers: int | None = None,
                   verbose: bool = False, tokenizer: str = "bytes") -> str:
    """Prepares the stdlib into `out` with `tokenizer` ('bytes' or 'wordpiece:N'), a no-op when
    it already is; returns `out`. A directory prepared with another tokenizer is refused
    (`PrepareError`), so give each tokenizer its own `out`."""
    options = tokenizer_options(tokenizer)
    log = None if verbose else io.StringIO()
    prepare(stdlib_files(), out, val_fraction=val_fraction, workers=workers, progress=False,
            **options, **({"log": log} if log else {}))
    return out
