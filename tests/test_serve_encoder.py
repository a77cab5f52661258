"""`python -m lm.serve` on an encoder (a tiny classify checkpoint): /classify and /v1/embeddings
through the official `openai` client and raw HTTP, dynamic batching (lm/batcher.py), errors."""
import concurrent.futures
import http.client
import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT
from lm import serve
from lm.batcher import Batcher

TEXTS = ["good film", "bad film", "a fine day out", "awful, awful", "loved it", "hated it",
         "the plot was thin", "great cast and a great score", "boring", "wonderful",
         "not my cup of tea", "would watch again", "meh", "a classic", "dull and long",
         "bright and short"]


def _http(port, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, text


def _metrics(port) -> dict:
    status, text = _http(port, "GET", "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class Served:
    """`python -m lm.serve` in a process of its own; `port` waits for it to listen."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "lm.serve", "--port", "0", *args],
                                     cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._port = None

    @property
    def port(self) -> int:
        if self._port is None:
            line = self.proc.stdout.readline()
            if "http://" not in line:
                self.proc.kill()
                raise RuntimeError(f"lm.serve did not start: {line}"
                                   f"{self.proc.stderr.read()[-3000:]}")
            assert "encoder, task classify" in line, line
            self._port = int(line.rsplit(":", 1)[1].split()[0])
        return self._port

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x",
                             max_retries=0, timeout=60)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# Processes of their own: one device, and XLA's quick compiles (optimisation level 0, 3x faster
# to compile on CPU; the same arithmetic, as the comparisons with the in-process encoder show).
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
       "--xla_backend_optimization_level=0", "PYTHONUNBUFFERED": "1"}
TRAIN = """
import sys
from lm import train
from lm.config import from_config_dict, load_config_file, override
cfg = override(load_config_file("configs/finetune.py:classify"), **{
    "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2, "model.num_kv_heads": 2,
    "model.mlp_dim": 64, "model.vocab_size": 258, "model.max_len": 64, "train.seq_len": 32,
    "train.batch_size": 8, "train.steps": 3, "train.progress": False, "data.path": sys.argv[1],
    "data.eval_path": "", "data.tokenizer": "bytes"})
train.train(from_config_dict(cfg), sys.argv[2])
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny BERT classifier (byte tokenizer, labels a / b) trained 3 steps by lm.train."""
    tmp = tmp_path_factory.mktemp("encoder")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "ab"[i % 2]}) + "\n"
                            for i, t in enumerate(TEXTS)))
    proc = subprocess.run([sys.executable, "-c", TRAIN, str(data), str(tmp / "run")], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(tmp / "run")


@pytest.fixture(scope="module")
def served(workdir):
    s = Served("--checkpoint", workdir, "--model-name", "m", "--max-batch-size", "8",
               "--preferred-batch-sizes",
               "4,8", "--max-queue-delay-ms", "30", "--max-queue-size", "64")
    yield s
    s.close()


@pytest.fixture(scope="module")
def encoder(workdir, served):  # loads (and compiles) while the server process starts
    from lm.finetune import Encoder
    return Encoder.from_checkpoint(workdir, 8)


def _rows():
    """32 rows of different lengths, some pairs."""
    return [{"text": (TEXTS[i % 16] + " ") * (1 + i % 3)} | (
        {"text_pair": TEXTS[(i * 5) % 16]} if i % 4 == 1 else {}) for i in range(32)]


def _close(got, want):
    assert got["label"] == want["label"]
    assert got["probs"].keys() == want["probs"].keys()
    for k in want["probs"]:
        assert abs(got["probs"][k] - want["probs"][k]) < 1e-5, (got, want)


def test_32_concurrent_classify_requests_equal_their_one_at_a_time_answers(served, encoder):
    rows = _rows()
    alone = [encoder.classify([r])[0] for r in rows]  # each in a batch of its own
    for i in (0, 5):  # one at a time through the server: the same
        status, text = _http(served.port, "POST", "/classify", {"inputs": [rows[i]]})
        assert status == 200, text
        _close(json.loads(text)["results"][0], alone[i])
    before = _metrics(served.port)

    def ask(i):
        status, text = _http(served.port, "POST", "/classify", {"inputs": [rows[i]]})
        assert status == 200, text
        return json.loads(text)["results"]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32)))
    for g, w in zip(got, alone):
        assert len(g) == 1
        _close(g[0], w)
    after = _metrics(served.port)

    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    m = (("model_name", "m"),)
    batches = delta("lm_encoder_batch_size_count", m)
    assert delta("lm_encoder_batch_size_sum", m) == 32
    assert 0 < batches < 32  # rows shared forward passes
    assert delta("lm_encoder_batch_size_bucket", (("le", "1.0"),) + m) < batches
    assert delta("lm_requests_total", (("status", "200"),)) == 32

    # One request of 11 rows (bare strings) is split over batches of at most 8, in order.
    texts = [r["text"] for r in rows[:11]]
    status, text = _http(served.port, "POST", "/classify", {"inputs": texts})
    assert status == 200, text
    for g, t in zip(json.loads(text)["results"], texts):
        _close(g, encoder.classify([{"text": t}])[0])
    status, health = _http(served.port, "GET", "/health")
    health = json.loads(health)
    assert status == 200 and health["queue"] == 0 and health["failed_batches"] == 0


def test_embeddings_through_the_openai_client(served, encoder):
    client = served.client()
    texts = ["good film", "a much longer sentence about a film, and then some", "x"]
    want = encoder.embed(texts)
    out = client.embeddings.create(model="m", input=texts)  # the client asks for base64
    assert [d.index for d in out.data] == [0, 1, 2]
    got = np.array([d.embedding for d in out.data])
    assert got.shape == (3, encoder.cfg.d_model)
    np.testing.assert_allclose(got, want, atol=1e-5)
    tokens = sum(min(len(t.encode()), 32) for t in texts)  # bytes (no [CLS]), cut
    assert out.usage.prompt_tokens == out.usage.total_tokens == tokens
    one = client.embeddings.create(model="m", input="good film", encoding_format="float",
                                   dimensions=encoder.cfg.d_model)
    np.testing.assert_allclose(one.data[0].embedding, want[0], atol=1e-5)
    status, text = _http(served.port, "POST", "/v1/embeddings", {"input": ["x"]})
    body = json.loads(text)
    assert status == 200 and body["object"] == "list" and body["data"][0]["object"] == \
        "embedding" and isinstance(body["data"][0]["embedding"][0], float)
    models = client.models.list().data
    assert len(models) == 1 and models[0].model_extra["task"] == "classify"


@pytest.mark.parametrize("path, body, field", [
    ("/classify", None, "invalid JSON"),
    ("/classify", {}, "inputs"),
    ("/classify", {"inputs": 5}, "inputs"),
    ("/classify", {"inputs": []}, "inputs"),
    ("/classify", {"inputs": [{"text": 3}]}, "inputs[0].text"),
    ("/classify", {"inputs": ["ok", {"text": ""}]}, "inputs[1].text"),
    ("/classify", {"inputs": [{"text": "a", "text_pair": ["b"]}]}, "inputs[0].text_pair"),
    ("/classify", {"inputs": [{"question": "q", "context": "c"}]}, "inputs[0].context"),
    ("/classify", {"inputs": [7]}, "inputs[0]"),
    ("/classify", {"inputs": ["a"] * 65}, "inputs"),  # more rows than the queue holds (64)
    ("/classify", {"inputs": ["a"], "top_k": 2}, "top_k"),
    ("/v1/embeddings", {}, "input"),
    ("/v1/embeddings", {"input": 5}, "input"),
    ("/v1/embeddings", {"input": ["a", None]}, "input[1]"),
    ("/v1/embeddings", {"input": [1, 2, 3]}, "token ids"),
    ("/v1/embeddings", {"input": [""]}, "input[0]"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "a", "dimensions": 7}, "dimensions"),
    ("/v1/embeddings", {"input": "a", "model": 3}, "model"),
])
def test_bad_requests_get_400_naming_the_field(served, path, body, field):
    status, text = _http(served.port, "POST", path, body=body,
                         raw="{nope" if body is None else None)
    assert status == 400, text
    error = json.loads(text)["error"]
    assert field in error["message"] and error["type"] == "invalid_request_error", error


def test_decoder_endpoints_on_an_encoder_get_a_clear_404(served):
    with pytest.raises(openai.NotFoundError, match="encoder checkpoint"):
        served.client().completions.create(model="m", prompt="hi", max_tokens=2)
    status, text = _http(served.port, "POST", "/v1/chat/completions", {"messages": []})
    assert status == 404 and "/classify" in text


def _in_process(models, **limits) -> serve.HTTPServer:
    """An `lm.serve.App` over `models` behind uvicorn in a thread of this process."""
    return serve.HTTPServer(serve.App(models, serve.Limits(**limits)), "127.0.0.1", 0).start()


def test_full_queue_gets_429_at_once_and_a_late_request_503(encoder):
    """The first rows wait up to the queue delay (1.5 s) for others: meanwhile a queue of 2
    rows is full, and a 0.5 s timeout passes (the rows are withdrawn, never run)."""
    model = serve.encoder_model("m", encoder, max_batch_size=4, max_queue_delay_ms=1500,
                                max_queue_size=2, warm_up=False)
    server = _in_process([model], timeout_s=0.5)
    port = server.port
    try:
        body = {"inputs": ["good film"]}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = [pool.submit(_http, port, "POST", "/classify", body) for _ in range(2)]
            time.sleep(0.2)
            t = time.monotonic()
            status, text = _http(port, "POST", "/classify", body)
            assert status == 429 and "queue is full" in text, text
            assert time.monotonic() - t < 0.3
            late = [f.result() for f in first]
        assert [s for s, _ in late] == [503, 503]
        assert "not finished within 0.5 s" in late[0][1]
        m = _metrics(port)
        assert m[("lm_requests_total", (("status", "429"),))] == 1
        assert m[("lm_requests_total", (("status", "503"),))] == 2
        status, health = _http(port, "GET", "/health")
        health = json.loads(health)
        assert status == 200 and health["queue"] == 0 and health["batches"] == 0
    finally:
        server.stop()


def test_a_failed_batch_answers_500_and_the_batcher_keeps_serving(encoder):
    def run(kind, rows, padded):
        if any(r["text"] == "boom" for r in rows):
            raise RuntimeError("the forward broke")
        return [{"label": "a", "probs": {"a": 1.0, "b": 0.0}} for _ in rows]

    batcher = Batcher(run, max_batch_size=4, max_queue_delay_s=0, max_queue_size=8)
    batcher.start()
    server = _in_process([serve.EncoderModel("m", encoder, batcher)], timeout_s=5)
    port = server.port
    try:
        status, text = _http(port, "POST", "/classify", {"inputs": ["ok", "boom"]})
        error = json.loads(text)["error"]
        assert status == 500 and error["type"] == "server_error" and error["code"] == 500
        assert "the forward broke" in error["message"]
        status, text = _http(port, "POST", "/classify", {"inputs": ["ok"]})
        assert status == 200 and json.loads(text)["results"][0]["label"] == "a"
        status, health = _http(port, "GET", "/health")
        assert status == 200 and json.loads(health)["failed_batches"] == 1
    finally:
        server.stop()


def test_encoder_endpoints_on_a_decoder_and_classify_on_a_masked_lm(encoder):
    from lm.scheduler import Metrics
    sched = types.SimpleNamespace(tokenizer=None, slots=types.SimpleNamespace(max_len=64),
                                  metrics=Metrics())
    server = _in_process([serve.DecoderModel("d", sched, vocab_size=10)], timeout_s=1)
    port = server.port
    try:
        for path in ("/v1/embeddings", "/classify"):
            status, text = _http(port, "POST", path, {"input": "x", "inputs": ["x"]})
            assert status == 404 and "decoder (text generation) checkpoint" in text, text
    finally:
        server.stop(workers=False)
    mlm = types.SimpleNamespace(task=types.SimpleNamespace(name="mlm"), cfg=encoder.cfg,
                                tokenizer=encoder.tokenizer, seq_len=32)
    batcher = Batcher(lambda *a: [], max_batch_size=2, max_queue_delay_s=0, max_queue_size=2)
    batcher.start()
    server = _in_process([serve.EncoderModel("bert", mlm, batcher)], timeout_s=1)
    port = server.port
    try:
        status, text = _http(port, "POST", "/classify", {"inputs": ["x"]})
        assert status == 400 and "task 'mlm'" in text and "/v1/embeddings" in text, text
    finally:
        server.stop()


def test_bad_preferred_batch_sizes_exit_2(workdir, capsys):
    for value in ("9", "4,x", "0"):
        with pytest.raises(SystemExit) as e:
            serve.main(["--checkpoint", workdir, "--max-batch-size", "8",
                        "--preferred-batch-sizes", value])
        assert e.value.code == 2
        assert "--preferred-batch-sizes" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The batcher alone (no model, no HTTP)


def test_batcher_splits_merges_and_launches_preferred_sizes_at_once():
    batches = []

    def run(kind, rows, padded):
        batches.append((kind, len(rows), padded))
        return [(kind, r * 10) for r in rows]

    b = Batcher(run, max_batch_size=4, max_queue_delay_s=0.3, max_queue_size=32,
                preferred=(2,))
    jobs = [b.submit("x", list(range(n))) for n in (3, 7, 1)] + [b.submit("y", [5])]
    t = time.monotonic()
    b.start()
    try:
        for job in jobs:
            assert job.finished.wait(5) and job.error is None
        assert jobs[0].results == [("x", 0), ("x", 10), ("x", 20)]
        assert jobs[1].results == [("x", r * 10) for r in range(7)]
        assert jobs[2].results == [("x", 0)] and jobs[3].results == [("y", 50)]
        assert [n for kind, n, _ in batches if kind == "x"] == [4, 4, 2, 1]  # 11 rows of kind x
        assert all(padded == (2 if n <= 2 else 4) for _, n, padded in batches)
        # The last rows of each kind waited for the queue delay; 2 rows go at once.
        assert time.monotonic() - t >= 0.3
        t = time.monotonic()
        job = b.submit("x", [1, 2])
        assert job.finished.wait(5) and time.monotonic() - t < 0.25
        assert b.submit("x", list(range(33))) is None  # beyond the queue: refused
    finally:
        b.stop()


def test_batcher_failure_fails_only_the_requests_in_the_batch():
    def run(kind, rows, padded):
        if "boom" in rows:
            raise ValueError("no")
        return rows

    b = Batcher(run, max_batch_size=2, max_queue_delay_s=5, max_queue_size=8)
    a, bad, c = b.submit("x", ["a"]), b.submit("x", ["boom", "b"]), b.submit("x", ["c", "d"])
    b.start()
    try:
        for job in (a, bad, c):
            assert job.finished.wait(5)
        # a and "boom" share the first batch; "b" (the failed request's) is withdrawn.
        assert a.error == bad.error and "ValueError: no" in a.error
        assert c.error is None and c.results == ["c", "d"]
        assert b.thread.is_alive() and b.queued == 0 and b.failures == 1
    finally:
        b.stop()
