"""Tokenizers behind one small interface: `encode`, `encode_batch`, `decode`, `vocab_size`,
`eod_id` (end of document), `pad_id`, `cls_id` / `sep_id` / `mask_id` (BERT's specials; None
where the tokenizer has none), `continuation_table()` (which ids continue a word, for whole-word
masking), `spec()` (what a manifest records) and `save(dir)`.

- `ByteTokenizer`: ids 0-255 are bytes, then eod and pad. Needs no training and round-trips any
  text; the tests and the embedded corpus use it.
- `BPETokenizer` (alias `HFTokenizer`): any Hugging Face `tokenizers` `tokenizer.json` (a Rust
  library: training a 32k vocabulary on a gigabyte takes minutes, `encode_batch_fast` skips
  offsets, and the file it writes is the one every GPT-2 / Llama / BERT checkpoint on the Hub
  ships, so converted checkpoints carry their tokenizers over unchanged). sentencepiece would
  need its own model format and a Python loop for the byte fallback. Two trainers make one:
  - `train_bpe`: byte-level BPE (GPT-2 pre-tokenization), for the decoders;
  - `train_wordpiece`: BERT's WordPiece, built as transformers v5 builds a fresh
    `BertTokenizer` ([PAD] [UNK] [CLS] [SEP] [MASK] = ids 0-4, BertNormalizer, "##" word
    pieces, the `[CLS] A [SEP] B [SEP]` post-processor), so `BertTokenizerFast` /
    `PreTrainedTokenizerFast` load its `tokenizer.json` and agree on every id. Its eod is [SEP].

Nothing here imports jax: data-preparation workers load this module in fresh processes.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
from collections.abc import Iterable

import numpy as np
import tokenizers as hf  # Hugging Face `tokenizers` (Tokenizer below is ours)

EOD_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
# Names other tokenizers give the same roles (GPT-2, Llama 2, Llama 3, Gemma, BERT).
EOD_NAMES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
PAD_NAMES = (PAD_TOKEN, "<pad>", "[PAD]", "<|finetune_right_pad_id|>")
CLS_NAMES, SEP_NAMES, MASK_NAMES = ("[CLS]", "<s>"), ("[SEP]", "</s>"), ("[MASK]", "<mask>")
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0-4, as BERT's
MIN_WORDPIECE_VOCAB = len(WORDPIECE_SPECIALS) + 2
BPE_FILE = "tokenizer.json"
DATA_FILE = "data.json"  # in a training workdir: the data it trained on and its tokenizer


class ByteTokenizer:
    eod_id = 256
    pad_id = 257
    vocab_size = 258
    cls_id = sep_id = mask_id = None

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def encode_prompt(self, text: str) -> np.ndarray:
        return self.encode(text)

    def encode_pair(self, a: str, b: str):
        raise ValueError("the byte tokenizer has no [CLS]/[SEP] to build a sentence pair with: "
                         "use a WordPiece tokenizer (data.tokenizer 'wordpiece:N', or "
                         "`python -m lm.data.prepare --wordpiece-vocab-size N`)")

    def decode(self, ids) -> str:
        """Text for `ids`; special and out-of-vocabulary ids are dropped, invalid UTF-8 becomes
        U+FFFD."""
        ids = np.asarray(ids).reshape(-1)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode(
            "utf-8", errors="replace")

    def stream(self) -> "TextStream":
        """Incremental decoding (one generated id at a time; constant work per id)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return TextStream(lambda i: decoder.decode(bytes([i])) if 0 <= i < 256 else "")

    def continuation_table(self) -> np.ndarray:
        """[vocab_size] bool: no byte continues a word (whole-word masking masks single ids)."""
        return np.zeros(self.vocab_size, bool)

    def spec(self) -> dict:
        return {"kind": "bytes", "vocab_size": self.vocab_size, "eod_id": self.eod_id,
                "pad_id": self.pad_id}

    def save(self, directory: str) -> dict:
        return self.spec()


class BPETokenizer:
    def __init__(self, tokenizer, path: str | None = None):
        self.tokenizer, self.path = tokenizer, path
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod_id = _find_token(tokenizer, EOD_NAMES, path, "end-of-document")
        pad = [tokenizer.token_to_id(n) for n in PAD_NAMES if tokenizer.token_to_id(n) is not None]
        self.pad_id = pad[0] if pad else self.eod_id
        self.cls_id = _first_token(tokenizer, CLS_NAMES)
        self.sep_id = _first_token(tokenizer, SEP_NAMES)
        self.mask_id = _first_token(tokenizer, MASK_NAMES)
        special = {self.eod_id, self.pad_id, self.cls_id, self.sep_id, self.mask_id} - {None}
        self._special = np.array(sorted(special))

    @classmethod
    def from_file(cls, path: str) -> BPETokenizer:
        try:
            return cls(hf.Tokenizer.from_file(path), path)
        except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception)
            raise ValueError(f"cannot load tokenizer {path!r}: {e} (expected a Hugging Face "
                             "tokenizer.json)") from None

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_prompt(self, text: str) -> np.ndarray:
        """A prompt for generation: with the tokens the tokenizer's own post-processor adds
        (a converted Llama's `<s>`, WordPiece's `[CLS] text [SEP]`; nothing for the byte-level
        BPE lm trains), as Hugging Face does."""
        return np.array(self.tokenizer.encode(text, add_special_tokens=True).ids, np.int32)

    def encode_pair(self, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, token_type_ids) of the pair as the post-processor lays it out
        (`[CLS] a [SEP] b [SEP]`, types 0 then 1, for WordPiece), as Hugging Face does."""
        e = self.tokenizer.encode(a, b, add_special_tokens=True)
        return np.array(e.ids, np.int32), np.array(e.type_ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.array(e.ids, np.int32) for e in encodings]

    def decode(self, ids) -> str:
        """Text for `ids`; eod, pad, [CLS], [SEP], [MASK] and out-of-vocabulary ids are dropped."""
        ids = np.asarray(ids).reshape(-1)
        ids = ids[(ids >= 0) & (ids < self.vocab_size) & ~np.isin(ids, self._special)]
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    def stream(self) -> "TextStream":
        """Incremental decoding (`tokenizers`' DecodeStream: constant work per id), dropping
        the ids `decode` drops."""
        stream, special = hf.decoders.DecodeStream(skip_special_tokens=False), set(
            self._special.tolist())

        def step(i: int) -> str:
            if i in special or not 0 <= i < self.vocab_size:
                return ""
            return stream.step(self.tokenizer, i) or ""
        return TextStream(step)

    def continuation_table(self) -> np.ndarray:
        """[vocab_size] bool: True for the ids that continue a word (a WordPiece model's "##"
        pieces); all False for a model without a continuing-subword prefix (byte-level BPE)."""
        table = np.zeros(self.vocab_size, bool)
        prefix = getattr(self.tokenizer.model, "continuing_subword_prefix", None)
        if prefix:
            added = set(self.tokenizer.get_added_tokens_decoder())
            for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
                table[i] = token.startswith(prefix) and i not in added
        return table

    def spec(self) -> dict:
        # kind "bpe" means any tokenizer.json (WordPiece too). cls/sep/mask ids are not recorded:
        # they follow from the file (its sha256 is), and this spec enters a corpus's fingerprint
        # (`--tokenizer FILE`), which must stay what existing corpora recorded.
        return {"kind": "bpe", "file": BPE_FILE, "sha256": _sha256(self.path),
                "vocab_size": self.vocab_size, "eod_id": self.eod_id, "pad_id": self.pad_id}

    def save(self, directory: str) -> dict:
        """Copies the tokenizer to `directory`/tokenizer.json; returns its spec there."""
        dest = os.path.join(directory, BPE_FILE)
        if self.path is None or os.path.abspath(self.path) != os.path.abspath(dest):
            tmp = f"{dest}.tmp{os.getpid()}"  # never a half-written tokenizer.json
            if self.path is None:
                self.tokenizer.save(tmp)
            else:
                shutil.copyfile(self.path, tmp)
            os.replace(tmp, dest)
        self.path = dest
        return self.spec()


class TextStream:
    """The text of generated ids as they come: `push(id)` returns the characters that id
    completes ("" while a character's bytes are incomplete); `text` is all of them so far.
    A server sends each token's text without decoding the whole sequence again."""

    def __init__(self, step):
        self._step, self.text = step, ""

    def push(self, token: int) -> str:
        new = self._step(int(token))
        self.text += new
        return new


HFTokenizer = BPETokenizer  # it wraps any tokenizer.json, WordPiece included
Tokenizer = ByteTokenizer | BPETokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Trains a byte-level BPE (GPT-2 pre-tokenization, no prefix space, so decode(encode(t)) == t
    for any text) with `vocab_size` entries including the eod and pad tokens."""
    byte_level = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    if vocab_size < len(byte_level.alphabet()) + 2:
        raise ValueError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least "
                         f"{len(byte_level.alphabet()) + 2} (256 bytes + eod + pad)")
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = byte_level
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN, PAD_TOKEN],
                                  initial_alphabet=byte_level.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok)


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool = False
                    ) -> BPETokenizer:
    """Trains a BERT WordPiece vocabulary of `vocab_size` entries ([PAD] [UNK] [CLS] [SEP] [MASK]
    are ids 0-4), the pipeline of transformers v5's fresh `BertTokenizer`: BertNormalizer (control
    characters dropped, whitespace runs become spaces, CJK characters split; `lowercase` also
    strips accents, as uncased BERT does), BertPreTokenizer (whitespace and punctuation), "##"
    word pieces and `[CLS] A [SEP] B:1 [SEP]:1` added by `encode_prompt` / `encode_pair`.
    decode(encode(t)) gives back the normalized words (not the whitespace: newlines are lost).

    The vocabulary never exceeds `vocab_size` (the model's embedding is sized by it): the
    alphabet is capped at (vocab_size - 5) // 2 characters (each may come as "c" and "##c"), the
    rarest beyond it becoming [UNK]; a tiny corpus may give fewer entries."""
    if vocab_size < MIN_WORDPIECE_VOCAB:
        raise ValueError(f"--wordpiece-vocab-size {vocab_size} is too small: WordPiece needs its "
                         f"{len(WORDPIECE_SPECIALS)} special tokens and an alphabet (try 8192+)")
    tok = hf.Tokenizer(hf.models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = hf.normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase or None,
        lowercase=lowercase)
    tok.pre_tokenizer = hf.pre_tokenizers.BertPreTokenizer()
    tok.decoder = hf.decoders.WordPiece(prefix="##")
    trainer = hf.trainers.WordPieceTrainer(vocab_size=vocab_size,
                                           special_tokens=list(WORDPIECE_SPECIALS),
                                           continuing_subword_prefix="##", show_progress=False,
                                           limit_alphabet=(vocab_size - len(WORDPIECE_SPECIALS))
                                           // 2)
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = hf.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return BPETokenizer(tok)


def load(spec: str | dict, directory: str | None = None) -> Tokenizer:
    """A tokenizer from 'bytes', a tokenizer.json path, or a manifest spec (files relative to
    `directory`)."""
    if isinstance(spec, dict):
        if spec.get("kind") == "bytes":
            return ByteTokenizer()
        if spec.get("kind") != "bpe":
            raise ValueError(f"unknown tokenizer kind {spec.get('kind')!r} (expected 'bytes' or "
                             "'bpe')")
        path = os.path.join(directory or ".", spec["file"])
        tok = BPETokenizer.from_file(path)
        if spec.get("sha256") and tok.spec()["sha256"] != spec["sha256"]:
            raise ValueError(f"tokenizer {path} does not match the checksum its manifest recorded: "
                             "it was changed after the data was prepared")
        return tok
    if spec == "bytes":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise ValueError(f"tokenizer {spec!r} is neither 'bytes' nor an existing tokenizer.json")
    return BPETokenizer.from_file(spec)


def from_workdir(workdir: str) -> Tokenizer:
    """The tokenizer a training run in `workdir` used (recorded by `lm.train`)."""
    path = os.path.join(workdir, DATA_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{workdir} has no {DATA_FILE}: it is not a training workdir of lm.train")
    with open(path) as f:
        return load(json.load(f)["tokenizer"], workdir)


def _find_token(tokenizer, names: tuple[str, ...], path: str | None, role: str) -> int:
    for name in names:
        if (i := tokenizer.token_to_id(name)) is not None:
            return i
    raise ValueError(f"tokenizer {path or '(trained)'} has no {role} token; expected one of "
                     f"{list(names)}")


def _first_token(tokenizer, names: tuple[str, ...]) -> int | None:
    return next((i for n in names if (i := tokenizer.token_to_id(n)) is not None), None)


def _sha256(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

