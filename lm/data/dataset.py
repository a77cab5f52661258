"""A prepared corpus on disk (see `lm.data.prepare`): its manifest, tokenizer and memory-mapped
token shards, one flat stream per split, checked cheaply against the manifest at every open and
in full by `python -m lm.data.verify` (`lm/data/verify.py`)."""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import sys
import threading
import zlib
from collections.abc import Iterator

import numpy as np

from lm.data import tokenizer as tokenizers
from lm.data.prepare import CHECK_BLOCK, FORMAT, MANIFEST, PLAN


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
    """A prepared directory. Opening it checks every shard's size and, within OPEN_CHECK_BYTES of
    reads, the per-block crc32 and token-id range of every shard (a small corpus) or of evenly
    spaced blocks (a large one); `verify` (and `python -m lm.data.verify DIR`) reads it all."""

    OPEN_CHECK_BYTES = 64 << 20

    def __init__(self, path: str, check: bool = True):
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
        self.shards: list[dict] = [s for split in self.manifest["splits"].values()
                                   for s in split["shards"]]
        if check:
            for problem in filter(None, self.check(full=False)):
                raise ValueError(f"{problem}: the data directory is damaged; prepare it again "
                                 f"(`python -m lm.data.verify {path}` checks every shard)")
            if not all("block_crc32" in s for s in self.shards):
                print(f"lm.data: note: {manifest_path} predates per-block checksums: opening it "
                      "checked shard sizes and token ids only; `python -m lm.data.verify "
                      f"{path}` compares every shard with its sha256", file=sys.stderr)

    def num_tokens(self, split: str) -> int:
        return self.manifest["splits"][split]["tokens"]

    def split(self, name: str) -> TokenStream:
        shards = self.manifest["splits"][name]["shards"]
        return TokenStream([os.path.join(self.path, s["file"]) for s in shards],
                           [s["tokens"] for s in shards], self.dtype)

    def check(self, full: bool = True) -> Iterator[str | None]:
        """For each shard in turn, what is wrong with it (naming its path) or None. `full`:
        every byte of every shard, sha256 included; else the blocks `_sampled_blocks` picks."""
        blocks = itertools.repeat(None) if full else self._sampled_blocks()
        for shard, picked in zip(self.shards, blocks):
            yield self._check_shard(shard, picked)

    def verify(self) -> None:
        """Checks every shard in full (reads all the data); raises ValueError naming the bad."""
        problems = list(filter(None, self.check(full=True)))
        if problems:
            raise ValueError("; ".join(problems))

    def _sampled_blocks(self) -> list[np.ndarray]:
        """Per shard, the CHECK_BLOCK-byte blocks an open reads: all of them when the corpus is at
        most OPEN_CHECK_BYTES, else that much in blocks evenly spaced over the whole corpus."""
        itemsize = np.dtype(self.dtype).itemsize
        counts = [-(-s["tokens"] * itemsize // CHECK_BLOCK) for s in self.shards]
        total, budget = sum(counts), self.OPEN_CHECK_BYTES // CHECK_BLOCK
        picks = np.arange(total) if total <= budget else \
            np.unique(np.linspace(0, total - 1, budget).round().astype(np.int64))
        starts = np.cumsum([0] + counts)
        return [picks[(picks >= a) & (picks < b)] - a for a, b in zip(starts, starts[1:])]

    def _check_shard(self, shard: dict, blocks: np.ndarray | None) -> str | None:
        """What is wrong with `shard` (None if nothing): its size, then for `blocks` (None: all,
        and the sha256) their crc32 and token-id range."""
        path = os.path.join(self.path, shard["file"])
        want = shard["tokens"] * np.dtype(self.dtype).itemsize
        size = os.path.getsize(path) if os.path.exists(path) else None
        if size != want:
            return (f"shard {path} is {'missing' if size is None else f'{size:,} bytes'}, the "
                    f"manifest says {want:,} bytes")
        crcs = shard.get("block_crc32")  # absent from manifests written before it existed
        vocab = self.tokenizer.vocab_size
        sha256 = hashlib.sha256()
        with open(path, "rb") as f:
            for i in range(-(-size // CHECK_BLOCK)) if blocks is None else blocks:
                i = int(i)
                f.seek(i * CHECK_BLOCK)
                data = f.read(CHECK_BLOCK)
                where = f"bytes {i * CHECK_BLOCK:,}-{i * CHECK_BLOCK + len(data):,}"
                if crcs and zlib.crc32(data) != int(crcs[8 * i:8 * i + 8], 16):
                    return f"shard {path}: {where} do not match their crc32 in {MANIFEST}"
                if (top := int(np.frombuffer(data, self.dtype).max(initial=0))) >= vocab:
                    return (f"shard {path}: {where} hold token id {top}, outside the "
                            f"tokenizer's vocabulary of {vocab:,}")
                if blocks is None:
                    sha256.update(data)
        if blocks is None and sha256.hexdigest() != shard["sha256"]:
            return f"shard {path} does not match its sha256 in {MANIFEST}"
        return None
