"""`python -m lm.data.prepare --input PATH_OR_GLOB... --out DIR [--tokenizer FILE | --vocab-size N |
--wordpiece-vocab-size N] [--workers N] [--val-fraction F] [--text-field NAME]
[--plain-text-docs MODE] [--max-line-bytes N]`

Turns text into token shards that the loader memory-maps:

    DIR/manifest.json         shards, token and document counts, dtype, tokenizer, checksums,
                              bad-input counts, skipped files, the inputs and options (their
                              fingerprint)
    DIR/tokenizer.json        the BPE or WordPiece tokenizer (absent for the byte tokenizer)
    DIR/{train,val}-NNNNN.bin flat little-endian uint16 (vocab <= 65,536) or uint32 token ids;
                              every document is followed by the end-of-document id

Inputs: plain text files, `.jsonl` / `.ndjson` (one JSON object per line, the document in
`--text-field`), and `.gz` versions of both; directories are walked (hidden and cache
directories and hidden files are not) and globs expanded. A plain text file is one document, or
one per blank-line-separated paragraph (`--plain-text-docs`; the default `auto` splits a corpus
of a single plain text file, which would otherwise have no validation split). Files that look
binary (a NUL byte, or more than 1% of 64 KiB invalid UTF-8, in their first 64 KiB) are skipped.
The work is cut into units of whole lines (whole paragraphs when splitting; ~1-64 MB of raw
text, from the corpus size alone) that worker processes tokenize in parallel (with a given
tokenizer, or one trained first on a sample of the train split: byte-level BPE for
`--vocab-size`, BERT WordPiece for `--wordpiece-vocab-size`, whose eod is [SEP]); unit i writes
shard i, so the output does not depend on the number of workers. Documents go to the validation
split by a hash of (file, byte offset), so the split is stable across runs and machines; when
that hash leaves a corpus of two or more documents with an empty split, its first document is
moved there (decided before any unit starts).

Bad input never stops the run: invalid UTF-8 (replaced with U+FFFD), empty documents, malformed
JSON lines, missing fields and JSON lines over `--max-line-bytes` (never held whole) are counted
in the manifest and reported on stderr with file and line; skipped files are listed with the
reason. A file that cannot be read at all is an error before any work starts.

Re-running: a finished DIR with the same inputs and options is left as it is; an unfinished one
(killed mid-way) resumes from the units already written; anything else is refused, so two
corpora are never mixed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import types
import zlib
from collections import Counter
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from lm.data import tokenizer as tokenizers

FORMAT = "lm.tokens/1"
MANIFEST, PLAN, UNITS, LOCK = "manifest.json", "plan.json", "units", ".lock"
PROBLEMS = ("undecodable", "empty", "malformed_json", "missing_field", "long_line")
PLAIN_TEXT_DOCS = ("auto", "file", "paragraphs")
_JSONL = (".jsonl", ".ndjson")
_MB = 1 << 20
DEFAULT_MAX_LINE_BYTES = 8 * _MB
_DEFAULT_SAMPLE_BYTES = 1 << 30  # of the train split, to train a tokenizer on
CHECK_BLOCK = _MB  # shards carry a crc32 per block of this many bytes (see lm.data.dataset)
_SKIP_DIRS = {"__pycache__", "node_modules"}  # besides hidden (dot) directories
_SNIFF_BYTES = 64 << 10  # the prefix of each input that decides whether it looks binary
_MAX_INVALID = _SNIFF_BYTES // 100  # bytes of invalid UTF-8 in it, beyond which it does
_LINE_END, _BLANK_LINE = re.compile(b"\n"), re.compile(b"\n\r?\n")  # where units may be cut
_ENCODE_CHUNK = _MB  # long documents are encoded in pieces of ~1 MB cut at line ends
_SHOWN_PROBLEMS = 20
_FLUSH_CHARS = 8 * _MB  # a worker encodes and writes its shard in batches of this much text


class PrepareError(Exception):
    """A problem with the command or its inputs that stops preparation before any damage."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of one input file (compressed files are always whole)."""
    path: str
    name: str  # path relative to the inputs' common directory: keys the split and the reports
    jsonl: bool
    gz: bool
    start: int
    end: int
    size: int  # on disk
    paragraphs: bool = False  # plain text, one document per blank-line-separated paragraph


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How documents are read and split: the same in every worker and in the parent."""
    text_field: str = "text"
    val_fraction: float = 0.01
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    forced: tuple[str, int, str] | None = None  # (file name, offset, split): `_forced_split`

    def split_of(self, name: str, offset: int) -> str:
        if self.forced is not None and self.forced[:2] == (name, offset):
            return self.forced[2]
        key = zlib.crc32(f"{name}:{offset}".encode())
        return "val" if key < self.val_fraction * 2**32 else "train"


@dataclasses.dataclass
class Doc:
    text: str
    split: str
    ends: bool  # the document ends in this piece (plain text files span pieces)
    offset: int = 0  # where the document starts in its file: its key for the split


# ---------------------------------------------------------------------------------------------
# Inputs and units


def expand_inputs(patterns: list[str], exclude: str | None = None
                  ) -> tuple[list[str], list[dict]]:
    """Files named by paths, directories (walked) and globs, in order, without duplicates and
    without anything under `exclude` (the output directory, when it sits among the inputs); and
    what was skipped, as {"file", "reason"}: hidden files and directories and caches met while
    walking (not entered), and files that look binary."""
    files: list[str] = []
    skipped: list[dict] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PrepareError(f"--input {pattern!r} matches no files")
        elif os.path.isdir(pattern):
            matches = _walk(pattern, skipped)
            if not matches:
                raise PrepareError(f"--input {pattern!r} is a directory with no files")
        elif os.path.exists(pattern):
            matches = [pattern]
        else:
            raise PrepareError(f"--input {pattern!r} does not exist")
        files += matches
    skip = os.path.realpath(exclude) + os.sep if exclude else None
    seen, unique = set(), []
    for f in files:
        real = os.path.realpath(f)
        if skip and real.startswith(skip):
            continue
        if real not in seen:
            seen.add(real)
            unique.append(real)
    skipped = [s for s in skipped if not (skip and s["file"].startswith(skip))]
    texts = []
    for f in unique:
        if not os.path.isfile(f):
            raise PrepareError(f"input {f} is not a regular file")
        if reason := _binary_reason(f):
            skipped.append({"file": f, "reason": reason})
        else:
            texts.append(f)
    return texts, skipped


def _walk(directory: str, skipped: list[dict]) -> list[str]:
    """The files under `directory`, sorted, leaving out (and recording in `skipped`) hidden
    files and hidden or cache directories (.git, .venv, __pycache__, node_modules, ...)."""
    files = []
    for d, dirs, fs in os.walk(directory):
        for name in sorted(dirs):
            if name.startswith(".") or name in _SKIP_DIRS:
                dirs.remove(name)
                skipped.append({"file": os.path.realpath(os.path.join(d, name)) + os.sep,
                                "reason": "hidden or cache directory (not walked)"})
        for name in fs:
            if name.startswith("."):
                skipped.append({"file": os.path.realpath(os.path.join(d, name)),
                                "reason": "hidden file"})
            else:
                files.append(os.path.join(d, name))
    return sorted(files)


def _binary_reason(path: str) -> str | None:
    """Why `path` looks binary, or None: a NUL byte, or more than _MAX_INVALID bytes (1% of
    64 KiB) of invalid UTF-8, in its first 64 KiB (decompressed, for .gz). Text in another
    encoding with a few such bytes (a Latin-1 name) passes, U+FFFD replacing them."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
        if path.endswith(".gz") and magic and magic != b"\x1f\x8b":
            raise PrepareError(f"input {path} ends in .gz but is not gzip data")
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as e:
        raise PrepareError(f"input {path} cannot be read: {getattr(e, 'strerror', None) or e}"
                           ) from None
    if (at := head.find(b"\0")) >= 0:
        return f"binary: NUL byte at offset {at}"
    invalid = len(head) - len(head.decode("utf-8", "ignore").encode())
    if invalid > _MAX_INVALID:
        return f"binary: {invalid:,} bytes of invalid UTF-8 in the first {len(head):,}"
    return None


def default_unit_bytes(total: int) -> int:
    """~256 units for the corpus, each 1-64 MB of raw text."""
    return int(min(max(total // 256, _MB), 64 * _MB))


def plan_units(files: list[str], unit_bytes: int, paragraphs: bool = False) -> list[list[Piece]]:
    """Groups small files and cuts large uncompressed ones into ~unit_bytes units, at line ends
    (at blank lines for plain text read as paragraphs, so no document spans two units)."""
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    units: list[list[Piece]] = []
    current: list[Piece] = []
    current_bytes = 0
    for path in files:
        size = os.path.getsize(path)
        base = path[:-3] if path.endswith(".gz") else path
        jsonl = base.endswith(_JSONL)
        piece = Piece(path, os.path.relpath(path, root), jsonl, path.endswith(".gz"), 0, size,
                      size, paragraphs=paragraphs and not jsonl)
        if piece.gz or size <= unit_bytes:
            current.append(piece)
            current_bytes += size
            if current_bytes >= unit_bytes:
                units.append(current)
                current, current_bytes = [], 0
            continue
        if current:
            units.append(current)
            current, current_bytes = [], 0
        bounds = _cut_points(path, size, unit_bytes, _BLANK_LINE if piece.paragraphs else _LINE_END)
        units += [[dataclasses.replace(piece, start=a, end=b)] for a, b in zip(bounds, bounds[1:])]
    if current:
        units.append(current)
    return units


def _cut_points(path: str, size: int, unit_bytes: int, end: re.Pattern) -> list[int]:
    """0, the offset just past the first match of `end` at or after every ~unit_bytes, size."""
    bounds = [0]
    with open(path, "rb") as f:
        pos = unit_bytes
        while pos < size and (cut := _find_after(f, pos, end)) is not None and cut < size:
            bounds.append(cut)
            pos = cut + unit_bytes
    return bounds + [size]


def _find_after(f, pos: int, pattern: re.Pattern) -> int | None:
    """The offset just past the first match of `pattern` (at most 3 bytes) at or after `pos`."""
    f.seek(pos)
    tail = b""  # the end of the previous block, where a match may begin
    while block := f.read(_MB):
        if m := pattern.search(tail + block):
            return pos - len(tail) + m.end()
        pos += len(block)
        tail = block[-2:]
    return None


# ---------------------------------------------------------------------------------------------
# Reading documents (workers, and the parent when it trains a tokenizer)


def _blocks(piece: Piece, max_line_bytes: int | None = None) -> Iterator[bytes | int]:
    """The piece's bytes in ~1 MB blocks that end at a line end (streamed: a compressed file of
    any size never sits in memory whole). A JSONL line longer than `max_line_bytes` is never
    held whole: it is read past and comes as an int, the bytes skipped (its line end included)."""
    try:
        with (gzip.open if piece.gz else open)(piece.path, "rb") as f:
            remaining = None if piece.gz else piece.end - piece.start
            if not piece.gz:
                f.seek(piece.start)
            carry: list[bytes] = []  # the start of a line longer than a block
            carry_bytes = 0
            skipping = None  # bytes so far of a JSONL line too long to hold
            while block := f.read(_MB if remaining is None else min(_MB, remaining)):
                if remaining is not None:
                    remaining -= len(block)
                if skipping is not None:
                    if (end := block.find(b"\n")) < 0:
                        skipping += len(block)
                        continue
                    yield skipping + end + 1
                    skipping, block = None, block[end + 1:]
                cut = block.rfind(b"\n") + 1
                if not cut and not piece.jsonl and carry_bytes + len(block) >= _MB:
                    cut = _char_boundary(block)  # plain text need not be cut at line ends
                if not cut:
                    if piece.jsonl and carry_bytes + len(block) > max_line_bytes:
                        skipping, carry, carry_bytes = carry_bytes + len(block), [], 0
                    else:
                        carry.append(block)
                        carry_bytes += len(block)
                    continue
                yield b"".join(carry) + block[:cut]
                carry, carry_bytes = [block[cut:]], len(block) - cut
            if skipping is not None:
                yield skipping
            if carry_bytes:
                yield b"".join(carry)
    except (OSError, EOFError, zlib.error) as e:
        raise PrepareError(f"input {piece.path} cannot be read: {e}") from None


def _char_boundary(block: bytes) -> int:
    """The last offset in `block` at which a UTF-8 character starts (0 if none)."""
    i = len(block)
    while i > max(len(block) - 4, 0) and block[i - 1] & 0xC0 == 0x80:
        i -= 1
    if i > 0 and block[i - 1] >= 0xC0:  # a lead byte whose continuation is in the next block
        i -= 1
    return i


def read_documents(piece: Piece, options: ReadOptions, counts: Counter,
                   problems: list[dict]) -> Iterator[Doc]:
    """The documents of `piece` (a long plain-text document comes in ~1 MB parts, the last with
    `ends`); bad input is counted in `counts` and described in `problems` (line numbers relative
    to the piece's first line)."""
    def problem(kind: str, line: int, message: str) -> None:
        counts[kind] += 1
        if len(problems) < _SHOWN_PROBLEMS:
            problems.append({"file": piece.name, "piece_start": piece.start, "line": line,
                             "problem": kind, "message": message})

    read = _jsonl_documents if piece.jsonl else \
        _paragraph_documents if piece.paragraphs else _file_document
    yield from read(piece, options, counts, problem)


def _file_document(piece: Piece, options: ReadOptions, counts: Counter, problem
                   ) -> Iterator[Doc]:
    """The whole file as one document (a piece of a large file holds a part of it)."""
    split, pending, seen_text, lines_before = options.split_of(piece.name, 0), [], False, 0
    for block in _blocks(piece):
        counts["bytes"] += len(block)
        text = _decode(block, lambda pos, why: problem(
            "undecodable", lines_before + block.count(b"\n", 0, pos) + 1, why))
        lines_before += block.count(b"\n")
        seen_text |= bool(text.strip())
        if seen_text:  # hold whitespace back until the document proves non-empty
            yield from (Doc(t, split, ends=False) for t in pending)
            pending = []
        pending.append(text)
    if not seen_text and piece.start == 0 and piece.end == piece.size:
        problem("empty", 1, "empty document (skipped)")
        return
    for i, text in enumerate(pending):
        yield Doc(text, split, ends=i == len(pending) - 1 and piece.end == piece.size)


_LINE = re.compile(b"[^\n]*\n|[^\n]+")


def _paragraph_documents(piece: Piece, options: ReadOptions, counts: Counter, problem
                         ) -> Iterator[Doc]:
    """One document per run of non-blank lines (a blank line holds only whitespace and ends the
    document; blank lines are dropped); a long paragraph comes in parts, one per block."""
    offset, lines_before = piece.start, 0  # of the current line
    start, first_line, parts = None, 0, []  # the open paragraph: offset, line of `parts`, bytes
    held, held_at = [], 0  # between paragraphs: the blank start of a line longer than a block
    found = False

    def part(ends: bool) -> Doc:
        data = b"".join(parts)
        text = _decode(data, lambda pos, why: problem(
            "undecodable", first_line + data.count(b"\n", 0, pos), why))
        return Doc(text, options.split_of(piece.name, start), ends, start)

    for block in _blocks(piece):
        counts["bytes"] += len(block)
        for line in _LINE.findall(block):
            blank, complete = not line.strip(), line.endswith(b"\n")
            if blank and complete:
                if start is not None:
                    yield part(ends=True)
                    start, parts = None, []
                held = []
            elif blank and start is None:
                held_at = held_at if held else offset
                held.append(line)
            else:
                if start is None:
                    start, first_line, found = held_at if held else offset, lines_before + 1, True
                    parts, held = held, []
                parts.append(line)
            offset += len(line)
            lines_before += complete
        if parts:  # bounded memory: a paragraph longer than a block goes out in parts
            yield part(ends=False)
            parts, first_line = [], lines_before + 1
    if start is not None:
        yield part(ends=True)
    elif not found and piece.start == 0 and piece.end == piece.size:
        problem("empty", 1, "empty document (skipped)")


def _jsonl_documents(piece: Piece, options: ReadOptions, counts: Counter, problem
                     ) -> Iterator[Doc]:
    """One document per JSON line, its text in `options.text_field`."""
    offset, lines_before = piece.start, 0  # of the current block

    def too_long(line: int) -> None:
        problem("long_line", line, f"line of more than {options.max_line_bytes:,} bytes "
                "(--max-line-bytes; skipped)")

    for block in _blocks(piece, options.max_line_bytes):
        if isinstance(block, int):  # a line too long to hold, read past by _blocks
            counts["bytes"] += block
            too_long(lines_before + 1)
            offset, lines_before = offset + block, lines_before + 1
            continue
        counts["bytes"] += len(block)
        lines = block.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        for lineno, line in enumerate(lines, lines_before + 1):
            line_offset, offset = offset, offset + len(line) + 1
            if len(line) > options.max_line_bytes:
                too_long(lineno)
                continue
            if not line.strip():
                continue
            raw = _decode(line, lambda pos, why: problem("undecodable", lineno, why))
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError) as e:
                why = e if isinstance(e, ValueError) else "nested too deeply"
                problem("malformed_json", lineno, f"malformed JSON: {why} (skipped)")
                continue
            text = obj.get(options.text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                what = "is not a string" if isinstance(obj, dict) and options.text_field in obj \
                    else "missing"
                problem("missing_field", lineno, f"field {options.text_field!r} {what} (skipped)")
                continue
            if not text.strip():
                problem("empty", lineno, "empty document (skipped)")
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON can spell lone surrogates ("\\ud83d")
                problem("undecodable", lineno, f"unpaired surrogate at character {e.start} "
                        "(replaced with U+FFFD)")
                text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            yield Doc(text, options.split_of(piece.name, line_offset), True, line_offset)
        lines_before += len(lines)


def _decode(data: bytes, report) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        report(e.start, f"invalid UTF-8 at byte {e.start} (replaced with U+FFFD)")
        return data.decode("utf-8", errors="replace")


def _encode_pieces(text: str) -> list[str]:
    """Cuts a long text into pieces of 1-2 M characters, at line ends where there are any
    (bounded tokenizer memory)."""
    if len(text) <= _ENCODE_CHUNK:
        return [text]
    out, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + _ENCODE_CHUNK, start + 2 * _ENCODE_CHUNK)
        cut = min(start + 2 * _ENCODE_CHUNK, len(text)) if cut < 0 else cut + 1
        out.append(text[start:cut])
        start = cut
    return out


# ---------------------------------------------------------------------------------------------
# Workers

_worker_tokenizer = None


def _init_worker(spec: dict, directory: str, single_threaded: bool) -> None:
    global _worker_tokenizer
    if single_threaded:  # one process per core already; the Rust thread pool would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizers.load(spec, directory)


class Checksums:
    """A shard's sha256 (read in full by `python -m lm.data.verify`) and the crc32 of each
    CHECK_BLOCK bytes of it as 8 hex digits (a sample of them is read at every open), from data
    given in pieces of any size."""

    def __init__(self):
        self.sha256, self.crcs, self.crc, self.filled = hashlib.sha256(), [], 0, 0

    def update(self, data) -> None:
        self.sha256.update(data)
        view = memoryview(data).cast("B")
        while view:
            n = min(len(view), CHECK_BLOCK - self.filled)
            self.crc, self.filled, view = zlib.crc32(view[:n], self.crc), self.filled + n, view[n:]
            if self.filled == CHECK_BLOCK:
                self.crcs.append(self.crc)
                self.crc = self.filled = 0

    def fields(self) -> dict:
        crcs = self.crcs + [self.crc] * bool(self.filled)
        return {"sha256": self.sha256.hexdigest(),
                "block_crc32": "".join(f"{c:08x}" for c in crcs)}


class _ShardWriter:
    """Appends token ids to `name` (under a temporary name until `finish`), hashing as it goes."""

    def __init__(self, out: str, name: str, dtype: str):
        self.path, self.name, self.dtype = os.path.join(out, name), name, dtype
        self.file, self.hash, self.tokens, self.documents = None, Checksums(), 0, 0
        self.texts: list[str] = []
        self.ends: list[bool] = []
        self.chars = 0

    def add(self, doc: Doc, tok) -> None:
        parts = _encode_pieces(doc.text)
        self.texts += parts
        self.ends += [False] * (len(parts) - 1) + [doc.ends]
        self.documents += doc.ends
        self.chars += len(doc.text)
        if self.chars >= _FLUSH_CHARS:
            self.flush(tok)

    def flush(self, tok) -> None:
        if not self.texts:
            return
        eod = np.array([tok.eod_id], np.int32)
        parts = []
        for ids, end in zip(tok.encode_batch(self.texts), self.ends):
            parts += [ids, eod] if end else [ids]
        data = np.concatenate(parts).astype(self.dtype)
        if self.file is None:
            self.file = open(f"{self.path}.tmp{os.getpid()}", "wb")
        self.file.write(data.data)
        self.hash.update(data.data)
        self.tokens += data.size
        self.texts, self.ends, self.chars = [], [], 0

    def finish(self, tok) -> dict | None:
        self.flush(tok)
        if self.file is None:
            return None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.file.name, self.path)
        return {"file": self.name, "tokens": int(self.tokens), "documents": int(self.documents),
                **self.hash.fields()}


def _run_unit(task: tuple) -> dict:
    index, unit, out, dtype, options = task
    tok = _worker_tokenizer
    counts: Counter = Counter()
    problems: list[dict] = []
    writers = {s: _ShardWriter(out, f"{s}-{index:05d}.bin", dtype) for s in ("train", "val")}
    for piece in unit:
        for doc in read_documents(piece, options, counts, problems):
            writers[doc.split].add(doc, tok)
    shards = {s: w.finish(tok) for s, w in writers.items()}
    return {"index": index, "bytes": counts["bytes"],
            "disk_bytes": sum(p.size if p.gz else p.end - p.start for p in unit),
            "problems": {k: counts[k] for k in PROBLEMS}, "examples": problems[:_SHOWN_PROBLEMS],
            "shards": {s: shard for s, shard in shards.items() if shard}}


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    _write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# The driver


def prepare(inputs: list[str], out: str, *, tokenizer: str | None = None,
            vocab_size: int | None = None, wordpiece_vocab_size: int | None = None,
            workers: int | None = None,
            val_fraction: float = 0.01, text_field: str = "text", unit_bytes: int | None = None,
            tokenizer_sample_bytes: int = _DEFAULT_SAMPLE_BYTES, plain_text_docs: str = "auto",
            max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, progress: bool = True,
            log=sys.stderr) -> dict:
    """Prepares `inputs` into `out`; returns the manifest. See the module docstring."""
    given = [flag for flag, value in (("--tokenizer", tokenizer), ("--vocab-size", vocab_size),
                                      ("--wordpiece-vocab-size", wordpiece_vocab_size))
             if value is not None]
    if len(given) > 1:
        raise PrepareError(f"give one of --tokenizer, --vocab-size (byte-level BPE) or "
                           f"--wordpiece-vocab-size (WordPiece), not {' and '.join(given)}")
    least = tokenizers.MIN_WORDPIECE_VOCAB
    if wordpiece_vocab_size is not None and wordpiece_vocab_size < least:
        raise PrepareError(f"--wordpiece-vocab-size {wordpiece_vocab_size} is too small: it must "
                           f"be at least {least} (5 special tokens and an alphabet); BERT uses "
                           "30,522")
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if plain_text_docs not in PLAIN_TEXT_DOCS:
        raise PrepareError(f"--plain-text-docs must be one of {PLAIN_TEXT_DOCS}, got "
                           f"{plain_text_docs!r}")
    if max_line_bytes < 1:
        raise PrepareError(f"--max-line-bytes must be >= 1, got {max_line_bytes}")
    workers = workers or len(os.sched_getaffinity(0))
    if workers < 1:
        raise PrepareError(f"--workers must be >= 1, got {workers}")
    start_time = time.perf_counter()
    files, skipped = expand_inputs(inputs, exclude=out)
    if not files:
        why = f" (all {len(skipped)} skipped: {skipped[0]['reason']}, ...)" if skipped else ""
        raise PrepareError(f"--input {inputs} names no text files outside --out {out}{why}")
    total = sum(os.path.getsize(f) for f in files)
    unit_bytes = unit_bytes or default_unit_bytes(total)
    paragraphs = plain_text_docs == "paragraphs" or (plain_text_docs == "auto" and len(files) == 1)
    units = plan_units(files, unit_bytes, paragraphs)

    if vocab_size is not None:
        tok_option: dict = {"train_vocab_size": vocab_size}
    elif wordpiece_vocab_size is not None:
        tok_option = {"train_wordpiece_vocab_size": wordpiece_vocab_size}
        if tokenizer_sample_bytes != _DEFAULT_SAMPLE_BYTES:  # another sample, another vocabulary
            tok_option["sample_bytes"] = tokenizer_sample_bytes
    elif tokenizer in (None, "bytes"):
        tok_option = {"kind": "bytes"}
    else:
        tok_option = tokenizers.load(tokenizer).spec()
    options = {"tokenizer": tok_option, "val_fraction": val_fraction, "text_field": text_field,
               "unit_bytes": unit_bytes}
    # Options added later enter the fingerprint only when not at their default, so corpora
    # prepared before they existed keep their fingerprint (and are not prepared again).
    later = {"plain_text_docs": (plain_text_docs, "auto"),
             "max_line_bytes": (max_line_bytes, DEFAULT_MAX_LINE_BYTES)}
    options |= {k: value for k, (value, default) in later.items() if value != default}
    plan = {"format": FORMAT,
            "inputs": [{"path": f, "bytes": os.path.getsize(f),
                        "mtime_ns": os.stat(f).st_mtime_ns} for f in files],
            "options": options}
    plan["fingerprint"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()

    with _exclusive(out):
        done = _check_out_dir(out, plan, log)
        if isinstance(done, dict):
            return done  # already prepared
        os.makedirs(os.path.join(out, UNITS), exist_ok=True)
        _write_json(os.path.join(out, PLAN), plan)
        for name in os.listdir(out):  # partial files of a killed run (we hold the lock)
            if ".tmp" in name:
                os.remove(os.path.join(out, name))

        reading = ReadOptions(text_field, val_fraction, max_line_bytes)
        reading = dataclasses.replace(reading, forced=_forced_split(units, reading))
        tok = _resolve_tokenizer(out, tokenizer, vocab_size, wordpiece_vocab_size, units,
                                 reading, tokenizer_sample_bytes, log)
        spec = tok.save(out)
        dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
        results = {r["index"]: r for r in done}
        todo = [i for i in range(len(units)) if i not in results]
        if results:
            print(f"lm.data.prepare: resuming {out}: {len(results)} of {len(units)} units done",
                  file=log)
        tasks = [(i, units[i], out, dtype, reading) for i in todo]
        todo_bytes = sum(p.size if p.gz else p.end - p.start for i in todo for p in units[i])
        workers = min(workers, max(len(tasks), 1))
        bar = tqdm(total=todo_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                   desc="tokenizing", disable=not progress, file=log, dynamic_ncols=True)
        init_args = (spec, out, workers > 1)
        try:
            for result in _map_units(tasks, workers, init_args):
                _write_json(os.path.join(out, UNITS, f"{result['index']:05d}.json"), result)
                results[result["index"]] = result
                bar.update(result["disk_bytes"])
        finally:
            bar.close()

        manifest = _manifest(plan, spec, dtype, [results[i] for i in range(len(units))], units)
        manifest["skipped_files"] = skipped
        if reading.forced:
            name, offset, split = reading.forced
            path = next(p.path for unit in units for p in unit if p.name == name)
            manifest["forced_split"] = {"file": path, "line": _lines_before(path, offset) + 1,
                                        "split": split}
        manifest["seconds"] = round(time.perf_counter() - start_time, 3)
        _report(manifest, log)
        _write_json(os.path.join(out, MANIFEST), manifest)
        shutil.rmtree(os.path.join(out, UNITS))
        os.remove(os.path.join(out, PLAN))
        return manifest


def _forced_split(units: list[list[Piece]], options: ReadOptions) -> tuple[str, int, str] | None:
    """(file name, offset, split) of the document to move when the hash split puts every
    document of a corpus of two or more in one split: its first document, into the other. Reads
    documents in order until both splits are seen (about 1 / val_fraction of them), so all of a
    corpus only when it needs the move. `--val-fraction 0` asks for no validation split."""
    if options.val_fraction == 0:
        return None
    first = last = None
    documents, splits = 0, set()
    for piece in (p for unit in units for p in unit):
        whole_file = not (piece.jsonl or piece.paragraphs)
        if whole_file and (piece.name, 0) == last:
            continue  # the rest of a document already seen
        for doc in read_documents(piece, options, Counter(), []):
            key = (piece.name, doc.offset)
            documents += key != last
            first, last = first or key, key
            splits.add(doc.split)
            if len(splits) == 2:
                return None
            if whole_file:
                break
    if documents < 2:
        return None
    return (*first, "train" if splits == {"val"} else "val")


@contextlib.contextmanager
def _exclusive(out: str) -> Iterator[None]:
    """Holds an exclusive lock on `out` (flock: reliable on local disks, best effort on NFS)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"--out {out} exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LOCK), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepareError(f"another lm.data.prepare is writing to {out} right now; wait for "
                               "it, or choose another --out") from None
        yield


def _map_units(tasks: list[tuple], workers: int, init_args: tuple) -> Iterator[dict]:
    if workers == 1:
        _init_worker(*init_args[:2], False)
        yield from map(_run_unit, tasks)
        return
    # spawn, not fork: the parent may hold jax's or the tokenizer's threads. The workers need
    # nothing from the caller's __main__, so hide it: they start without re-running the caller's
    # script (no `if __name__ == "__main__"` guard needed) or importing what it imported.
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, multiprocessing.get_context("spawn"), _init_worker, init_args)
        futures = [pool.submit(_run_unit, task) for task in tasks]  # starts the workers
    finally:
        sys.modules["__main__"] = main
    with pool:
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise PrepareError("a worker process died (out of memory? try fewer --workers); "
                               "the finished units are kept: re-run the same command to resume"
                               ) from None
        finally:
            for future in futures:
                future.cancel()


def _check_out_dir(out: str, plan: dict, log) -> dict | list[dict]:
    """The finished manifest, or the unit results to resume from ([] for a fresh start)."""
    manifest_path, plan_path = os.path.join(out, MANIFEST), os.path.join(out, PLAN)
    for path, state in ((manifest_path, "prepared"), (plan_path, "partly prepared")):
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old.get("fingerprint") != plan["fingerprint"]:
                raise PrepareError(
                    f"--out {out} already holds a {state} corpus from different "
                    f"{_difference(old, plan)}; refusing to mix two corpora: choose a new --out "
                    "or delete it")
            if state == "prepared":
                print(f"lm.data.prepare: {out} is already prepared from these inputs "
                      "(nothing to do)", file=log)
                with open(manifest_path) as f:
                    return json.load(f)
            return _finished_units(out)
    if set(os.listdir(out)) - {LOCK}:
        raise PrepareError(f"--out {out} is not empty and holds no {MANIFEST} or {PLAN}: "
                           "choose a new or empty directory")
    return []


def _difference(old: dict, new: dict) -> str:
    if old.get("format") != new["format"]:
        return f"format {old.get('format')!r} (this is {new['format']!r})"
    old_inputs = {i["path"]: i for i in old.get("inputs", [])}
    new_inputs = {i["path"]: i for i in new["inputs"]}
    if set(old_inputs) != set(new_inputs):
        added, removed = set(new_inputs) - set(old_inputs), set(old_inputs) - set(new_inputs)
        return f"inputs (added {sorted(added)[:3]}, removed {sorted(removed)[:3]})"
    changed = [p for p in new_inputs if old_inputs[p] != new_inputs[p]]
    if changed:
        return f"inputs (changed since: {changed[:3]})"
    old_options = old.get("options", {})
    keys = [k for k in sorted(set(old_options) | set(new["options"]))
            if old_options.get(k) != new["options"].get(k)]
    return f"options ({', '.join(keys) or 'unknown'})"


def _finished_units(out: str) -> list[dict]:
    """Unit results whose shards are all present and intact (others are redone)."""
    done = []
    for name in sorted(os.listdir(os.path.join(out, UNITS))):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(out, UNITS, name)) as f:
            result = json.load(f)
        intact = True
        for shard in result["shards"].values():
            path = os.path.join(out, shard["file"])
            intact &= os.path.exists(path) and file_sha256(path) == shard["sha256"]
        if intact:
            done.append(result)
    return done


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * _MB):
            h.update(block)
    return h.hexdigest()


def _resolve_tokenizer(out, tokenizer, vocab_size, wordpiece_vocab_size, units, options,
                       sample_bytes, log) -> tokenizers.Tokenizer:
    if vocab_size is None and wordpiece_vocab_size is None:
        return tokenizers.load(tokenizer or "bytes")
    saved = os.path.join(out, tokenizers.BPE_FILE)
    if os.path.exists(saved):  # resuming: the tokenizer trained by the first attempt
        return tokenizers.BPETokenizer.from_file(saved)
    kind = "byte-level BPE" if vocab_size is not None else "WordPiece"
    print(f"lm.data.prepare: training a {vocab_size or wordpiece_vocab_size:,}-token {kind} on "
          f"up to {sample_bytes / _MB:,.0f} MB of the train split", file=log)

    def texts() -> Iterator[str]:
        seen = 0
        for unit in units:
            for piece in unit:
                for doc in read_documents(piece, options, Counter(), []):
                    if doc.split == "train":
                        yield doc.text
                        seen += len(doc.text)
                        if seen >= sample_bytes:
                            return

    if vocab_size is not None:
        return tokenizers.train_bpe(texts(), vocab_size)
    return tokenizers.train_wordpiece(texts(), wordpiece_vocab_size)


def _manifest(plan: dict, spec: dict, dtype: str, results: list[dict],
              units: list[list[Piece]]) -> dict:
    splits = {s: {"tokens": 0, "documents": 0, "shards": []} for s in ("train", "val")}
    for r in results:
        for split, shard in r["shards"].items():
            splits[split]["shards"].append(shard)
            splits[split]["tokens"] += shard["tokens"]
            splits[split]["documents"] += shard["documents"]
    problems = {k: sum(r["problems"].get(k, 0) for r in results) for k in PROBLEMS}
    examples = []
    line_cache: dict[tuple[str, int], int] = {}
    for r in results:
        unit = units[r["index"]]
        for ex in r["examples"]:
            piece = next(p for p in unit if p.name == ex["file"] and p.start == ex["piece_start"])
            key = (piece.path, piece.start)
            if key not in line_cache:
                line_cache[key] = _lines_before(piece.path, piece.start)
            examples.append({"file": piece.path, "line": line_cache[key] + ex["line"],
                             "problem": ex["problem"], "message": ex["message"]})
    return {"format": FORMAT, "fingerprint": plan["fingerprint"], "dtype": dtype,
            "tokenizer": spec, "splits": splits, "raw_bytes": sum(r["bytes"] for r in results),
            "problems": problems, "problem_examples": examples[:_SHOWN_PROBLEMS * 5],
            "inputs": plan["inputs"], "options": plan["options"]}


def _lines_before(path: str, offset: int) -> int:
    n = 0
    with open(path, "rb") as f:
        while offset > 0 and (block := f.read(min(16 * _MB, offset))):
            n += block.count(b"\n")
            offset -= len(block)
    return n


def _report(manifest: dict, log) -> None:
    skipped = manifest["skipped_files"]
    for s in skipped[:_SHOWN_PROBLEMS]:
        print(f"lm.data.prepare: skipped {s['file']}: {s['reason']}", file=log)
    if len(skipped) > _SHOWN_PROBLEMS:
        print(f"lm.data.prepare: ... skipped {len(skipped)} in all (listed in manifest.json)",
              file=log)
    for ex in manifest["problem_examples"][:_SHOWN_PROBLEMS]:
        print(f"lm.data.prepare: warning: {ex['file']}:{ex['line']}: {ex['message']}", file=log)
    problems = {k: v for k, v in manifest["problems"].items() if v}
    if problems:
        print(f"lm.data.prepare: bad input (counted in manifest.json): {problems}", file=log)
    if forced := manifest.get("forced_split"):
        print(f"lm.data.prepare: no document fell in the {forced['split']} split by hash "
              f"(--val-fraction {manifest['options']['val_fraction']}): moved the first one, "
              f"{forced['file']}:{forced['line']}, there", file=log)
    s = manifest["splits"]
    mb = manifest["raw_bytes"] / 1e6
    print(f"lm.data.prepare: {mb:,.1f} MB of text -> {s['train']['tokens']:,} train tokens "
          f"({s['train']['documents']:,} documents), {s['val']['tokens']:,} validation tokens "
          f"({s['val']['documents']:,} documents) in {manifest['seconds']:.1f} s "
          f"({mb / max(manifest['seconds'], 1e-9):,.1f} MB/s)", file=log)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm.data.prepare",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("--input", nargs="+", required=True, action="extend",
                        help="files, directories or globs (.txt/.jsonl, optionally .gz)")
    parser.add_argument("--out", required=True, help="output directory")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", help="'bytes' (default) or a Hugging Face tokenizer.json")
    group.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this size")
    group.add_argument("--wordpiece-vocab-size", type=int,
                       help="train a BERT WordPiece vocabulary of this size (cased)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of documents held out for validation (default 0.01)")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    parser.add_argument("--plain-text-docs", choices=PLAIN_TEXT_DOCS, default="auto",
                        help="a plain text file is one document ('file') or one per blank-line-"
                        "separated paragraph ('paragraphs'); 'auto' (default): paragraphs when "
                        "the corpus is a single file, else file")
    parser.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES,
                        help="longer JSONL lines are skipped and counted (default 8 MiB)")
    parser.add_argument("--unit-mb", type=float, default=None,
                        help="raw text per shard (default: corpus / 256, within 1-64 MB)")
    parser.add_argument("--tokenizer-sample-mb", type=float, default=1024,
                        help="text used to train the BPE or WordPiece (default 1024)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        prepare(args.input, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                wordpiece_vocab_size=args.wordpiece_vocab_size, workers=args.workers,
                val_fraction=args.val_fraction, text_field=args.text_field,
                unit_bytes=int(args.unit_mb * _MB) if args.unit_mb else None,
                tokenizer_sample_bytes=int(args.tokenizer_sample_mb * _MB),
                plain_text_docs=args.plain_text_docs, max_line_bytes=args.max_line_bytes,
                progress=not args.no_progress)
    except (PrepareError, ValueError) as e:
        print(f"lm.data.prepare: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Run the importable copy of this module, so that the functions handed to worker processes
    # are `lm.data.prepare._run_unit`, not `__main__._run_unit`.
    from lm.data.prepare import main as _main
    _main()
