"""Deterministic, resumable batches of packed sequences, sharded over hosts, prefetched.

The split's token stream (documents already separated by the end-of-document id) is cut into
`N = (tokens - 1) // seq_len` sequences: sequence i is tokens [i*L, i*L + L + 1), the inputs and,
shifted by one, the targets. Each epoch visits them in a seeded pseudo-random order (a Feistel
permutation of [0, N): O(1) memory for any corpus size, any index computed on its own), and a
batch is the next `batch_size` of that order. The loader's whole state is (epoch, position), so

- the global batch is the same on 1 host or 64, and each process reads only the rows its devices
  hold (`jax.make_array_from_process_local_data` assembles the global array);
- a checkpointed state resumes exactly where the run stopped, even with another batch size.

A background thread builds the next `prefetch` batches (reads and device transfer) while the
train step runs.
"""
from __future__ import annotations

import dataclasses
import queue
import threading

import jax
import numpy as np
from jax.sharding import NamedSharding

from lm.data.dataset import TokenStream

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def permutation(indices: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Positions `indices` of a seeded pseudo-random permutation of [0, n).

    A 4-round Feistel network on the smallest even-bit domain >= n is a bijection of that domain;
    walking the cycle until the value falls below n restricts it to a bijection of [0, n)."""
    half = np.uint64(max(1, ((n - 1).bit_length() + 1) // 2))
    mask = (np.uint64(1) << half) - np.uint64(1)
    keys = np.random.default_rng([seed, epoch]).integers(0, 2**63, 4, dtype=np.uint64)
    x = np.asarray(indices, np.uint64).copy()
    todo = np.ones(x.shape, bool)
    while todo.any():
        left, right = x[todo] >> half, x[todo] & mask
        for key in keys:
            z = right ^ key
            z = (z ^ (z >> np.uint64(30))) * _M1
            z = (z ^ (z >> np.uint64(27))) * _M2
            left, right = right, left ^ ((z ^ (z >> np.uint64(31))) & mask)
        x[todo] = (left << half) | right
        todo &= x >= np.uint64(n)
    return x.astype(np.int64)


def _too_small(split: str, tokens: int, batch_size: int, seq_len: int) -> str:
    """Why a split of `tokens` tokens holds no batch of this shape, and which shapes would fit."""
    sequences = max((tokens - 1) // seq_len, 0)
    message = (f"the {split + ' ' if split else ''}split holds {tokens:,} tokens: {sequences} "
               f"sequence{'s' * (sequences != 1)} of seq_len {seq_len}, fewer than one batch of "
               f"{batch_size}")
    fits = [f"batch_size <= {sequences}"] * (sequences > 0)
    fits += [f"seq_len <= {(tokens - 1) // batch_size}"] * (tokens > batch_size)
    if not fits:
        return message + "; no batch of any shape fits: it needs more documents"
    return message + "; a " + " or ".join(fits) + " would fit"


@dataclasses.dataclass(frozen=True)
class LoaderState:
    epoch: int = 0
    position: int = 0  # sequences of this epoch already consumed


class Loader:
    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int,
                 sharding: NamedSharding | None = None, shuffle: bool = True, prefetch: int = 0,
                 fingerprint: str = "", split: str = ""):
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed
        self.sharding, self.shuffle, self.prefetch = sharding, shuffle, prefetch
        self.fingerprint = fingerprint
        self.num_sequences = max((len(stream) - 1) // seq_len, 0)
        if self.num_sequences < batch_size:
            raise ValueError(_too_small(split, len(stream), batch_size, seq_len))
        if sharding is not None:
            # The global rows this process must supply, from the sharding's own index map.
            idx = sharding.addressable_devices_indices_map((batch_size, seq_len + 1))
            spans = sorted({(s[0].start or 0, s[0].stop or batch_size) for s in idx.values()})
            self.rows = np.concatenate([np.arange(a, b) for a, b in spans])
        else:
            self.rows = np.arange(batch_size)
        self.state = LoaderState()
        self._thread: threading.Thread | None = None

    # -- pure functions of the state ----------------------------------------------------------

    def _start(self, state: LoaderState) -> LoaderState:
        """Where the batch at `state` really starts: an incomplete tail rolls to the next epoch."""
        if state.position + self.batch_size > self.num_sequences:
            return LoaderState(state.epoch + 1, 0)
        return state

    def sequence_ids(self, state: LoaderState) -> np.ndarray:
        """The global sequence indices of the batch at `state` (all rows)."""
        state = self._start(state)
        positions = np.arange(state.position, state.position + self.batch_size)
        if not self.shuffle:
            return positions
        return permutation(positions, self.num_sequences, self.seed, state.epoch)

    def global_batch(self, state: LoaderState | None = None,
                     rows: np.ndarray | None = None) -> np.ndarray:
        """Rows (default: all) of the batch at `state` (default: the current one) as a host array
        [rows, seq_len + 1] of int32."""
        ids = self.sequence_ids(self.state if state is None else state)
        if rows is not None:
            ids = ids[rows]
        return self.stream.windows(ids * self.seq_len, self.seq_len + 1)

    def batch_at(self, state: LoaderState):
        """The batch at `state` as a global jax.Array; this process reads only its own rows."""
        local = self.global_batch(state, self.rows)
        if self.sharding is None:
            return jax.numpy.asarray(local)
        return jax.make_array_from_process_local_data(self.sharding, local,
                                                      (self.batch_size, self.seq_len + 1))

    def next_state(self, state: LoaderState) -> LoaderState:
        state = self._start(state)
        return LoaderState(state.epoch, state.position + self.batch_size)

    # -- iteration ----------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self):
        if not self.prefetch:
            batch = self.batch_at(self.state)
            self.state = self.next_state(self.state)
            return batch
        if self._thread is None:
            self._queue: queue.Queue = queue.Queue(self.prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._produce, args=(self.state,),
                                            daemon=True, name="lm-loader")
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        self.state, batch = item
        return batch

    def _produce(self, state: LoaderState) -> None:
        try:
            while not self._stop.is_set():
                item = (self.next_state(state), self.batch_at(state))
                self._put(item)
                state = item[0]
        except BaseException as e:  # noqa: BLE001  (handed to the consumer)
            self._put(e)

    def _put(self, item) -> None:
        """Queues `item`, giving up when `close()` asks (never blocks it)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def close(self) -> None:
        """Stops the prefetch thread; the next batch is the one after the last returned."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The state to save with a checkpoint: the next batch to return, and what it means."""
        return {"epoch": self.state.epoch, "position": self.state.position, "seed": self.seed,
                "seq_len": self.seq_len, "num_sequences": self.num_sequences,
                "shuffle": self.shuffle, "fingerprint": self.fingerprint}

    def load_state_dict(self, saved: dict) -> None:
        for key in ("seed", "seq_len", "num_sequences", "shuffle", "fingerprint"):
            if saved.get(key) != getattr(self, key):
                raise ValueError(f"the saved data-loader state has {key}={saved.get(key)!r} but "
                                 f"this run has {getattr(self, key)!r}: it was saved for other "
                                 "data or settings, so resuming would not continue the same "
                                 "sequence of batches")
        self.close()
        self.state = LoaderState(int(saved["epoch"]), int(saved["position"]))
