"""Deterministic batches of token windows, sharded over hosts.

Batch `step` is a pure function of (seed, step): its rows are windows at offsets drawn from a
generator seeded with both. Resuming at step s therefore yields exactly the batches an unbroken
run would have seen, on any number of hosts: each process builds only its own rows of the global
batch and `jax.make_array_from_process_local_data` assembles the global array.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding


class Loader:
    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 sharding: NamedSharding | None = None):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"corpus has {len(tokens)} tokens, fewer than seq_len + 2 = "
                             f"{seq_len + 2}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.sharding = sharding
        if sharding is not None:
            # The global rows this process must supply, from the sharding's own index map.
            idx = sharding.addressable_devices_indices_map((batch_size, seq_len + 1))
            rows = sorted({(s[0].start or 0, s[0].stop or batch_size) for s in idx.values()})
            self.rows = np.concatenate([np.arange(a, b) for a, b in rows])
        else:
            self.rows = np.arange(batch_size)

    def global_batch(self, step: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Rows (default: all) of batch `step` as a host array [rows, seq_len + 1]: the inputs
        and, shifted by one, the targets."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        if rows is not None:
            starts = starts[rows]
        return np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int32)

    def batch(self, step: int) -> jax.Array:
        """Batch `step` as a global jax.Array; this process reads only its own rows."""
        rows = self.global_batch(step, self.rows)
        if self.sharding is None:
            return jax.numpy.asarray(rows)
        return jax.make_array_from_process_local_data(self.sharding, rows,
                                                      (self.batch_size, self.seq_len + 1))
