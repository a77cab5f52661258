"""The embedded corpus: the running interpreter's own standard library sources.

Every Python install carries ~30 MB of real, varied text (code, docstrings, comments), so the demo
and the tests train on real data with no download. It goes through the same preparation as a
user's corpus (`lm.data.prepare`, byte tokenizer), cached in the run's work directory; documents
are files, held out for validation by a hash of their path, so the split is stable everywhere.
"""
from __future__ import annotations

import io
import os
import sysconfig

from lm.data.prepare import prepare

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


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


def prepare_stdlib(out: str, val_fraction: float = 0.02, workers: int | None = None,
                   verbose: bool = False) -> str:
    """Prepares the stdlib into `out` (a no-op when it already is); returns `out`."""
    log = None if verbose else io.StringIO()
    prepare(stdlib_files(), out, tokenizer="bytes", val_fraction=val_fraction, workers=workers,
            progress=False, **({"log": log} if log else {}))
    return out
