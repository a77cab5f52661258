"""The ONNX export (lm.onnx_export, `python -m lm.export --format onnx`): onnxruntime runs the
exported prefill, decode step and encoder head with lm's numbers (float32, within 1e-4), at
batch sizes and lengths other than any traced, and the Triton configs name the graphs' own
inputs and outputs."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import onnx
import pytest

from conftest import ROOT, small_run
from lm import onnx_export
from lm.generate import Engine

TOL = 1e-4


@pytest.fixture(scope="module")
def gpt2_export(trained_workdir, tmp_path_factory):
    """The shared gpt2-style checkpoint exported by the command line."""
    out = tmp_path_factory.mktemp("onnx") / "gpt2"
    proc = subprocess.run([sys.executable, "-m", "lm.export", "--checkpoint",
                           str(trained_workdir), "--out", str(out), "--format", "onnx"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported prefill and decode step (ONNX)" in proc.stdout
    return out


@pytest.fixture(scope="module")
def llama_workdir(tmp_path_factory):
    """A llama-style model (RoPE, grouped-query attention: 4 heads, 2 kv heads), 1 step."""
    from lm import train
    out = tmp_path_factory.mktemp("llama") / "run"
    train.train(small_run(**{"model.style": "llama", "model.num_kv_heads": 2,
                             "train.steps": 1, "train.sample_tokens": 0, "train.progress": False,
                             "train.eval_every": 1, "train.eval_batches": 1, "mesh.data": 8,
                             "checkpoint.every": 1}), str(out))
    return out


def _prompts(rng, lengths, vocab):
    """Right-padded random prompts [b, max(lengths)] (padding 0) and their lengths [b]."""
    lengths = np.asarray(lengths, np.int32)
    tokens = rng.integers(0, vocab, (len(lengths), lengths.max())).astype(np.int32)
    return np.where(np.arange(lengths.max()) < lengths[:, None], tokens, 0), lengths


def _max_diff(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max())


def check_decoder(workdir, out, rng):
    """prefill then 4 decode steps, each side feeding its own cache back: onnxruntime's logits
    (and caches) equal the engine's. Returns the largest logit difference seen."""
    engine = Engine.from_checkpoint(str(workdir))
    meta = json.loads((out / "export.json").read_text())
    sess = onnx_export.sessions(str(out))
    prefill, decode = jax.jit(engine.prefill_fn), jax.jit(engine.decode_fn)
    present = onnx_export.cache_names(meta["num_layers"], "present")
    past = onnx_export.cache_names(meta["num_layers"], "past")
    worst = 0.0
    for lengths in ([5, 9, 1, 12], [3, 2]):  # two batch sizes and prompt lengths
        tokens, lengths = _prompts(rng, lengths, meta["vocab_size"])
        want, cache = prefill(engine.params, tokens, lengths)
        got = sess["prefill"].run(None, {"tokens": tokens, "lengths": lengths})
        assert got[0].shape == (len(lengths), meta["vocab_size"])
        worst = max(worst, _max_diff(got[0], want))
        want_cache = list(cache["k"]) + list(cache["v"])
        assert max(_max_diff(g, w) for g, w in zip(got[1:], want_cache)) < TOL
        onnx_cache = dict(zip(past, got[1:]))
        positions = lengths.copy()
        for _ in range(4):
            step = np.asarray(want).argmax(-1).astype(np.int32)
            want, cache = decode(engine.params, step, positions, cache)
            got = sess["decode"].run(None, {"tokens": step, "positions": positions,
                                            **onnx_cache})
            worst = max(worst, _max_diff(got[0], want))
            onnx_cache = dict(zip(past, got[1:]))
            positions = positions + 1
        assert [o.name for o in sess["decode"].get_outputs()] == ["logits"] + present
    assert worst < TOL, worst
    return worst


def test_gpt2_prefill_and_decode_steps_match_the_engine(trained_workdir, gpt2_export):
    worst = check_decoder(trained_workdir, gpt2_export, np.random.default_rng(0))
    print(f"gpt2: max |logit difference| {worst:.2e}")


def test_llama_gqa_rope_prefill_and_decode_steps_match_the_engine(llama_workdir, tmp_path):
    meta = onnx_export.export(str(llama_workdir), str(tmp_path / "llama"))
    assert meta["num_kv_heads"] == 2 and meta["kind"] == "decoder"
    worst = check_decoder(llama_workdir, tmp_path / "llama", np.random.default_rng(1))
    print(f"llama: max |logit difference| {worst:.2e}")


def test_the_command_line_writes_the_files_and_rejects_a_bad_format(trained_workdir,
                                                                     gpt2_export, tmp_path):
    names = sorted(os.listdir(gpt2_export))
    assert {"prefill.onnx", "decode.onnx", "export.json", "triton"} <= set(names), names
    meta = json.loads((gpt2_export / "export.json").read_text())
    assert (meta["format"], meta["kind"], meta["max_len"]) == ("onnx", "decoder", 64)
    assert meta["functions"]["prefill"]["inputs"][0] == {"name": "tokens", "dtype": "int32",
                                                         "shape": ["B", "P"]}
    if meta["tokenizer"] and meta["tokenizer"].get("file"):
        assert (gpt2_export / meta["tokenizer"]["file"]).exists()
    # Standalone: the weights are inside the graph, not beside it.
    graph = onnx.load(str(gpt2_export / "prefill.onnx")).graph
    assert {i.name for i in graph.input} == {"tokens", "lengths"}
    assert sum(np.prod(t.dims) for t in graph.initializer) >= 384 * 64  # the embedding at least
    export = [sys.executable, "-m", "lm.export", "--checkpoint", str(trained_workdir),
              "--out", str(tmp_path / "x")]
    for extra, message in [(["--format", "tflite"], "invalid choice: 'tflite'"),
                           (["--format", "onnx", "--platforms", "cuda"], "--platforms applies")]:
        proc = subprocess.run(export + extra, capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def _pbtxt_io(text: str) -> dict:
    """{"input": [(name, data_type, dims)], "output": [...]} of a config.pbtxt."""
    out = {}
    for kind in ("input", "output"):
        block = re.search(rf"^{kind} \[(.*?)^\]", text, re.S | re.M).group(1)
        out[kind] = [(m[0], m[1], [int(d) for d in m[2].split(",") if d.strip()])
                     for m in re.findall(r'name: "([^"]+)"\s+data_type: (\w+)\s+dims: \[([^\]]*)\]',
                                         block)]
    return out


def check_triton(out):
    """Each Triton model's config names exactly its ONNX graph's inputs and outputs, with
    their dtypes, and -1 where the graph's dimension is dynamic."""
    meta = json.loads((out / "export.json").read_text())
    assert meta["triton"]
    for name, model_dir in meta["triton"].items():
        text = (out / model_dir / "config.pbtxt").read_text()
        assert f'name: "{name}"' in text and 'platform: "onnxruntime_onnx"' in text
        batch = int(re.search(r"max_batch_size: (\d+)", text).group(1))
        graph = onnx.load(str(out / model_dir / "1" / "model.onnx")).graph
        config = _pbtxt_io(text)
        for kind, values in (("input", graph.input), ("output", graph.output)):
            assert [c[0] for c in config[kind]] == [v.name for v in values], (name, kind)
            for (_, dtype, dims), v in zip(config[kind], values):
                assert dtype == {1: "TYPE_FP32", 6: "TYPE_INT32"}[v.type.tensor_type.elem_type]
                shape = [d.dim_value or -1 for d in v.type.tensor_type.shape.dim]
                want = shape[1:] if batch else shape
                assert dims == (want or [1]), (name, v.name, dims, shape)
        assert ("dynamic_batching" in text) == (batch > 0)
    return meta


def test_triton_configs_name_what_the_graphs_have(gpt2_export):
    meta = check_triton(gpt2_export)
    assert set(meta["triton"]) == {"prefill", "decode"}


# ---------------------------------------------------------------------------------------------
# An encoder head


@pytest.fixture(scope="module")
def classify_workdir(tmp_path_factory):
    """A tiny BERT classify head trained 4 steps (bytes; test_finetune's set-up)."""
    from test_finetune import SMALL, classify_rows, write_jsonl

    from lm import train
    from lm.config import from_config_dict, load_config_file, override
    d = tmp_path_factory.mktemp("classify")
    cfg = override(load_config_file(os.path.join(ROOT, "configs/finetune.py:classify")),
                   **SMALL, **{"model.style": "bert", "model.norm_eps": 1e-5,
                               "data.path": write_jsonl(d / "train.jsonl", classify_rows(40, 0)),
                               "data.eval_path": ""})
    train.train(from_config_dict(cfg), str(d / "run"))
    return d / "run"


def test_encoder_classify_probs_and_pooled_match_lm(classify_workdir, tmp_path):
    from lm.finetune import encoder_function
    from lm.predict import load_checkpoint
    out = tmp_path / "enc"
    meta = onnx_export.export(str(classify_workdir), str(out))
    assert (meta["kind"], meta["task"], meta["labels"]) == ("encoder", "classify", ["bad", "good"])
    run, params, _ = load_checkpoint(str(classify_workdir))
    forward = jax.jit(encoder_function(run))
    sess = onnx_export.sessions(str(out))["encoder"]
    assert [o.name for o in sess.get_outputs()] == ["pooled", "probs"]
    rng = np.random.default_rng(2)
    worst = 0.0
    for lengths in ([3, 17, 8], [30, 1, 12, 5, 9]):
        tokens, lengths = _prompts(rng, lengths, 258)
        types = (np.arange(tokens.shape[1]) >= lengths[:, None] // 2).astype(np.int32)
        want = forward(params, tokens, types, lengths)
        pooled, probs = sess.run(None, {"tokens": tokens, "token_types": types,
                                        "lengths": lengths})
        assert probs.shape == (len(lengths), 2)
        worst = max(worst, _max_diff(probs, want["probs"]), _max_diff(pooled, want["pooled"]))
    print(f"encoder: max |difference| {worst:.2e}")
    assert worst < TOL, worst
    meta = check_triton(out)
    assert set(meta["triton"]) == {"encoder"}
