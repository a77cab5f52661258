"""BERT data: the WordPiece tokenizer (against transformers), preparation with it, and the
BertLoader's example layouts, next-sentence pairs, sharding and resumption."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec

from lm import sharding
from lm.config import MeshConfig
from lm.data import prepare as prep
from lm.data.corpus import prepare_stdlib, tokenizer_options
from lm.data.dataset import Dataset
from lm.data.loader import BertLoader, Loader, LoaderState
from lm.data.tokenizer import ByteTokenizer, load, train_bpe, train_wordpiece

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Tokenizers split unbelievable words into pieces, unthinkable as it seems!",
         "A second sentence follows the first one; the model predicts whether it does.",
         "Masked language models predict the hidden words from both sides of the context."]
PAD, UNK, CLS, SEP, MASK = range(5)


@pytest.fixture(scope="module")
def wordpiece():
    return train_wordpiece(TEXTS * 10, vocab_size=200)


def test_wordpiece_special_ids_round_trip_and_continuations(wordpiece):
    tok = wordpiece
    assert [tok.tokenizer.id_to_token(i) for i in range(5)] == \
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.eod_id, tok.mask_id) == (PAD, CLS, SEP, SEP,
                                                                            MASK)
    assert tok.vocab_size <= 200
    for text in ["the quick brown fox", "unbelievable words predict pieces", "unseen zyxw"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and CLS not in ids and SEP not in ids
        np.testing.assert_array_equal(tok.encode_prompt(text), [CLS, *ids, SEP])
        assert tok.decode([CLS, *ids, SEP, MASK, PAD, PAD]) == text  # specials are dropped
    assert tok.decode(tok.encode("The fox,\n  jumps.")) == "The fox, jumps."  # normalized
    assert tok.encode("Fox").tolist() == [UNK]  # a word with a character never seen
    table = tok.continuation_table()
    vocab = tok.tokenizer.get_vocab()
    assert table.shape == (tok.vocab_size,) and table.dtype == bool
    assert {t for t, i in vocab.items() if table[i]} == {t for t in vocab if t.startswith("##")}
    pieces = [tok.tokenizer.id_to_token(i) for i in tok.encode("dogsfoxes")]
    assert len(pieces) > 1 and table[tok.encode("dogsfoxes")].tolist() == \
        [False] + [True] * (len(pieces) - 1)
    ids, types = tok.encode_pair("the fox", "the dog")
    fox, dog = tok.encode("the fox").tolist(), tok.encode("the dog").tolist()
    assert ids.dtype == types.dtype == np.int32
    assert ids.tolist() == [CLS, *fox, SEP, *dog, SEP]
    assert types.tolist() == [0] * (len(fox) + 2) + [1] * (len(dog) + 1)
    for other in (ByteTokenizer(), train_bpe(TEXTS * 5, vocab_size=300)):
        assert not other.continuation_table().any()
        assert other.cls_id is other.sep_id is other.mask_id is None
    with pytest.raises(ValueError, match="no \\[CLS\\]/\\[SEP\\]"):
        ByteTokenizer().encode_pair("a", "b")
    with pytest.raises(ValueError, match="too small"):
        train_wordpiece(TEXTS, vocab_size=6)
    cased = train_wordpiece(TEXTS * 10, vocab_size=200, lowercase=True)
    assert cased.decode(cased.encode("The Quick Fóx")) == "the quick fox"


def test_transformers_loads_the_tokenizer_json_and_agrees_on_ids(wordpiece, tmp_path):
    transformers = pytest.importorskip("transformers")
    wordpiece.save(str(tmp_path))
    path = str(tmp_path / "tokenizer.json")
    ours = load(path)
    texts = TEXTS + ["Unseen: naïve café, 世界 ✓ [MASK] tokens"]
    bert = transformers.BertTokenizerFast(tokenizer_object=ours.tokenizer)
    generic = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    assert (bert.pad_token_id, bert.cls_token_id, bert.sep_token_id, bert.mask_token_id) == \
        (PAD, CLS, SEP, MASK)
    for text in texts:
        want = ours.encode_prompt(text).tolist()
        assert want[0] == CLS and want[-1] == SEP
        assert bert.encode(text) == generic.encode(text) == want
        assert generic.encode(text, add_special_tokens=False) == ours.encode(text).tolist()
    ids, types = ours.encode_pair(texts[0], texts[-1])
    for hf in (bert, generic):
        pair = hf(texts[0], texts[-1], return_token_type_ids=True)
        assert pair["input_ids"] == ids.tolist() and pair["token_type_ids"] == types.tolist()


# ---------------------------------------------------------------------------------------------
# The loader, on a synthetic stream whose ids tell where each token came from


class ArrayStream:
    """A TokenStream over an array (the loader needs `len` and `windows`)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = np.asarray(tokens, np.int32)

    def __len__(self) -> int:
        return len(self.tokens)

    def windows(self, starts, length) -> np.ndarray:
        return self.tokens[np.asarray(starts, np.int64)[:, None] + np.arange(length)]


def document_stream(n: int, seed: int = 0) -> ArrayStream:
    """Documents of 1-60 tokens, each followed by [SEP] (the eod): token ids count up from 5 over
    the whole stream, so a run of consecutive ids is a contiguous piece of one document."""
    rng, out, nxt = np.random.default_rng(seed), [], 5
    while len(out) < n:
        size = int(rng.integers(1, 61))
        out += [*range(nxt, nxt + size), SEP]
        nxt += size
    return ArrayStream(np.array(out[:n]))


@pytest.fixture(scope="module")
def docs():
    return document_stream(40_000)


def bert(stream, batch_size=8, seq_len=32, seed=0, task="mlm_nsp", **kw) -> BertLoader:
    return BertLoader(stream, batch_size, seq_len, seed, task=task, cls_id=CLS, sep_id=SEP,
                      pad_id=PAD, eod_id=SEP, **kw)


def split_row(tokens, types, length):
    """(A, B) of a pair row, checking its layout."""
    row = tokens[:length]
    seps = np.flatnonzero(row == SEP)
    assert row[0] == CLS and len(seps) == 2 and seps[1] == length - 1
    assert (tokens[length:] == PAD).all() and (types[length:] == 0).all()
    np.testing.assert_array_equal(types[:length], np.arange(length) > seps[0])
    a, b = row[1:seps[0]], row[seps[0] + 1:-1]
    assert len(a) and len(b) and not np.isin(np.concatenate([a, b]), [CLS, PAD, MASK]).any()
    return a, b


def test_mlm_rows_are_cls_window_sep_at_full_length(docs):
    loader = bert(docs, task="mlm", shuffle=False)
    assert loader.num_sequences == len(docs) // 30
    batch = loader.global_batch(LoaderState(0, 16))
    assert set(batch) == {"tokens", "token_types", "lengths"}
    assert all(v.dtype == np.int32 for v in batch.values())
    assert batch["tokens"].shape == batch["token_types"].shape == (8, 32)
    assert (batch["tokens"][:, 0] == CLS).all() and (batch["tokens"][:, -1] == SEP).all()
    for r in range(8):
        start = (16 + r) * 30
        np.testing.assert_array_equal(batch["tokens"][r, 1:-1], docs.tokens[start:start + 30])
    assert (batch["token_types"] == 0).all() and (batch["lengths"] == 32).all()


def test_pair_rows_layout_and_next_sentence_labels(docs):
    loader = bert(docs, batch_size=1000, seq_len=24, seed=3)
    batch = loader.global_batch(LoaderState(0, 0))
    assert batch["tokens"].shape == (1000, 24) and batch["nsp_labels"].shape == (1000,)
    labels = batch["nsp_labels"]
    assert set(np.unique(labels)) == {0, 1} and 0.45 <= labels.mean() <= 0.55
    assert (batch["lengths"] < 24).any() and (batch["lengths"] <= 24).all()
    ids = loader.sequence_ids(LoaderState(0, 0))
    w = 24 - 3
    for r in range(1000):
        a, b = split_row(batch["tokens"][r], batch["token_types"][r], batch["lengths"][r])
        assert batch["lengths"][r] == len(a) + len(b) + 3
        window = docs.tokens[ids[r] * w:(ids[r] + 1) * w]
        assert np.isin(a, window).all() and (np.diff(a) == 1).all()  # one piece of one document
        assert (np.diff(b) == 1).all()
        if labels[r] == 0:  # B continues A in the stream
            assert b[0] == a[-1] + 1 and np.isin(b, window).all()
        else:  # B comes from another window, no longer than the B it replaced
            assert b[0] != a[-1] + 1 and not np.isin(b, window).any()
    never = bert(docs, batch_size=200, nsp_random_prob=0.0).global_batch()["nsp_labels"]
    always = bert(docs, batch_size=200, nsp_random_prob=1.0).global_batch()["nsp_labels"]
    assert not never.any() and always.all()


def test_examples_are_a_function_of_seed_epoch_and_index_only(docs):
    """Batch size and where a sequence falls in a batch do not change its example; the epoch
    and the seed do."""
    big, small = bert(docs, batch_size=16, seed=5), bert(docs, batch_size=4, seed=5)
    want = big.global_batch(LoaderState(1, 32))
    parts = [small.global_batch(LoaderState(1, 32 + 4 * k)) for k in range(4)]
    for key in want:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
    ordered = bert(docs, batch_size=16, seed=5, shuffle=False)
    ids = big.sequence_ids(LoaderState(1, 32))
    by_id = {}
    for position in range(0, ordered.num_sequences - 16, 16):
        b = ordered.global_batch(LoaderState(1, position))
        for r, i in enumerate(ordered.sequence_ids(LoaderState(1, position))):
            if i in ids:
                by_id[i] = b["tokens"][r]
    np.testing.assert_array_equal(np.stack([by_id[i] for i in ids]), want["tokens"])
    again = bert(docs, batch_size=16, seed=5).global_batch(LoaderState(1, 32))
    np.testing.assert_array_equal(again["tokens"], want["tokens"])
    other_epoch = ordered.global_batch(LoaderState(2, 0))["tokens"]
    assert not np.array_equal(other_epoch, ordered.global_batch(LoaderState(1, 0))["tokens"])


def test_segments_never_cross_a_document_end():
    # Window of 13 (seq_len 16): a one-token document first, so the part after its end is used.
    stream = ArrayStream(np.array([7, SEP, *range(20, 30), SEP] * 50))
    loader = bert(stream, batch_size=20, seq_len=16, shuffle=False, nsp_random_prob=0.0)
    batch = loader.global_batch()
    for r in range(20):
        a, b = split_row(batch["tokens"][r], batch["token_types"][r], batch["lengths"][r])
        np.testing.assert_array_equal(np.concatenate([a, b]), np.arange(20, 30))


@pytest.mark.parametrize("task", ["mlm", "mlm_nsp"])
def test_sharded_batches_equal_the_host_batch_and_split_rows_by_process(docs, task):
    want = bert(docs, batch_size=16, task=task).global_batch(LoaderState(0, 16))
    for axes in (dict(data=8), dict(data=2, fsdp=2, tensor=2), dict(data=2, fsdp=4)):
        shard = sharding.batch_sharding(sharding.make_mesh(MeshConfig(**axes)))
        loader = bert(docs, batch_size=16, task=task, sharding=shard)
        got = loader.batch_at(LoaderState(0, 16))
        assert set(got) == set(want)
        for key, value in got.items():
            np.testing.assert_array_equal(np.asarray(value), want[key])
            spec = shard.spec if value.ndim == 2 else PartitionSpec(shard.spec[0])
            assert value.sharding.spec == spec and value.shape == want[key].shape
        # Two processes holding half the rows each build exactly those rows of the batch.
        halves = [loader.global_batch(LoaderState(0, 16), rows) for rows in np.split(
            loader.rows, 2)]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), want[key])
    unsharded = bert(docs, batch_size=16, task=task).batch_at(LoaderState(0, 16))
    np.testing.assert_array_equal(np.asarray(unsharded["tokens"]), want["tokens"])


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_mid_epoch_and_a_new_phase(docs, prefetch):
    reference = bert(docs, batch_size=8, seq_len=16, seed=7, prefetch=prefetch)
    n = reference.num_sequences // 8
    expected = [next(reference) for _ in range(n + 5)]  # into the second epoch
    reference.close()
    first = bert(docs, batch_size=8, seq_len=16, seed=7, prefetch=prefetch)
    for _ in range(n - 3):
        next(first)
    saved = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
    first.close()
    assert saved["task"] == "mlm_nsp" and saved["epoch"] == 0 and saved["position"] > 0
    resumed = bert(docs, batch_size=8, seq_len=16, seed=7, prefetch=prefetch)
    resumed.load_state_dict(saved)
    for want in expected[n - 3:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
    resumed.close()

    longer = bert(docs, batch_size=8, seq_len=32, seed=7)
    with pytest.raises(ValueError, match="seq_len=16 but this run has 32"):
        longer.load_state_dict(saved)
    longer.load_state_dict(saved, new_phase=True)
    assert longer.state == LoaderState(0, 0) and longer.seq_len == 32
    np.testing.assert_array_equal(np.asarray(next(longer)["tokens"]),
                                  bert(docs, seq_len=32, seed=7).global_batch()["tokens"])
    for changed, message in [(dict(seed=8), "seed=7 but this run has 8"),
                             (dict(task="mlm"), "task 'mlm_nsp' but this run's is 'mlm'")]:
        with pytest.raises(ValueError, match=message):
            bert(docs, **{"batch_size": 8, "seq_len": 32, "seed": 7, **changed}
                 ).load_state_dict(saved, new_phase=True)
    lm_state = Loader(docs, 8, 16, seed=7).state_dict()  # a decoder's state has no "task"
    with pytest.raises(ValueError, match="task 'lm'"):
        bert(docs, seq_len=16, seed=7).load_state_dict(lm_state)
    with pytest.raises(ValueError, match="task 'mlm_nsp' but this run's is 'lm'"):
        Loader(docs, 8, 16, seed=7).load_state_dict(saved)


def test_bert_loader_refuses_tokenizers_without_specials_and_short_sequences(docs):
    byte = ByteTokenizer()
    with pytest.raises(ValueError, match="needs a tokenizer with cls, sep tokens"):
        BertLoader(docs, 8, 32, 0, task="mlm", cls_id=byte.cls_id, sep_id=byte.sep_id,
                   pad_id=byte.pad_id, eod_id=byte.eod_id)
    with pytest.raises(ValueError, match="seq_len 7 is too short"):
        bert(docs, seq_len=7)
    with pytest.raises(ValueError, match="task 'nsp'"):
        bert(docs, task="nsp")
    with pytest.raises(ValueError, match="the val split holds 100 tokens: 4 windows of 21 "
                       "\\(seq_len 24 less 3 special tokens\\), fewer than one batch of 8; a "
                       "batch_size <= 4 or seq_len <= 15 would fit"):
        bert(ArrayStream(docs.tokens[:100]), seq_len=24, split="val")


# ---------------------------------------------------------------------------------------------
# Preparation with a WordPiece vocabulary


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    rng = np.random.default_rng(0)
    words = np.array([w.strip(".,;!") for w in " ".join(TEXTS).split()])
    documents = []
    for i in range(24):
        doc = " ".join(rng.choice(words, int(rng.integers(20, 80))))
        (root / f"{i:02d}.txt").write_text(doc)
        documents.append(doc)
    return root, documents


def test_prepare_trains_wordpiece_and_separates_documents_with_sep(text_dir, tmp_path):
    root, texts = text_dir
    manifest = prep.prepare([str(root)], str(tmp_path / "out"), wordpiece_vocab_size=150,
                            workers=1, val_fraction=0.2, progress=False, log=open(os.devnull, "w"))
    assert manifest["options"]["tokenizer"] == {"train_wordpiece_vocab_size": 150}
    assert manifest["tokenizer"]["kind"] == "bpe" and manifest["tokenizer"]["eod_id"] == SEP
    data = Dataset(str(tmp_path / "out"))
    tok = data.tokenizer
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id) == (CLS, SEP, PAD, MASK)
    decoded = []
    for split in ("train", "val"):
        stream = data.split(split).read()
        assert stream[-1] == SEP and not np.isin(stream, [CLS, PAD, MASK]).any()
        cuts = np.flatnonzero(stream == SEP)
        decoded += [tok.decode(d) for d in np.split(stream, cuts + 1)[:-1]]
    assert sorted(decoded) == sorted(texts)
    loader = BertLoader(data.split("train"), 4, 16, 0, task="mlm_nsp", cls_id=tok.cls_id,
                        sep_id=tok.sep_id, pad_id=tok.pad_id, eod_id=tok.eod_id)
    batch = next(loader)
    assert np.asarray(batch["tokens"]).shape == (4, 16)
    again = prep.prepare([str(root)], str(tmp_path / "out"), wordpiece_vocab_size=150,
                         workers=1, val_fraction=0.2, progress=False, log=open(os.devnull, "w"))
    assert again["fingerprint"] == manifest["fingerprint"]  # the same command: nothing to do


def test_prepare_command_line_wordpiece_flag_and_exclusive_options(text_dir, tmp_path, capsys,
                                                                   root):
    corpus, _ = text_dir
    proc = subprocess.run([sys.executable, "-m", "lm.data.prepare", "--input", str(corpus),
                           "--out", str(tmp_path / "cli"), "--wordpiece-vocab-size", "120",
                           "--workers", "1", "--no-progress"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "training a 120-token WordPiece" in proc.stderr
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["options"]["tokenizer"] == {"train_wordpiece_vocab_size": 120}
    assert Dataset(str(tmp_path / "cli")).tokenizer.vocab_size <= 120
    with pytest.raises(SystemExit) as e:
        prep.main(["--input", str(corpus), "--out", str(tmp_path / "x"), "--vocab-size", "300",
                   "--wordpiece-vocab-size", "120"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    for options, message in [
            (dict(vocab_size=300, wordpiece_vocab_size=120),
             "give one of --tokenizer, --vocab-size \\(byte-level BPE\\) or "
             "--wordpiece-vocab-size \\(WordPiece\\), not --vocab-size and "
             "--wordpiece-vocab-size"),
            (dict(tokenizer="bytes", wordpiece_vocab_size=120),
             "not --tokenizer and --wordpiece-vocab-size"),
            (dict(wordpiece_vocab_size=5), "--wordpiece-vocab-size 5 is too small")]:
        with pytest.raises(prep.PrepareError, match=message):
            prep.prepare([str(corpus)], str(tmp_path / "y"), progress=False, **options)
    assert not (tmp_path / "y").exists()  # refused before anything was written


def test_embedded_corpus_tokenizer_names():
    assert tokenizer_options("bytes") == {"tokenizer": "bytes"}
    assert tokenizer_options("wordpiece:8192") == {"wordpiece_vocab_size": 8192,
                                                   "tokenizer_sample_bytes": 4 << 20}
    for bad in ("wordpiece", "wordpiece:0", "wordpiece:8k", "bpe:300", ""):
        with pytest.raises(ValueError, match="expected 'bytes' or 'wordpiece:N'"):
            prepare_stdlib("/nonexistent", tokenizer=bad)


@pytest.mark.slow
def test_embedded_corpus_with_wordpiece(tmp_path):
    """~10 s on 2 idle cores: what configs/tiny.py:bert trains on."""
    data = Dataset(prepare_stdlib(str(tmp_path / "stdlib"), tokenizer="wordpiece:8192"))
    tok = data.tokenizer
    assert tok.vocab_size == 8192 and (tok.cls_id, tok.sep_id, tok.mask_id) == (CLS, SEP, MASK)
    assert data.num_tokens("train") > 5_000_000 and data.manifest["splits"]["val"]["documents"]
    assert data.manifest["options"]["tokenizer"] == {"train_wordpiece_vocab_size": 8192,
                                                     "sample_bytes": 4 << 20}
    assert tok.decode(tok.encode("def main(argv=None):")) == "def main ( argv = None ) :"
    assert tok.continuation_table().sum() > 1000
    loader = BertLoader(data.split("val"), 8, 128, 0, task="mlm_nsp", cls_id=tok.cls_id,
                        sep_id=tok.sep_id, pad_id=tok.pad_id, eod_id=tok.eod_id)
    assert next(loader)["tokens"].shape == (8, 128)
