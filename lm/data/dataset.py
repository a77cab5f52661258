"""A prepared corpus on disk (see `lm.data.prepare`): its manifest, tokenizer and memory-mapped
token shards, one flat stream per split."""
from __future__ import annotations

import collections
import json
import os
import threading

import numpy as np

from lm.data import tokenizer as tokenizers
from lm.data.prepare import FORMAT, MANIFEST, PLAN, file_sha256


class TokenStream:
    """The shards of one split as one virtual array of token ids (memory-mapped, read-only)."""

    MAX_OPEN = 256  # memory maps held open at once (each holds a file descriptor)

    def __init__(self, paths: list[str], counts: list[int], dtype: str):
        self.paths, self.counts, self.dtype = paths, counts, dtype
        self.offsets = np.cumsum([0] + list(counts))
        self._open: collections.OrderedDict[int, np.memmap] = collections.OrderedDict()
        self._lock = threading.Lock()  # the prefetch thread and the caller may both read

    def shard(self, k: int) -> np.memmap:
        """Shard k, memory-mapped on first use; the least recently used are closed past
        MAX_OPEN, so a corpus of any number of shards stays within the descriptor limit."""
        with self._lock:
            if k in self._open:
                self._open.move_to_end(k)
            else:
                self._open[k] = np.memmap(self.paths[k], dtype=self.dtype, mode="r",
                                          shape=(self.counts[k],))
                if len(self._open) > self.MAX_OPEN:
                    self._open.popitem(last=False)
            return self._open[k]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """[len(starts), length] int32: the tokens at [s, s + length) for each start s."""
        starts = np.asarray(starts, np.int64)
        out = np.empty((len(starts), length), np.int32)
        shard = np.searchsorted(self.offsets, starts, side="right") - 1
        local = starts - self.offsets[shard]
        inside = local + length <= self.offsets[shard + 1] - self.offsets[shard]
        for k in np.unique(shard[inside]):  # one gather per shard for the usual windows
            rows = np.flatnonzero(inside & (shard == k))
            out[rows] = self.shard(k)[local[rows, None] + np.arange(length)]
        for i in np.flatnonzero(~inside):  # windows that run into the next shard(s)
            k, filled, begin = shard[i], 0, local[i]
            while filled < length:
                piece = self.shard(k)[begin:begin + length - filled]
                out[i, filled:filled + len(piece)] = piece
                filled, k, begin = filled + len(piece), k + 1, 0
        return out

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = len(self) if stop is None else stop
        return self.windows(np.array([start]), stop - start)[0]


class Dataset:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.exists(manifest_path):
            if os.path.exists(os.path.join(self.path, PLAN)):
                raise ValueError(f"data directory {path} was not finished: re-run the same "
                                 "`python -m lm.data.prepare` command to complete it")
            raise ValueError(f"{path} is not a prepared data directory (no {MANIFEST}): create "
                             "one with `python -m lm.data.prepare --input ... --out DIR`")
        with open(manifest_path) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} has format {self.manifest.get('format')!r}; this "
                             f"version of lm reads {FORMAT!r}: prepare the data again")
        self.fingerprint: str = self.manifest["fingerprint"]
        self.dtype: str = self.manifest["dtype"]
        self.tokenizer = tokenizers.load(self.manifest["tokenizer"], self.path)
        itemsize = np.dtype(self.dtype).itemsize
        for split in self.manifest["splits"].values():
            for shard in split["shards"]:
                p = os.path.join(self.path, shard["file"])
                size = os.path.getsize(p) if os.path.exists(p) else None
                if size != shard["tokens"] * itemsize:
                    raise ValueError(f"shard {p} is {'missing' if size is None else f'{size} bytes'}"
                                     f", the manifest says {shard['tokens'] * itemsize} bytes: the "
                                     "data directory is damaged; prepare it again")

    def num_tokens(self, split: str) -> int:
        return self.manifest["splits"][split]["tokens"]

    def split(self, name: str) -> TokenStream:
        shards = self.manifest["splits"][name]["shards"]
        return TokenStream([os.path.join(self.path, s["file"]) for s in shards],
                           [s["tokens"] for s in shards], self.dtype)

    def verify(self) -> None:
        """Checks every shard against its manifest checksum (reads all the data)."""
        for split in self.manifest["splits"].values():
            for shard in split["shards"]:
                p = os.path.join(self.path, shard["file"])
                if file_sha256(p) != shard["sha256"]:
                    raise ValueError(f"shard {p} does not match its checksum in {MANIFEST}")
