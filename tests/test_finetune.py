"""Fine-tuning heads (lm/finetune.py): labelled rows in, task metrics out, through lm.train and
lm.predict. The classify comparison with pretraining lives in test_bert_train.py (it shares the
pretrained tiny BERT)."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from test_checkpoint import ONE_DEVICE
from lm import finetune
from lm.config import ConfigError, TaskConfig
from lm.data.tokenizer import ByteTokenizer

WORDS = ["river", "stone", "maple", "cloud", "ember", "lunar", "frost", "amber", "cedar",
         "delta", "piano", "quartz", "sable", "tulip", "velvet", "willow"]
NAMES = ["ZEBRA", "OTTER", "BISON", "HERON", "GECKO", "TIGER", "CRANE", "MOOSE"]
SPAN = {"model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 4,
        "model.mlp_dim": 128, "model.vocab_size": 258, "model.max_len": 64,
        "train.seq_len": 64, "train.batch_size": 16, "train.log_every": 50,
        "data.tokenizer": "bytes", "task.max_query_len": 8, "task.doc_stride": 48,
        "optim.lr": 2e-3, "optim.warmup_steps": 20, "train.progress": False}


def squad_row(i, words, name, at):
    """A SQuAD v1.1 row: `words` with `name` inserted before word `at`; the answer is it."""
    before = " ".join(words[:at])
    context = " ".join(words[:at] + [name] + words[at:])
    start = len(before) + (1 if at else 0)
    return {"id": str(i), "question": "who?", "context": context,
            "answers": {"text": [name], "answer_start": [start]}}


def span_rows(n, seed, length=(6, 14)):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(*length))]
        rows.append(squad_row(i, words, rng.choice(NAMES), rng.randint(0, len(words))))
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_windows_cover_a_long_context_with_the_stride_and_map_answers_back():
    tok, task = ByteTokenizer(), TaskConfig(name="span", max_query_len=8, doc_stride=48)
    row = squad_row(0, ["cedar"] * 25, "OTTER", 12)  # 155 characters, OTTER at 72
    split = finetune.span_split("x", [(1, row)], tok, task, 64)
    starts = [w.start for w in split.windows]
    assert starts == [0, 48, 96] and all(len(w.ids) <= 64 for w in split.windows)
    a = row["answers"]["answer_start"][0]
    inside = [w.start <= a and a + 5 <= w.start + w.size for w in split.windows]
    assert inside == [False, True, False]  # only the second window holds the answer
    f = split.features
    np.testing.assert_array_equal(f["start_positions"], [0, 5 + a - 48, 0])
    np.testing.assert_array_equal(f["end_positions"], [0, 5 + a + 4 - 48, 0])
    # logits that point at the answer's tokens of window 2 give its characters back
    start = np.full(f["tokens"].shape, -5.0, np.float32)
    end = start.copy()
    start[1, f["start_positions"][1]] = end[1, f["end_positions"][1]] = 8.0
    [best] = finetune.best_answers(split, start, end, max_answer_len=30)
    assert (best["answer"], best["start"], best["end"]) == ("OTTER", a, a + 5)
    assert 0.9 < best["score"] <= 1


def test_squad_normalisation_and_macro_f1():
    assert finetune.normalize_answer("The  Cat, sat!") == "cat sat"
    assert finetune.answer_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    m = finetune.classify_metrics(np.array([[2.0, 0], [0, 1], [3, 0], [0, 2]]),
                                  np.array([0, 0, 0, 1]))
    assert m["eval_accuracy"] == 0.75
    assert m["eval_f1"] == pytest.approx((0.8 + 2 / 3) / 2)  # label 0: 2/(2+1), label 1: 1


def test_bad_rows_are_reported_with_file_and_line_and_unknown_labels_are_errors(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "label": "x"}\nnot json\n{"text": 3, "label": "x"}\n\n'
                    '{"text": "b", "label": true}\n{"text": "c", "label": "y"}\n')
    good, bad = finetune.read_rows(str(path), finetune.check_classify)
    assert [n for n, _ in good] == [1, 6]
    assert [b.split(": ")[0] for b in bad] == [f"{path}:{n}" for n in (2, 3, 5)]
    assert "'text' must be a string" in bad[1] and "'label'" in bad[2]
    with pytest.raises(ConfigError, match="label 'y' is not one of"):
        finetune.classify_split(str(path), good, ByteTokenizer(), ["x"], 16)
    squad = tmp_path / "squad.jsonl"
    row = span_rows(1, 0)[0]
    row["answers"]["answer_start"] = [row["answers"]["answer_start"][0] + 1]
    squad.write_text(json.dumps(row) + "\n")
    _, bad = finetune.read_rows(str(squad), finetune.check_span)
    assert "is not at character" in bad[0]


def test_pair_encoding_cuts_the_longer_segment_first():
    tok = ByteTokenizer()
    ids, types = finetune.encode_classify(tok, "abcdefgh", "xy", 8)
    assert ids == list(b"abcde") + [tok.eod_id] + list(b"xy") and types == [0] * 5 + [1] * 3


@pytest.mark.slow
def test_a_span_model_answers_in_the_second_window_at_the_right_characters(tmp_path):
    """From random initialisation on synthetic SQuAD rows (the answer is the capitalised word),
    through `python -m lm.train` and `lm.predict`. Stated before running: dev exact match
    >= 90% after 400 steps, and a 155-character context whose answer lies only in its second
    window is answered at the right character offsets."""
    train_path = write_jsonl(tmp_path / "train.jsonl", span_rows(1500, 1, length=(4, 26)))
    dev_path = write_jsonl(tmp_path / "dev.jsonl", span_rows(100, 2, length=(20, 26)))
    workdir = tmp_path / "span"
    flags = [f"--config.{k}={v}" for k, v in {**SPAN, "train.steps": 400,
                                              "train.eval_every": 400, "data.path": train_path,
                                              "data.eval_path": dev_path}.items()]
    proc = subprocess.run([sys.executable, "-m", "lm.train", "--config",
                           "configs/finetune.py:span", "--workdir", str(workdir), *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=900, env=ONE_DEVICE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    [ev] = [r for r in recs if "eval_exact" in r]
    print(ev)
    assert ev["eval_exact"] >= 90 and ev["eval_f1"] >= ev["eval_exact"]

    long_row = squad_row(0, ["cedar", "maple", "river", "stone", "amber"] * 5, "OTTER", 12)
    start = long_row["answers"]["answer_start"][0]
    (tmp_path / "ask.jsonl").write_text(json.dumps({"question": "who?",
                                                    "context": long_row["context"]}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "lm.predict", "--checkpoint", str(workdir),
                           "--input", str(tmp_path / "ask.jsonl")], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [out] = [json.loads(x) for x in proc.stdout.splitlines()]
    assert (out["answer"], out["start"], out["end"]) == ("OTTER", start, start + 5), out
    assert out["context"][out["start"]:out["end"]] == "OTTER" and 0 < out["score"] <= 1


SMALL = {"model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2,
         "model.num_kv_heads": 2, "model.mlp_dim": 64, "model.vocab_size": 258,
         "model.max_len": 64, "train.seq_len": 32, "train.batch_size": 8, "train.steps": 4,
         "train.eval_every": 4, "train.log_every": 1, "train.progress": False,
         "data.tokenizer": "bytes", "checkpoint.async_save": False}


def classify_rows(n, seed):
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))),
             **({"text_pair": rng.choice(WORDS)} if i % 3 == 0 else {}),
             "label": ["bad", "good"][i % 2]} for i in range(n)]


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def classify_workdir(request, tmp_path_factory):
    """A classify head trained 4 steps from random initialisation on 8 devices (bytes)."""
    from lm import train
    from lm.config import from_config_dict, load_config_file, override
    d = tmp_path_factory.mktemp(f"classify-{request.param}")
    cfg = override(load_config_file(os.path.join(ROOT, "configs/finetune.py:classify")),
                   **SMALL, **{"model.style": request.param, "model.norm_eps": 1e-5,
                               "data.path": write_jsonl(d / "train.jsonl", classify_rows(40, 0)),
                               "data.eval_path": write_jsonl(d / "dev.jsonl",
                                                             classify_rows(13, 1))})
    train.train(from_config_dict(cfg), str(d / "run"))
    return d / "run"


def test_a_classify_run_stores_its_labels_and_logs_task_metrics(classify_workdir):
    recs = [json.loads(x) for x in (classify_workdir / "metrics.jsonl").read_text().splitlines()]
    [ev] = [r for r in recs if "eval_accuracy" in r]
    assert 0 <= ev["eval_accuracy"] <= 1 and 0 <= ev["eval_f1"] <= 1 and ev["eval_loss"] > 0
    from lm.checkpoint import checkpoint_config
    saved, _ = checkpoint_config(str(classify_workdir))
    assert json.loads(saved["task"]["labels"]) == ["bad", "good"]
    assert saved["task"]["num_labels"] == 2


def test_predictions_do_not_depend_on_the_batch_or_its_padding(classify_workdir):
    """A row's probabilities alone equal those in a batch padded to a longer row's bucket (BERT
    masks the padded keys; a decoder pools its last real token)."""
    enc = finetune.Encoder.from_checkpoint(str(classify_workdir), batch_size=4)
    tok = enc.tokenizer
    rows = [finetune.encode_classify(tok, t, None, 32) for t in ("maple", "river stone " * 2)]
    alone = enc.forward(rows[:1])["probs"][0]
    assert {len(r[0]) for r in rows} == {5, 24}  # buckets 16 and 32
    together = enc.forward(rows)["probs"][0]
    np.testing.assert_allclose(alone, together, atol=1e-5)
    [result] = enc.classify([{"text": "maple"}])
    assert result["probs"] == pytest.approx(dict(zip(["bad", "good"], map(float, alone))),
                                            abs=1e-6)


def test_the_exported_head_runs_without_the_model_code_and_agrees(classify_workdir, tmp_path):
    from lm import export
    meta = export.export(str(classify_workdir), str(tmp_path / "exp"))
    assert meta["kind"] == "encoder" and meta["labels"] == ["bad", "good"]
    exported = export.load(str(tmp_path / "exp"))
    enc = finetune.Encoder.from_checkpoint(str(classify_workdir), batch_size=2)
    rows = [finetune.encode_classify(enc.tokenizer, t, p, 32) for t, p in
            (("cedar frost", None), ("amber", "tulip velvet"))]
    feats = finetune._pad([r[0] for r in rows], [r[1] for r in rows], 24, enc.tokenizer.pad_id)
    got = exported.encode(feats["tokens"], feats["token_types"], feats["lengths"])
    np.testing.assert_allclose(np.asarray(got["probs"]), np.stack(enc.forward(rows)["probs"]),
                               atol=1e-5)
