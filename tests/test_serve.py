"""`python -m lm.serve`: a real server process driven by the official `openai` client and raw
HTTP requests."""
import concurrent.futures
import http.client
import json
import os
import subprocess
import sys
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT
from lm.generate import Engine, SamplingParams, text_of


class Served:
    def __init__(self, *args):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
               "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "lm.serve", "--port", "0", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"lm.serve did not start: {line}{self.proc.stderr.read()[-3000:]}")
        self.port = int(line.rsplit(":", 1)[1].split()[0])
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none",
                                    max_retries=0, timeout=120)

    def request(self, method, path, body=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        return resp.status, text

    def metrics(self) -> dict:
        status, text = self.request("GET", "/metrics")
        assert status == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def engine(trained_workdir):
    return Engine.from_checkpoint(str(trained_workdir))


@pytest.fixture(scope="module")
def server(trained_workdir):
    s = Served("--checkpoint", str(trained_workdir), "--max-batch-size", "8",
               "--max-queue-size", "100", "--max-queue-delay-ms", "20")
    yield s
    s.close()


def test_openai_client_completions_streaming_n_and_stop(server, engine):
    tok = engine.tokenizer
    stop_ids = (tok.eod_id,)
    prompt = "def main("
    ids = [int(t) for t in tok.encode(prompt)]
    greedy = engine.generate([ids], SamplingParams(max_new_tokens=12, stop_ids=stop_ids))[0]

    out = server.client.completions.create(model="m", prompt=prompt, max_tokens=12,
                                           temperature=0)
    assert out.choices[0].text == text_of(greedy, tok)
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(greedy)

    chunks = list(server.client.completions.create(model="m", prompt=prompt, max_tokens=12,
                                                   temperature=0, stream=True))
    assert len(chunks) > 2  # token by token
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason

    # n choices with a seed: choice j is what the engine gives seed + j.
    out = server.client.completions.create(model="m", prompt=prompt, max_tokens=10,
                                           temperature=1.0, top_p=0.9, seed=5, n=3,
                                           extra_body={"top_k": 20})
    want = engine.generate([ids] * 3, [SamplingParams(max_new_tokens=10, temperature=1.0,
                                                      top_p=0.9, top_k=20, seed=5 + j,
                                                      stop_ids=stop_ids) for j in range(3)])
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [
        text_of(w, tok) for w in want]

    # A stop string cuts the text before it (also when streamed).
    full = text_of(greedy, tok)
    stop = next(full[k:k + 2] for k in range(len(full) // 2, len(full) - 1)
                if full[k:k + 2].strip())
    out = server.client.completions.create(model="m", prompt=prompt, max_tokens=12,
                                           temperature=0, stop=[stop])
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    chunks = list(server.client.completions.create(model="m", prompt=prompt, max_tokens=12,
                                                   temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]


def test_64_concurrent_requests_each_equal_their_single_greedy_output(server, engine):
    prompts = [[(7 * i + 3 * j) % 250 + 1 for j in range(1 + (i * 5) % 40)] for i in range(64)]
    max_tokens = [1 + (i * 7) % 20 for i in range(64)]
    eod = (engine.tokenizer.eod_id,)
    want = engine.generate(prompts, [SamplingParams(max_new_tokens=m, stop_ids=eod)
                                     for m in max_tokens])
    # Alone, one at a time, through the server: the same as the engine's batch.
    for i in (0, 17, 42):
        alone = server.client.completions.create(model="m", prompt=prompts[i], temperature=0,
                                                 max_tokens=max_tokens[i])
        assert alone.choices[0].model_extra["token_ids"] == want[i]
    before = server.metrics()

    def ask(i):
        out = server.client.completions.create(model="m", prompt=prompts[i], temperature=0,
                                               max_tokens=max_tokens[i])
        return out.choices[0].model_extra["token_ids"]

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        got = list(pool.map(ask, range(64)))
    assert got == want
    after = server.metrics()
    steps = after[("lm_batch_size_count", ())] - before[("lm_batch_size_count", ())]
    single = (after[("lm_batch_size_bucket", (("le", "1.0"),))]
              - before[("lm_batch_size_bucket", (("le", "1.0"),))])
    assert steps > 0 and single < steps  # decode steps with more than one sequence
    big = (after[("lm_batch_size_bucket", (("le", "4.0"),))]
           - before[("lm_batch_size_bucket", (("le", "4.0"),))])
    assert big < steps  # some with more than 4
    ok = (after[("lm_requests_total", (("status", "200"),))]
          - before[("lm_requests_total", (("status", "200"),))])
    assert ok == 64
    assert after[("lm_generated_tokens_total", ())] - before[("lm_generated_tokens_total", ())] \
        == sum(len(w) for w in want)
    status, health = server.request("GET", "/health")
    assert status == 200 and json.loads(health)["slots_in_use"] == 0


@pytest.mark.parametrize("body, field", [
    (None, "invalid JSON"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2, 100000]}, "prompt"),
    ({"prompt": "".join(chr(33 + i % 90) for i in range(200))}, "prompt"),  # context: 64
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 64}, "max_tokens"),  # beyond the context
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "stop": 3}, "stop"),
    ({"prompt": "hi", "seed": 1.5}, "seed"),
    ({"prompt": "hi", "logprobs": 2}, "logprobs"),
    ({"prompt": "hi", "echo": True}, "echo"),
    ({"prompt": ["hi"] * 60, "n": 2}, "n"),  # 120 sequences; the queue holds 100
    ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"prompt": "hi", "colour": "red"}, "colour"),
])
def test_bad_requests_get_400_naming_the_field(server, body, field):
    status, text = server.request("POST", "/v1/completions",
                                  raw="{not json" if body is None else None, body=body)
    assert status == 400, text
    error = json.loads(text)["error"]
    assert field in error["message"], error
    # ... and the server keeps serving.
    out = server.client.completions.create(model="m", prompt="ok", max_tokens=2, temperature=0)
    assert len(out.choices[0].model_extra["token_ids"]) >= 1


def test_neutral_fields_default_max_tokens_and_a_kept_alive_connection(server):
    """Clients send OpenAI's defaults of fields the server does not implement; a long prompt
    without max_tokens gets what room is left; a 404 leaves the connection usable."""
    prompt = list(range(1, 60))  # 59 tokens: 5 positions left of 64
    status, text = server.request("POST", "/v1/completions", {
        "prompt": prompt, "temperature": 0, "echo": False, "logprobs": None,
        "presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "user": "u"})
    assert status == 200, text
    assert 1 <= len(json.loads(text)["choices"][0]["token_ids"]) <= 5
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": []}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 404 and "try /v1/completions" in resp.read().decode()
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "ok", "max_tokens": 2}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    conn.close()


def test_bad_request_through_the_client(server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.completions.create(model="m", prompt="hi", max_tokens=1000)


def test_full_queue_gets_429_at_once_and_a_late_request_503(trained_workdir):
    """An idle server holds its first requests up to the queue delay (3 s) to start them
    together: within that window a queue of 2 is full, and a 1 s timeout passes."""
    s = Served("--checkpoint", str(trained_workdir), "--max-batch-size", "4",
               "--max-queue-size", "2", "--max-queue-delay-ms", "3000", "--timeout-s", "1")
    try:
        body = {"prompt": "def ", "max_tokens": 4, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = [pool.submit(s.request, "POST", "/v1/completions", body) for _ in range(2)]
            time.sleep(0.3)
            t = time.monotonic()
            status, text = s.request("POST", "/v1/completions", body)
            assert status == 429 and "queue is full" in text
            assert time.monotonic() - t < 0.5  # at once
            late = [f.result() for f in first]
        assert [st for st, _ in late] == [503, 503]
        assert "not finished within 1.0 s" in late[0][1]
        m = s.metrics()
        assert m[("lm_requests_total", (("status", "429"),))] == 1
        assert m[("lm_requests_total", (("status", "503"),))] == 2
        # Still serving; the cancelled requests left no slot or queue entry behind.
        time.sleep(3)
        status, health = s.request("GET", "/health")
        health = json.loads(health)
        assert status == 200 and health["slots_in_use"] == 0 and health["queue"] == 0
    finally:
        s.close()


def test_serving_an_export_and_a_bad_checkpoint(trained_workdir, tmp_path, engine):
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "lm.export", "--checkpoint",
                           str(trained_workdir), "--out", str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = Served("--export", str(out), "--max-batch-size", "2")
    try:
        prompts = [[5, 6, 7], [100, 101, 32, 40, 41], [9]]
        want = engine.generate(prompts, SamplingParams(max_new_tokens=6,
                                                       stop_ids=(engine.tokenizer.eod_id,)))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: s.client.completions.create(
                model="m", prompt=p, max_tokens=6, temperature=0).choices[0]
                .model_extra["token_ids"], prompts))
        assert got == want
    finally:
        s.close()
    proc = subprocess.run([sys.executable, "-m", "lm.serve", "--checkpoint",
                           str(tmp_path / "nothing")], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
