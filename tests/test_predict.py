"""`lm.predict`: masked-token filling with a converted random BertForMaskedLM, against
`transformers`' top-k on the same rows; batching, padding and bad lines."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from lm import predict
from lm.convert import from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert import BERT_VOCAB, hf_model, save_bert  # noqa: E402

_rng = np.random.default_rng(2)
IDS20, TYPES20 = _rng.integers(0, 320, 20).tolist(), _rng.integers(0, 3, 20).tolist()
IDS33 = _rng.integers(0, 320, 33).tolist()
LINES = [
    json.dumps({"text": "the cat [MASK] on the mat ."}),
    json.dumps({"input_ids": IDS20, "token_type_ids": TYPES20, "positions": [0, 7, 19]}),
    "{not json",
    json.dumps({"input_ids": [2, 400, 3], "positions": [1]}),
    json.dumps({"text": "[MASK] dog ran , the [MASK] sat"}),
    json.dumps({"input_ids": [2, 10, 4, 11, 4, 3]}),  # positions: where the [MASK]s are
    json.dumps({"input_ids": IDS33, "positions": [32, 0, 5]}),
    json.dumps({"input_ids": [5] * 41, "positions": [0]}),
    json.dumps({"input_ids": [2, 5, 3], "positions": [3]}),
    json.dumps({"input_ids": [2, 5, 3], "positions": [1] * 20}),  # more positions than tokens
    "",
]
ERRORS = {3: "line 3: invalid JSON", 4: "line 4: input_ids: 400 is out of range [0, 320)",
          8: "line 8: 41 tokens exceed the model's max_len (40)",
          9: "line 9: positions: 3 is out of range [0, 3)"}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    model, tok = save_bert(d, "mlm", lowercase=True)
    from_hf(str(d / "hf"), str(d / "lm"))
    (d / "in.jsonl").write_text("\n".join(LINES) + "\n")
    return d, model, tok


@pytest.fixture(scope="module")
def by8(bert):
    """The input file filled 8 rows a batch: (exit status, output rows, stderr)."""
    import contextlib
    import io
    d, _, _ = bert
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = predict.main(["--checkpoint", str(d / "lm"), "--input", str(d / "in.jsonl"),
                               "--batch-size", "8"])
    return status, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


def run_main(capsys, *args):
    status = predict.main(list(map(str, args)))
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines()], err


def hf_top5(model, ids, types, positions, limit):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]),
                       token_type_ids=torch.tensor([types])).logits[0, positions, :limit]
    values, top = torch.topk(logits, 5, dim=-1)
    return top.numpy(), values.numpy()


def test_fill_matches_transformers_top5_and_bad_lines_get_error_rows(bert, by8):
    _, model, tok = bert
    status, rows, err = by8
    assert status == 0 and len(rows) == 10  # the blank line is no row
    assert "6 rows filled, 4 in error" in err
    worst = 0.0
    for n, (line, row) in enumerate(zip(LINES, rows), 1):
        if n in ERRORS:
            assert set(row) == {"error"} and row["error"].startswith(ERRORS[n]), row
            continue
        given = json.loads(line)
        assert {k: row[k] for k in given} == given  # the input row, plus "fill"
        ids = tok(given["text"]).input_ids if "text" in given else given["input_ids"]
        types = given.get("token_type_ids", [0] * len(ids))
        positions = given.get("positions", [p for p, i in enumerate(ids) if i == 4])
        assert [f["position"] for f in row["fill"]] == positions and positions
        top, values = hf_top5(model, ids, types, positions, len(BERT_VOCAB))
        for f, hf_ids, hf_values in zip(row["fill"], top, values):
            assert f["top_ids"] == hf_ids.tolist()  # never an id past the tokenizer's 72
            np.testing.assert_allclose(f["top_logits"], hf_values, atol=1e-4, rtol=1e-4)
            worst = max(worst, float(np.abs(np.array(f["top_logits"]) - hf_values).max()))
            assert f["top_tokens"] == [BERT_VOCAB[i] for i in f["top_ids"]]
    print(f"largest top-5 logit difference from transformers: {worst:.2e}")


def test_batch_size_one_gives_the_same_output(bert, by8, capsys, tmp_path):
    d, _, _ = bert
    by8 = by8[1]
    status, by1, _ = run_main(capsys, "--checkpoint", d / "lm", "--input", d / "in.jsonl",
                              "--batch-size", 1, "--output", tmp_path / "out.jsonl")
    assert status == 0 and by1 == []  # --output: nothing on stdout
    by1 = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(by1) == len(by8)
    for a, b in zip(by1, by8):
        assert a.keys() == b.keys()
        if "fill" in a:
            assert [f["top_ids"] for f in a["fill"]] == [f["top_ids"] for f in b["fill"]]
            np.testing.assert_allclose([f["top_logits"] for f in a["fill"]],
                                       [f["top_logits"] for f in b["fill"]], atol=1e-5)
        else:
            assert a == b


def test_without_a_tokenizer_ids_need_positions(bert, capsys, tmp_path):
    d, _, _ = bert
    shutil.copytree(d / "lm", tmp_path / "lm")
    (tmp_path / "lm" / "data.json").unlink()
    lines = [{"text": "the [MASK]"}, {"input_ids": [2, 4, 3]},
             {"input_ids": [2, 4, 300, 3], "positions": [1, 2]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    status, rows, _ = run_main(capsys, "--checkpoint", tmp_path / "lm", "--input",
                               tmp_path / "in.jsonl")
    assert status == 0
    assert rows[0]["error"].startswith("line 1: 'text' needs a tokenizer")
    assert rows[1]["error"].startswith("line 2: no 'positions'")
    # No tokenizer: the whole embedding may be proposed, and there are no token strings.
    assert [f["position"] for f in rows[2]["fill"]] == [1, 2]
    assert "top_tokens" not in rows[2]["fill"][0]


def test_a_decoder_checkpoint_is_refused(tmp_path, capsys):
    hf_model("gpt2").save_pretrained(tmp_path / "hf", safe_serialization=True)
    from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    (tmp_path / "in.jsonl").write_text('{"input_ids": [1, 2], "positions": [0]}\n')
    status, rows, err = run_main(capsys, "--checkpoint", tmp_path / "lm", "--input",
                                 tmp_path / "in.jsonl")
    assert status == 2 and rows == []
    assert "lm.predict fills masked tokens of a BERT-style (task mlm) checkpoint; use " \
           "lm.generate for decoders" in err


def test_the_command_line(bert):
    d, _, _ = bert
    proc = subprocess.run([sys.executable, "-m", "lm.predict", "--checkpoint", str(d / "lm"),
                           "--input", "-"], input=LINES[0] + "\n{oops\n", capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows[0]["fill"]) == 1 and rows[1]["error"].startswith("line 2: invalid JSON")
    assert "1 rows filled, 1 in error" in proc.stderr


def test_the_next_sentence_logits_of_a_pretraining_checkpoint(tmp_path):
    from test_convert import hf_bert
    model = hf_bert("pretraining")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    predictor = predict.Predictor.from_checkpoint(str(tmp_path / "lm"), batch_size=2)
    rows = [{"input_ids": IDS20, "token_type_ids": TYPES20, "positions": [3]},
            {"input_ids": IDS20[:11], "positions": [0, 10]}]
    results = predictor.run([predictor.prepare(r) for r in rows])
    for row, result in zip(rows, results):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([row["input_ids"]]), token_type_ids=torch.tensor(
                [row.get("token_type_ids", [0] * len(row["input_ids"]))]))
        np.testing.assert_allclose(result["nsp_logits"], out.seq_relationship_logits[0].numpy(),
                                   atol=1e-4, rtol=1e-4)
        top = torch.topk(out.prediction_logits[0, row["positions"]], 5, dim=-1).indices
        assert [f["top_ids"] for f in result["fill"]] == top.tolist()
