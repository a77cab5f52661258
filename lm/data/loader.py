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

`BertLoader` keeps all of that (the order, the state, the host rows, the thread) and yields
BERT examples instead, a dict of `tokens` [B, L], `token_types` [B, L], `lengths` [B] (and
`nsp_labels` [B] for next-sentence prediction); masking is the train step's business:

- task "mlm": sequence i is `[CLS] stream[i*w : i*w + w] [SEP]`, w = L - 2 (documents packed,
  [SEP] = eod between them), types 0, every row full length; N = tokens // w.
- task "mlm_nsp": sequence i comes from window i of w = L - 3 tokens, cut to its first run of
  2+ tokens between document ends (the text before the window's first eod, else the first
  document part after an eod that has 2+ tokens; else the window without its eods, else the
  window as is), split into A | B at a point drawn by `np.random.default_rng([seed, epoch, i])`.
  With probability `nsp_random_prob` (same generator) B is replaced by a span as long, at a
  random offset, of window j != i cut the same way (shorter if that part is shorter), label 1
  ("random"); else B continues A in the stream, label 0 ("IsNext", the Hugging Face and Google
  convention). Row: `[CLS] A [SEP] B [SEP]` right-padded with pad; types 0 up to the first
  [SEP], 1 for B [SEP], 0 on padding; `lengths` the unpadded length.

Every example is a pure function of (seed, epoch, i): the same on any number of hosts, after a
resume, and with any batch size. `load_state_dict(saved, new_phase=True)` starts a new phase of
a run on the same data (BERT's seq_len 128 -> 512): another seq_len is accepted, from epoch 0.
"""
from __future__ import annotations

import dataclasses
import queue
import threading

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

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
    task = "lm"  # what the batches are for; a saved state without one is "lm"

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int,
                 sharding: NamedSharding | None = None, shuffle: bool = True, prefetch: int = 0,
                 fingerprint: str = "", split: str = ""):
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed
        self.sharding, self.shuffle, self.prefetch = sharding, shuffle, prefetch
        self.fingerprint = fingerprint
        self.num_sequences = self._num_sequences(len(stream))
        if self.num_sequences < batch_size:
            raise ValueError(self._too_small(split, len(stream)))
        if sharding is not None:
            # The global rows this process must supply, from the sharding's own index map.
            idx = sharding.addressable_devices_indices_map((batch_size, seq_len + 1))
            spans = sorted({(s[0].start or 0, s[0].stop or batch_size) for s in idx.values()})
            self.rows = np.concatenate([np.arange(a, b) for a, b in spans])
        else:
            self.rows = np.arange(batch_size)
        self.state = LoaderState()
        self._thread: threading.Thread | None = None

    def _num_sequences(self, tokens: int) -> int:
        return max((tokens - 1) // self.seq_len, 0)

    def _too_small(self, split: str, tokens: int) -> str:
        return _too_small(split, tokens, self.batch_size, self.seq_len)

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

    def load_state_dict(self, saved: dict, new_phase: bool = False) -> None:
        """Resumes at the saved state. `new_phase`: the saved state is from an earlier phase of
        the run on the same data (same seed, shuffle, fingerprint and task) with another seq_len
        (so another number of sequences); this loader starts that phase at epoch 0, position 0."""
        saved_task = saved.get("task", "lm")
        if saved_task != self.task:
            raise ValueError(f"the saved data-loader state is for task {saved_task!r} but this "
                             f"run's is {self.task!r}: its batches are another kind of example")
        keys = ("seed", "shuffle", "fingerprint") if new_phase else \
            ("seed", "seq_len", "num_sequences", "shuffle", "fingerprint")
        for key in keys:
            if saved.get(key) != getattr(self, key):
                raise ValueError(f"the saved data-loader state has {key}={saved.get(key)!r} but "
                                 f"this run has {getattr(self, key)!r}: it was saved for other "
                                 "data or settings, so resuming would not continue the same "
                                 "sequence of batches")
        self.close()
        self.state = LoaderState() if new_phase else \
            LoaderState(int(saved["epoch"]), int(saved["position"]))


BERT_TASKS = ("mlm", "mlm_nsp")
_MIN_BERT_SEQ_LEN = 8


class BertLoader(Loader):
    """BERT examples (see the module docstring) in the order, state and sharding of `Loader`."""

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int,
                 sharding: NamedSharding | None = None, shuffle: bool = True, prefetch: int = 0,
                 fingerprint: str = "", split: str = "", *, task: str = "mlm",
                 cls_id: int | None, sep_id: int | None, pad_id: int | None,
                 eod_id: int | None, nsp_random_prob: float = 0.5):
        if task not in BERT_TASKS:
            raise ValueError(f"BertLoader task {task!r}: expected one of {list(BERT_TASKS)}")
        needed = {"cls": cls_id, "sep": sep_id, "pad": pad_id}
        if task == "mlm_nsp":
            needed["end-of-document"] = eod_id
        if missing := [name for name, i in needed.items() if i is None]:
            raise ValueError(f"task {task!r} needs a tokenizer with {', '.join(missing)} token"
                             f"{'s' * (len(missing) > 1)} (BERT's [CLS], [SEP], [PAD]); this one "
                             "has none: use a WordPiece tokenizer (data.tokenizer 'wordpiece:N' "
                             "or `python -m lm.data.prepare --wordpiece-vocab-size N`)")
        if seq_len < _MIN_BERT_SEQ_LEN:
            raise ValueError(f"seq_len {seq_len} is too short for BERT examples: it must be at "
                             f"least {_MIN_BERT_SEQ_LEN} ([CLS] and [SEP]s around the text)")
        if not 0 <= nsp_random_prob <= 1:
            raise ValueError(f"nsp_random_prob must be in [0, 1], got {nsp_random_prob}")
        self.task = task
        self.cls_id, self.sep_id, self.pad_id, self.eod_id = cls_id, sep_id, pad_id, eod_id
        self.nsp_random_prob = nsp_random_prob
        self.width = seq_len - (2 if task == "mlm" else 3)  # stream tokens per window
        super().__init__(stream, batch_size, seq_len, seed, sharding, shuffle, prefetch,
                         fingerprint, split)
        if task == "mlm_nsp" and self.num_sequences < 2:
            raise ValueError(f"the {split + ' ' if split else ''}split holds one window of "
                             f"{self.width} tokens: next-sentence prediction needs two or more "
                             "(a random B comes from another window)")

    def _num_sequences(self, tokens: int) -> int:
        return tokens // self.width

    def _too_small(self, split: str, tokens: int) -> str:
        n, extra = tokens // self.width, self.seq_len - self.width
        message = (f"the {split + ' ' if split else ''}split holds {tokens:,} tokens: {n} "
                   f"window{'s' * (n != 1)} of {self.width} (seq_len {self.seq_len} less "
                   f"{extra} special tokens), fewer than one batch of {self.batch_size}")
        fits = [f"batch_size <= {n}"] * (n > 0)
        if (most := tokens // self.batch_size + extra) >= _MIN_BERT_SEQ_LEN:
            fits.append(f"seq_len <= {most}")
        if not fits:
            return message + "; no batch of any shape fits: it needs more documents"
        return message + "; a " + " or ".join(fits) + " would fit"

    # -- pure functions of the state ----------------------------------------------------------

    def global_batch(self, state: LoaderState | None = None,
                     rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Rows (default: all) of the batch at `state` (default: the current one) as host int32
        arrays: tokens and token_types [rows, seq_len], lengths [rows], nsp_labels [rows]
        (mlm_nsp only)."""
        state = self._start(self.state if state is None else state)
        ids = self.sequence_ids(state)
        if rows is not None:
            ids = ids[rows]
        if self.task == "mlm":
            return self._mlm(ids)
        return self._pairs(ids, state.epoch)

    def _mlm(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        tokens = np.empty((len(ids), self.seq_len), np.int32)
        tokens[:, 0], tokens[:, -1] = self.cls_id, self.sep_id
        tokens[:, 1:-1] = self.stream.windows(ids * self.width, self.width)
        return {"tokens": tokens, "token_types": np.zeros_like(tokens),
                "lengths": np.full(len(ids), self.seq_len, np.int32)}

    def _segment(self, window: np.ndarray) -> np.ndarray:
        """The window's first run of 2+ tokens between document ends (module docstring)."""
        ends = np.flatnonzero(window == self.eod_id)
        if not len(ends):
            return window
        bounds = [-1, *ends.tolist(), len(window)]
        for a, b in zip(bounds, bounds[1:]):
            if b - a > 2:
                return window[a + 1:b]
        rest = window[window != self.eod_id]  # documents of a single token (pathological)
        return rest if len(rest) >= 2 else window

    def _pairs(self, ids: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        rows, n = len(ids), self.num_sequences
        rngs = [np.random.default_rng([self.seed, epoch, int(i)]) for i in ids]
        segments = [self._segment(x) for x in self.stream.windows(ids * self.width, self.width)]
        # Draws per row, in this order: the cut, random-or-next, the other window, its offset.
        cuts = [int(rng.integers(1, len(seg))) for rng, seg in zip(rngs, segments)]
        labels = np.array([rng.random() < self.nsp_random_prob for rng in rngs], np.int32)
        random_rows = np.flatnonzero(labels)
        others = np.array([int(rngs[r].integers(0, n - 1)) for r in random_rows], np.int64)
        others += others >= ids[random_rows]  # never the row's own window
        other_windows = self.stream.windows(others * self.width, self.width) if len(others) \
            else np.zeros((0, self.width), np.int32)
        second = [seg[k:] for seg, k in zip(segments, cuts)]
        for r, window in zip(random_rows, other_windows):
            other, want = self._segment(window), len(second[r])
            start = int(rngs[r].integers(0, max(len(other) - want, 0) + 1))
            second[r] = other[start:start + want]
        tokens = np.full((rows, self.seq_len), self.pad_id, np.int32)
        types = np.zeros((rows, self.seq_len), np.int32)
        lengths = np.empty(rows, np.int32)
        for r, (seg, k, b) in enumerate(zip(segments, cuts, second)):
            a_end, b_end = k + 2, k + 3 + len(b)  # [CLS] A [SEP] | B [SEP]
            tokens[r, 0], tokens[r, 1:k + 1], tokens[r, k + 1] = self.cls_id, seg[:k], self.sep_id
            tokens[r, a_end:b_end - 1], tokens[r, b_end - 1] = b, self.sep_id
            types[r, a_end:b_end] = 1
            lengths[r] = b_end
        return {"tokens": tokens, "token_types": types, "lengths": lengths, "nsp_labels": labels}

    def batch_at(self, state: LoaderState) -> dict:
        """The batch at `state` as global jax.Arrays (2-D leaves with the loader's sharding,
        1-D ones over the same batch axes); this process builds only its own rows."""
        local = self.global_batch(state, self.rows)
        if self.sharding is None:
            return {k: jax.numpy.asarray(v) for k, v in local.items()}
        spec = self.sharding.spec
        rows = NamedSharding(self.sharding.mesh, PartitionSpec(spec[0] if len(spec) else None))
        return {k: jax.make_array_from_process_local_data(
                    self.sharding if v.ndim == 2 else rows, v,
                    (self.batch_size, self.seq_len)[:v.ndim]) for k, v in local.items()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "task": self.task}
