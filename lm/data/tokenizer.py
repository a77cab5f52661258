"""Byte-level tokenizer: ids 0-255 are bytes, then the special tokens.

Any byte string round-trips, so it needs no training and never meets an unknown character; the
data issue adds trained BPE tokenizers behind the same interface (`encode`, `decode`,
`vocab_size`, `eod_id`, `pad_id`).
"""
from __future__ import annotations

import numpy as np


class ByteTokenizer:
    eod_id = 256  # end of document
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """Text for `ids`; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids).reshape(-1)
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")
