"""Tokenizers, parallel preparation into token shards, the prepared dataset and the loader."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lm import sharding
from lm.config import MeshConfig
from lm.data import prepare as prep
from lm.data.corpus import prepare_stdlib
from lm.data.dataset import Dataset
from lm.data.loader import Loader, LoaderState, permutation
from lm.data.tokenizer import BPETokenizer, ByteTokenizer, load, train_bpe

TEXTS = ["def f(x):\n    return 'héllo, 世界' # ✓\n", "naïve café — ñ\n\n\ttabs  and  spaces ",
         "emoji 🎉 and math ∑ x² ≤ ∞", "plain ascii line\r\nwindows line ending\r\n"]


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.max() < 256 and tok.decode(ids) == text
    assert tok.decode(np.append(tok.encode(TEXTS[0]), tok.eod_id)) == TEXTS[0]  # specials dropped
    assert tok.decode(tok.encode(b"\xff\xfeok")) == "\ufffd\ufffdok"  # invalid UTF-8 survives


def test_bpe_tokenizer_trains_round_trips_and_reloads(tmp_path):
    tok = train_bpe(TEXTS * 20, vocab_size=300)
    assert tok.vocab_size == 300 and {tok.eod_id, tok.pad_id} == {0, 1}
    for text in TEXTS + ["unseen: Ωμέγα ¿qué? 😀"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode(TEXTS[1])) < len(TEXTS[1].encode())  # merges were learned
    assert tok.decode([*tok.encode("ab"), tok.eod_id, 299 + 5]) == "ab"  # specials, padded rows
    tok.save(str(tmp_path))
    again = load(str(tmp_path / "tokenizer.json"))
    assert isinstance(again, BPETokenizer)
    np.testing.assert_array_equal(again.encode(TEXTS[2]), tok.encode(TEXTS[2]))
    with pytest.raises(ValueError, match="too small"):
        train_bpe(TEXTS, vocab_size=100)


# ---------------------------------------------------------------------------------------------
# Preparation


def write_corpus(root) -> list[str]:
    """A small corpus in every input format, with every kind of bad input; returns the
    documents preparation must keep, in order."""
    os.makedirs(root / "txt")
    good = []
    for i, text in enumerate(TEXTS * 3):
        body = f"{i}: {text}" * (1 + i % 5)
        (root / "txt" / f"{i:02d}.txt").write_text(body, encoding="utf-8")
        good.append(body)
    (root / "txt" / "empty.txt").write_text("  \n")  # empty document
    (root / "txt" / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))  # bad UTF-8
    good.append("caf\ufffd au lait\n")
    lines, jsonl_good = [], []
    for i in range(40):
        text = f"record {i} — {TEXTS[i % 4]}"
        lines.append(json.dumps({"text": text, "id": i}))
        jsonl_good.append(text)
    lines[5] = '{"text": "unterminated'                  # malformed (line 6)
    lines[9] = json.dumps({"body": "no text field"})     # missing field (line 10)
    lines[13] = json.dumps({"text": 42})                 # not a string (line 14)
    lines[17] = json.dumps({"text": ""})                 # empty (line 18)
    lines[21] = '{"text": "half \\ud83d emoji"}'         # lone surrogate (line 22), kept
    jsonl_good[21] = "half \ud83d emoji".encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    lines[25] = "[" * 100_000                            # nested too deeply (line 26)
    jsonl_good = [t for i, t in enumerate(jsonl_good) if i not in (5, 9, 13, 17, 25)]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(root / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": f"gz {t}"}) for t in TEXTS) + "\n")
    with gzip.open(root / "zipped.txt.gz", "wt", encoding="utf-8") as f:
        f.write("a gzipped plain text document ✓\n")
    return good + jsonl_good + [f"gz {t}" for t in TEXTS] + ["a gzipped plain text document ✓\n"]


def documents(dataset: Dataset) -> list[str]:
    """Every document of both splits, decoded."""
    tok, docs = dataset.tokenizer, []
    for split in ("train", "val"):
        if dataset.num_tokens(split):
            stream = dataset.split(split).read()
            cuts = np.flatnonzero(stream == tok.eod_id)
            assert cuts[-1] == len(stream) - 1  # every document ends with eod
            docs += [tok.decode(d) for d in np.split(stream, cuts + 1)[:-1]]
    return docs


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_prepare_round_trips_and_counts(corpus_dir, tmp_path, tokenizer):
    root, expected = corpus_dir
    options = {"vocab_size": 400} if tokenizer == "bpe" else {"tokenizer": "bytes"}
    manifest = prep.prepare([str(root)], str(tmp_path / "out"), workers=2, val_fraction=0.3,
                            unit_bytes=1024, progress=False, **options)
    data = Dataset(str(tmp_path / "out"))
    data.verify()
    assert sorted(documents(data)) == sorted(expected)
    assert manifest["problems"] == {"undecodable": 2, "empty": 2, "malformed_json": 2,
                                    "missing_field": 2}
    where = {(os.path.basename(e["file"]), e["line"], e["problem"])
             for e in manifest["problem_examples"]}
    assert where == {("latin1.txt", 1, "undecodable"), ("empty.txt", 1, "empty"),
                     ("docs.jsonl", 6, "malformed_json"), ("docs.jsonl", 10, "missing_field"),
                     ("docs.jsonl", 14, "missing_field"), ("docs.jsonl", 18, "empty"),
                     ("docs.jsonl", 22, "undecodable"), ("docs.jsonl", 26, "malformed_json")}
    assert manifest["dtype"] == "uint16"
    for split in ("train", "val"):
        s = manifest["splits"][split]
        assert len(s["shards"]) > 1  # several units, so several shards
        assert s["tokens"] == sum(sh["tokens"] for sh in s["shards"]) == len(data.split(split))
        assert s["tokens"] == sum(os.path.getsize(tmp_path / "out" / sh["file"]) // 2
                                  for sh in s["shards"])
        assert s["documents"] == int((data.split(split).read() == data.tokenizer.eod_id).sum())
    assert manifest["splits"]["val"]["documents"] > 5
    assert data.tokenizer.vocab_size == (400 if tokenizer == "bpe" else 258)


def test_large_files_are_split_and_streamed_into_one_document_each(tmp_path):
    """A 3 MB text file is cut into several units at line ends, a 3 MB .gz is streamed in
    blocks; each is still exactly one document, byte for byte."""
    rng = np.random.default_rng(0)
    words = np.array(["lorem", "ipsum", "δολορ", "sit", "amet", "😀", "\n", "\n\n", "  "])
    big = " ".join(rng.choice(words, 600_000))
    one_line = " ".join(rng.choice(words[:6], 500_000))  # 3 MB, no line end to cut at
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.txt").write_text(big, encoding="utf-8")
    (tmp_path / "in" / "one_line.txt").write_text(one_line, encoding="utf-8")
    with gzip.open(tmp_path / "in" / "big2.txt.gz", "wt", encoding="utf-8") as f:
        f.write(big[::-1])
    out = str(tmp_path / "in" / "prepared")  # the output may sit inside an input directory
    manifest = prep.prepare([str(tmp_path / "in")], out, vocab_size=320, workers=2,
                            val_fraction=0.0, unit_bytes=1 << 20, progress=False)
    assert len(manifest["splits"]["train"]["shards"]) >= 4
    assert manifest["splits"]["train"]["documents"] == 3
    assert sorted(documents(Dataset(out))) == sorted([big, big[::-1], one_line])
    again = prep.prepare([str(tmp_path / "in")], out, vocab_size=320, workers=2,
                         val_fraction=0.0, unit_bytes=1 << 20, progress=False)
    assert again["fingerprint"] == manifest["fingerprint"]  # its own shards are not inputs


def test_prepare_output_does_not_depend_on_workers(corpus_dir, tmp_path):
    root, _ = corpus_dir
    shards = []
    for workers in (1, 2):
        m = prep.prepare([str(root)], str(tmp_path / f"w{workers}"), workers=workers,
                         unit_bytes=512, progress=False)
        shards.append([(s["file"], s["sha256"]) for s in m["splits"]["train"]["shards"]])
    assert shards[0] == shards[1]


def test_prepare_resumes_after_a_crash_and_refuses_another_corpus(corpus_dir, tmp_path,
                                                                 monkeypatch):
    root, _ = corpus_dir
    reference = prep.prepare([str(root)], str(tmp_path / "ref"), workers=1, unit_bytes=512,
                             progress=False)
    run_unit, calls = prep._run_unit, []

    def crash_on_fourth(task):
        calls.append(task[0])
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed mid-way
        return run_unit(task)

    monkeypatch.setattr(prep, "_run_unit", crash_on_fourth)
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        prep.prepare([str(root)], out, workers=1, unit_bytes=512, progress=False)
    monkeypatch.setattr(prep, "_run_unit", run_unit)
    with pytest.raises(ValueError, match="not finished"):
        Dataset(out)  # a half-prepared directory is never read
    log = open(tmp_path / "log", "w+")
    manifest = prep.prepare([str(root)], out, workers=1, unit_bytes=512, progress=False, log=log)
    log.seek(0)
    assert "resuming" in log.read()
    assert manifest["splits"] == reference["splits"]  # same shards, same checksums

    # Same command again: nothing to do. Other inputs or options: refused, nothing touched.
    assert prep.prepare([str(root)], out, workers=1, unit_bytes=512, progress=False,
                        log=log)["fingerprint"] == manifest["fingerprint"]
    with pytest.raises(prep.PrepareError, match="different inputs"):
        prep.prepare([str(root / "txt")], out, unit_bytes=512, progress=False)
    with pytest.raises(prep.PrepareError, match=r"options \(val_fraction\)"):
        prep.prepare([str(root)], out, unit_bytes=512, val_fraction=0.5, progress=False)
    with open(os.path.join(out, ".lock")) as held:  # another prepare is running there
        import fcntl
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(prep.PrepareError, match="another lm.data.prepare is writing"):
            prep.prepare([str(root)], out, workers=1, unit_bytes=512, progress=False)
    with pytest.raises(prep.PrepareError, match="not empty"):
        prep.prepare([str(root)], str(root / "txt"), progress=False)
    Dataset(out).verify()


def test_unreadable_inputs_are_clear_errors(tmp_path):
    (tmp_path / "fake.jsonl.gz").write_text("not gzip")
    with gzip.open(tmp_path / "cut.txt.gz", "wb") as f:
        f.write(os.urandom(50_000))
    (tmp_path / "cut.txt.gz").write_bytes((tmp_path / "cut.txt.gz").read_bytes()[:1000])
    out = str(tmp_path / "out")
    for inputs, message in [([str(tmp_path / "missing.txt")], "does not exist"),
                            ([str(tmp_path / "*.parquet")], "matches no files"),
                            ([str(tmp_path / "fake.jsonl.gz")], "not gzip data"),
                            ([str(tmp_path / "cut.txt.gz")], "cut.txt.gz cannot be read")]:
        with pytest.raises(prep.PrepareError, match=message):
            prep.prepare(inputs, out, workers=2, progress=False)


def test_prepare_command_line(corpus_dir, tmp_path, root):
    corpus, _ = corpus_dir
    env = {**os.environ, "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "lm.data.prepare", "--input", str(corpus / "*.jsonl*"),
           str(corpus / "txt"), "--out", str(tmp_path / "out"), "--vocab-size", "300",
           "--workers", "2", "--val-fraction", "0.1", "--unit-mb", "0.001"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{corpus / 'docs.jsonl'}:6: malformed JSON" in proc.stderr
    assert "MB/s" in proc.stderr and "train tokens" in proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "bpe" and manifest["tokenizer"]["vocab_size"] == 300
    bad = subprocess.run(cmd[:4] + [str(corpus / "nope.txt"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "nope.txt' does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_embedded_corpus_is_prepared_and_split_by_file(tmp_path):
    data = Dataset(prepare_stdlib(str(tmp_path / "stdlib"), val_fraction=0.02))
    train, val = data.num_tokens("train"), data.num_tokens("val")
    assert train > 5_000_000 and data.manifest["splits"]["train"]["documents"] > 500
    assert 0.005 < val / train < 0.06
    window = data.split("val").read(1000, 1200).astype(np.uint16).tobytes()
    assert window not in data.split("train").read().astype(np.uint16).tobytes()


# ---------------------------------------------------------------------------------------------
# Loader


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "d"
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("raw")
    for i in range(30):
        words = rng.choice(["alpha", "beta", "γάμμα", "delta", "\n"], size=rng.integers(50, 400))
        (root / f"{i:02d}.txt").write_text(" ".join(words))
    prep.prepare([str(root)], str(out), workers=1, unit_bytes=4096, progress=False)
    return Dataset(str(out)).split("train")


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(n):
    p = permutation(np.arange(n), n, seed=1, epoch=0)
    np.testing.assert_array_equal(np.sort(p), np.arange(n))
    if n > 100:
        assert not np.array_equal(p, np.arange(n))
        assert not np.array_equal(p, permutation(np.arange(n), n, seed=1, epoch=1))


def test_batches_are_packed_windows_of_the_stream(stream):
    loader = Loader(stream, 8, 32, seed=0, shuffle=False)
    batch = loader.global_batch(LoaderState(0, 16))
    flat = stream.read()
    assert batch.shape == (8, 33) and batch.dtype == np.int32
    for r in range(8):
        start = (16 + r) * 32
        np.testing.assert_array_equal(batch[r], flat[start:start + 33])
    assert len(stream.paths) > 1  # windows crossing shard boundaries are covered too


def test_one_epoch_visits_every_sequence_once_then_reshuffles(stream):
    loader = Loader(stream, 4, 32, seed=5)
    n = loader.num_sequences
    seen = [loader.sequence_ids(LoaderState(0, p)) for p in range(0, n - n % 4, 4)]
    seen = np.concatenate(seen)
    assert len(set(seen.tolist())) == len(seen) == n - n % 4
    last = LoaderState(0, n - n % 4)  # an incomplete tail rolls over to epoch 1
    np.testing.assert_array_equal(loader.sequence_ids(last),
                                  loader.sequence_ids(LoaderState(1, 0)))
    assert loader.next_state(last) == LoaderState(1, 4)
    assert not np.array_equal(loader.sequence_ids(LoaderState(1, 0)),
                              loader.sequence_ids(LoaderState(0, 0)))


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_from_saved_state_reproduces_the_next_batches(stream, prefetch):
    reference = Loader(stream, 8, 16, seed=7, prefetch=prefetch)
    expected = [np.asarray(next(reference)) for _ in range(25)]
    first = Loader(stream, 8, 16, seed=7, prefetch=prefetch)
    for _ in range(15):
        next(first)
    saved = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
    first.close()
    resumed = Loader(stream, 8, 16, seed=7, prefetch=prefetch)
    resumed.load_state_dict(saved)
    for want in expected[15:]:
        np.testing.assert_array_equal(np.asarray(next(resumed)), want)
    resumed.close()
    with pytest.raises(ValueError, match="seq_len"):
        Loader(stream, 8, 32, seed=7).load_state_dict(saved)


def test_a_read_error_reaches_the_consumer_and_close_does_not_hang(stream):
    class Failing:
        def __init__(self):
            self.calls = 0

        def __len__(self):
            return len(stream)

        def windows(self, starts, length):
            self.calls += 1
            if self.calls > 3:
                raise OSError("disk went away")
            return stream.windows(starts, length)

    loader = Loader(Failing(), 4, 16, seed=0, prefetch=2)
    next(loader)  # the producer fills the queue, then fails with the queue full
    import time
    time.sleep(0.3)
    loader.close()  # must return
    loader = Loader(Failing(), 4, 16, seed=0, prefetch=2)
    with pytest.raises(OSError, match="disk went away"):
        for _ in range(5):
            next(loader)


def test_global_batch_does_not_depend_on_the_mesh(stream):
    batches = []
    for axes in (None, dict(data=8), dict(data=2, fsdp=2, tensor=2), dict(data=2, fsdp=4)):
        shard = None if axes is None else sharding.batch_sharding(
            sharding.make_mesh(MeshConfig(**axes)))
        loader = Loader(stream, 16, 32, seed=0, sharding=shard, prefetch=2)
        batches.append([np.asarray(next(loader)) for _ in range(3)])
        loader.close()
        if axes == dict(data=8):
            assert len(loader.rows) == 16  # one process holds every row here
    for other in batches[1:]:
        np.testing.assert_array_equal(np.stack(other), np.stack(batches[0]))


def test_two_processes_read_disjoint_rows_of_the_same_batches(stream, tmp_path, root):
    """Two jax.distributed processes (4 CPU devices each, gloo): each builds only its rows; the
    union, and the assembled global array, equal the single-process batches row for row."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    data_dir = os.path.dirname(stream.paths[0])
    env = {**os.environ, "PYTHONPATH": root, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, os.path.join(root, "tests", "multihost_loader.py"),
                               str(i), str(port), data_dir, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
    single = Loader(stream, 16, 32, seed=3)
    for step in range(3):
        want = single.global_batch(LoaderState(0, 16 * step))
        rows = [np.load(tmp_path / f"rows{i}-{step}.npy") for i in range(2)]
        local = [np.load(tmp_path / f"local{i}-{step}.npy") for i in range(2)]
        assert not set(rows[0]) & set(rows[1]) and len(rows[0]) == len(rows[1]) == 8
        for r, x in zip(rows, local):
            np.testing.assert_array_equal(x, want[r])
        for i in range(2):
            np.testing.assert_array_equal(np.load(tmp_path / f"global{i}-{step}.npy"), want)
