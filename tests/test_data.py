"""Tokenizers, parallel preparation into token shards, the prepared dataset and the loader."""
import gzip
import json
import os
import py_compile
import struct
import subprocess
import sys
import zlib

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
                                    "missing_field": 2, "long_line": 0}
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
    # Files in other encodings (KOI8-R, Latin-1) are kept; no file moves between splits.
    assert data.manifest["skipped_files"] == [] and "forced_split" not in data.manifest


def png_bytes() -> bytes:
    """A real 1x1 grey PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\0\x80")) + chunk(b"IEND", b""))


def test_binary_files_caches_and_long_lines_are_skipped_and_listed(tmp_path, root):
    corpus = tmp_path / "repo"
    (corpus / ".git" / "objects").mkdir(parents=True)
    (corpus / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (corpus / ".git" / "objects" / "ab12").write_bytes(zlib.compress(b"blob 5\0hello"))
    (corpus / "src").mkdir()
    (corpus / "src" / "mod.py").write_text("def f():\n    return 1\n")
    py_compile.compile(str(corpus / "src" / "mod.py"), cfile=str(corpus / "src" / "mod.pyc"))
    (corpus / "logo.png").write_bytes(png_bytes())
    with open(corpus / "dump.jsonl", "w") as f:  # 10 MB on line 2, no line end anywhere after
        f.write(json.dumps({"text": "kept"}) + "\n" + '{"text": "' + "x" * 10_000_000)
    good = ["def f():\n    return 1\n", "kept"]
    for i, text in enumerate(TEXTS):
        (corpus / f"note{i}.txt").write_text(text, encoding="utf-8")
        good.append(text)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lm.data.prepare", "--input", str(corpus),
                           "--out", str(out), "--workers", "1", "--no-progress"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {os.path.relpath(s["file"], corpus): s["reason"] for s in manifest["skipped_files"]}
    assert skipped == {".git": "hidden or cache directory (not walked)",
                       os.path.join("src", "mod.pyc"): "binary: NUL byte at offset 4",
                       "logo.png": "binary: NUL byte at offset 8"}
    assert f"skipped {corpus / 'logo.png'}: binary" in proc.stderr
    assert manifest["problems"]["long_line"] == 1
    assert [(os.path.basename(e["file"]), e["line"], e["problem"])
            for e in manifest["problem_examples"]] == [("dump.jsonl", 2, "long_line")]
    assert f"{corpus / 'dump.jsonl'}:2: line of more than 8,388,608 bytes" in proc.stderr
    assert sorted(documents(Dataset(str(out)))) == sorted(good)


def test_a_long_jsonl_line_is_read_past_in_bounded_memory(tmp_path):
    import tracemalloc
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "big.jsonl", "w") as f:
        f.write('{"text": "' + "x" * 10_000_000 + '"}\n{"text": "after"}\n')
    tracemalloc.start()
    manifest = prep.prepare([str(tmp_path / "in")], str(tmp_path / "out"), workers=1,
                            max_line_bytes=1 << 20, progress=False, log=open(os.devnull, "w"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 6_000_000  # the 10 MB line never sits in memory
    assert manifest["problems"]["long_line"] == 1
    assert documents(Dataset(str(tmp_path / "out"))) == ["after"]


def paragraphs_file(path) -> list[str]:
    """A plain text file of a few paragraphs (blank lines of spaces, CRLF, runs of them);
    returns the documents it should give: its paragraphs."""
    rng = np.random.default_rng(0)
    paras = [" ".join(rng.choice(["alpha", "beta", "γάμμα", "δ"], 60)) + "\nsecond line\n"
             for _ in range(12)]
    seps = ["\n", "  \n", "\r\n", "\n\n\n"]
    path.write_text("".join(p + seps[i % 4] for i, p in enumerate(paras)), encoding="utf-8")
    return paras


@pytest.mark.parametrize("kind", ["one_file", "many_files"])
def test_small_corpora_get_two_splits_that_each_make_a_batch(tmp_path, kind):
    if kind == "one_file":  # one document per paragraph; 1 KB units, cut at blank lines only
        expected = paragraphs_file(tmp_path / "book.txt")
        argv = ["--input", str(tmp_path / "book.txt"), "--unit-mb", "0.001"]
    else:  # one document per file
        (tmp_path / "docs").mkdir()
        expected = [f"short document {i}: " + "words " * (5 + i % 7) for i in range(36)]
        for i, text in enumerate(expected):
            (tmp_path / "docs" / f"{i:02d}.txt").write_text(text)
        argv = ["--input", str(tmp_path / "docs"), "--unit-mb", "0.0002", "--val-fraction",
                "0.001"]
    shards = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        prep.main(argv + ["--out", str(out), "--workers", workers, "--no-progress"])
        data = Dataset(str(out))
        shards.append([s["sha256"] for s in data.shards])
    assert shards[0] == shards[1]  # the held-out document does not depend on the workers
    assert sorted(documents(data)) == sorted(expected)
    splits = data.manifest["splits"]
    assert splits["val"]["documents"] >= 1 and splits["train"]["documents"] >= 1
    assert data.manifest["forced_split"]["split"] == "val"  # no document falls there by hash
    for split in ("train", "val"):
        loader = Loader(data.split(split), 2, 8, seed=0, split=split)
        assert np.asarray(next(loader)).shape == (2, 9)


def test_lm_train_runs_on_a_single_text_file(tmp_path):
    """The end-to-end pulse: one .txt of paragraphs -> two splits -> lm.train trains and
    evaluates on them."""
    from conftest import small_run

    from lm import train
    paragraphs_file(tmp_path / "book.txt")
    prep.main(["--input", str(tmp_path / "book.txt"), "--out", str(tmp_path / "data"),
               "--workers", "1", "--no-progress"])
    run = small_run(**{"data.path": str(tmp_path / "data"), "train.steps": 1,
                       "train.eval_every": 1, "train.eval_batches": 1, "train.sample_tokens": 0,
                       "train.progress": False, "mesh.data": 8})
    train.train(run, str(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "eval_loss" in r] == [1]


def test_a_flipped_byte_or_a_foreign_token_id_is_refused_naming_the_shard(tmp_path, root):
    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text(f"document {i} " * 50)
    prep.prepare([str(corpus)], str(out), workers=1, unit_bytes=2048, val_fraction=0.2,
                 progress=False)
    env = {**os.environ, "PYTHONPATH": root}

    def verify(path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lm.data.verify", str(path),
                               "--no-progress"], capture_output=True, text=True, env=env,
                              timeout=60)

    good = verify(out)
    assert good.returncode == 0 and "every shard matches" in good.stdout, good.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][1]
    path = out / shard["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 4 * 2] ^= 0x01  # a low byte: still a valid id, only the checksum tells
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"shard {path}: bytes 0-.* do not match their crc32"):
        Dataset(str(out))
    train = subprocess.run(  # the next run refuses to start, naming the shard
        [sys.executable, "-m", "lm.train", "--config", "configs/tiny.py", "--workdir",
         str(tmp_path / "run"), f"--config.data.path={out}", "--config.mesh.data=1"],
        capture_output=True, text=True, cwd=root, timeout=120,
        env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert train.returncode == 2 and f"shard {path}: bytes 0-" in train.stderr, train.stderr
    assert "Traceback" not in train.stderr
    bad = verify(out)
    assert bad.returncode == 1 and f"damaged: shard {path}" in bad.stdout
    assert "1 of" in bad.stdout and "Traceback" not in bad.stderr
    assert verify(tmp_path / "nowhere").returncode == 2

    # A shard with an id past the vocabulary (another tokenizer's data), checksums updated.
    data[:2] = np.array([300], np.uint16).tobytes()
    path.write_bytes(bytes(data))
    sums = prep.Checksums()
    sums.update(bytes(data))
    shard.update(sums.fields())
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"shard {path}: .* token id 300, outside the "
                       "tokenizer's vocabulary of 258"):
        Dataset(str(out))
    assert "token id 300" in verify(out).stdout

    # A manifest from before block checksums: sizes and ids are checked, and it says so.
    data[:2] = b"a\0"
    path.write_bytes(bytes(data))
    for split in manifest["splits"].values():
        for s in split["shards"]:
            del s["block_crc32"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    Dataset(str(out))
    assert verify(out).returncode == 1  # its sha256 still tells
    path.write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match=f"shard {path} is .* bytes, the manifest says"):
        Dataset(str(out))


def test_a_large_corpus_is_checked_in_evenly_spaced_blocks_at_open(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.txt").write_text("0123456789\n" * 600_000)  # 6.6 MB: 13 MB shard
    out = tmp_path / "out"
    prep.prepare([str(tmp_path / "in")], str(out), workers=1, progress=False)
    monkeypatch.setattr(Dataset, "OPEN_CHECK_BYTES", 4 << 20)
    assert [b.tolist() for b in Dataset(str(out))._sampled_blocks()] == [[0, 4, 8, 12]]
    shard = out / "train-00000.bin"
    with open(shard, "r+b") as f:  # a flipped byte in block 2, which an open does not read
        f.seek(2 * prep.CHECK_BLOCK + 10)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 1]))
    data = Dataset(str(out))
    with pytest.raises(ValueError, match=f"shard {shard}: bytes 2,097,152-3,145,728 do not"):
        data.verify()


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


def test_a_split_too_small_for_one_batch_says_which_and_what_would_fit():
    class Tokens:  # a split of n tokens
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    cases = [(812, "val", "the val split holds 812 tokens: 3 sequences of seq_len 256, fewer than "
              "one batch of 8; a batch_size <= 3 or seq_len <= 101 would fit"),
             (5, "train", "the train split holds 5 tokens: 0 sequences of seq_len 256, fewer "
              "than one batch of 8; no batch of any shape fits: it needs more documents"),
             (0, "val", "the val split holds 0 tokens: 0 sequences of seq_len 256, fewer than "
              "one batch of 8; no batch of any shape fits: it needs more documents"),
             (300, "", "the split holds 300 tokens: 1 sequence of seq_len 256, fewer than one "
              "batch of 8; a batch_size <= 1 or seq_len <= 37 would fit")]
    for tokens, split, message in cases:
        with pytest.raises(ValueError) as e:
            Loader(Tokens(tokens), 8, 256, seed=0, split=split)
        assert str(e.value) == message
    assert Loader(Tokens(812), 3, 256, seed=0).num_sequences == 3
    assert Loader(Tokens(812), 8, 101, seed=0).num_sequences == 8


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
    env = {**os.environ, "PYTHONPATH": root,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
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
