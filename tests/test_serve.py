"""`python -m lm.serve`: a real server process driven by the official `openai` client and raw
HTTP requests."""
import concurrent.futures
import http.client
import json
import os
import subprocess
import sys
import time

import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT

M = (("model_name", "m"),)  # the label of every model metric
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
    s = Served("--checkpoint", str(trained_workdir), "--model-name", "m", "--max-batch-size",
               "8", "--max-queue-size", "100", "--max-queue-delay-ms", "20",
               "--read-timeout-s", "3", "--max-body-mb", "1")
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
    steps = after[("lm_batch_size_count", M)] - before[("lm_batch_size_count", M)]
    single = (after[("lm_batch_size_bucket", (("le", "1.0"),) + M)]
              - before[("lm_batch_size_bucket", (("le", "1.0"),) + M)])
    assert steps > 0 and single < steps  # decode steps with more than one sequence
    big = (after[("lm_batch_size_bucket", (("le", "4.0"),) + M)]
           - before[("lm_batch_size_bucket", (("le", "4.0"),) + M)])
    assert big < steps  # some with more than 4
    ok = (after[("lm_requests_total", (("status", "200"),))]
          - before[("lm_requests_total", (("status", "200"),))])
    assert ok == 64
    gen = ("vllm:generation_tokens_total", M)
    assert after[gen] - before[gen] == sum(len(w) for w in want)
    prefills = after[("lm_prefill_batch_size_count", M)] - before[
        ("lm_prefill_batch_size_count", M)]
    assert prefills < 64  # waiting requests start together
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
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "echo": "yes"}, "echo"),
    ({"prompt": "hi", "temperature": float("nan")}, "finite"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "hi", "frequency_penalty": 3}, "frequency_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "hi", "min_p": 0.5}, "min_p"),
    ({"prompt": ["hi"] * 60, "n": 2}, "n"),  # 120 sequences; the queue holds 100
    ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}},
     "include_usage"),
    ({"prompt": "hi", "colour": "red"}, "colour"),
])
def test_bad_requests_get_400_naming_the_field(server, body, field):
    raw = "{not json" if body is None else json.dumps(body)  # NaN as JSON writes it
    status, text = server.request("POST", "/v1/completions", raw=raw)
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
        "presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "user": "u",
        # what `vllm bench serve` adds
        "repetition_penalty": 1.0, "ignore_eos": False, "min_tokens": 0,
        "skip_special_tokens": True})
    assert status == 200, text
    assert 1 <= len(json.loads(text)["choices"][0]["token_ids"]) <= 5
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/engines", body=json.dumps({"prompt": "x"}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 404 and "/v1/completions" in resp.read().decode()
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
        assert m[("vllm:request_queue_time_seconds_count", (("model_name", "run"),))] == 0
        assert m[("lm_requests_total", (("status", "429"),))] == 1
        assert m[("lm_requests_total", (("status", "503"),))] == 2
        # Still serving; the cancelled requests left no slot or queue entry behind.
        time.sleep(3)
        status, health = s.request("GET", "/health")
        health = json.loads(health)
        assert status == 200 and health["slots_in_use"] == 0 and health["queue"] == 0
    finally:
        s.close()


def test_serving_an_export_draining_on_sigterm_and_a_bad_checkpoint(trained_workdir, tmp_path,
                                                                     engine):
    """An export serves what the engine generates; SIGTERM during a stream lets it finish
    (every token, finish_reason "length") before the process exits; a missing checkpoint is a
    clear error (exit 2, no traceback)."""
    import signal
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "lm.export", "--checkpoint",
                           str(trained_workdir), "--out", str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = Served("--export", str(out), "--model-name", "m", "--max-batch-size", "2")
    try:
        prompts = [[5, 6, 7], [100, 101, 32, 40, 41], [9]]
        want = engine.generate(prompts, SamplingParams(max_new_tokens=6,
                                                       stop_ids=(engine.tokenizer.eod_id,)))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: s.client.completions.create(
                model="m", prompt=p, max_tokens=6, temperature=0).choices[0]
                .model_extra["token_ids"], prompts))
        assert got == want
        stream = iter(s.client.completions.create(model="m", prompt=[5, 6, 7], max_tokens=60,
                                                  temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True}))
        chunks = [next(stream)]
        s.proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert sum(len(c.choices[0].model_extra.get("token_ids") or []) for c in chunks) == 60
        assert chunks[-1].choices[0].finish_reason == "length"
        # uvicorn re-raises the signal once it has drained
        assert s.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        s.close()
    proc = subprocess.run([sys.executable, "-m", "lm.serve", "--checkpoint",
                           str(tmp_path / "nothing")], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# What lm-evaluation-harness, vLLM's clients and dashboards use


def _post(server, body, path="/v1/completions"):
    status, text = server.request("POST", path, body)
    assert status == 200, text
    return json.loads(text)


def test_echo_logprobs_equal_the_log_softmax_of_the_full_forward(server, engine):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    ids = [int(t) for t in engine.tokenizer.encode("def main(argv):\n    return")]
    out = _post(server, {"model": "m", "prompt": ids, "max_tokens": 1, "temperature": 0,
                         "logprobs": 3, "echo": True})
    lp = out["choices"][0]["logprobs"]
    model = nnx.merge(engine.graphdef, engine.params)
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray([ids]))[0].astype(jnp.float32)))
    assert len(lp["token_logprobs"]) == len(ids) + 1 == len(lp["tokens"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [logp[i - 1, ids[i]] for i in range(1, len(ids))]
    np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], want, atol=1e-4)
    for i in range(1, len(ids)):  # the best alternative at each position
        assert abs(max(lp["top_logprobs"][i].values()) - logp[i - 1].max()) < 1e-4
    generated = out["choices"][0]["token_ids"]
    assert generated == [int(logp[-1].argmax())]
    assert abs(lp["token_logprobs"][-1] - logp[-1].max()) < 1e-4
    text = engine.tokenizer.decode(np.asarray(ids))
    assert out["choices"][0]["text"].startswith(text)
    assert lp["text_offset"][0] == 0 and lp["text_offset"][len(ids)] == len(text)


def test_greedy_streaming_logprobs_equal_the_non_streaming_ones(server):
    """With return_tokens_as_token_ids (vLLM's) the top_logprobs keys are "token_id:N", so five
    alternatives are five keys (as text, two byte tokens can both read "\ufffd")."""
    body = {"model": "m", "prompt": "import os\n", "max_tokens": 10, "temperature": 0,
            "logprobs": 5, "return_tokens_as_token_ids": True}
    whole = _post(server, body)["choices"][0]["logprobs"]
    assert len(whole["token_logprobs"]) == len(whole["tokens"]) >= 1
    assert all(t.startswith("token_id:") for t in whole["tokens"])
    for chosen, lp, top in zip(whole["tokens"], whole["token_logprobs"], whole["top_logprobs"]):
        assert len(top) in (5, 6) and top[chosen] == lp  # greedy: the chosen is the best
        assert max(top.values()) == lp
    as_text = _post(server, body | {"return_tokens_as_token_ids": False})["choices"][0]
    assert "".join(as_text["logprobs"]["tokens"]) == as_text["text"]
    assert as_text["logprobs"]["token_logprobs"] == whole["token_logprobs"]
    chunks = list(server.client.completions.create(
        **{k: v for k, v in body.items() if k != "return_tokens_as_token_ids"}, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_tokens_as_token_ids": True}))
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs
                for lp in c.choices[0].logprobs.token_logprobs]
    np.testing.assert_allclose(streamed, whole["token_logprobs"], atol=1e-5)
    tops = [t for c in chunks if c.choices and c.choices[0].logprobs
            for t in c.choices[0].logprobs.top_logprobs]
    assert [sorted(t) for t in tops] == [sorted(t) for t in whole["top_logprobs"]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(streamed)


def test_penalties_and_logit_bias_are_the_engines_sampler(server, engine):
    ids = [int(t) for t in engine.tokenizer.encode("self.assertEqual(")]
    eod = (engine.tokenizer.eod_id,)
    for fields in ({"frequency_penalty": 1.5, "presence_penalty": 0.5},
                   {"repetition_penalty": 1.4, "temperature": 0.8, "seed": 3},
                   {"logit_bias": {str(ids[0]): 5.0, str(ids[1]): -100}}):
        sp = SamplingParams(max_new_tokens=12, stop_ids=eod, temperature=fields.get(
            "temperature", 0.0), seed=fields.get("seed", 0),
            frequency_penalty=fields.get("frequency_penalty", 0.0),
            presence_penalty=fields.get("presence_penalty", 0.0),
            repetition_penalty=fields.get("repetition_penalty", 1.0),
            logit_bias=tuple((int(k), float(v)) for k, v in fields.get("logit_bias",
                                                                        {}).items()))
        want = engine.generate([ids], sp)[0]
        got = _post(server, {"prompt": ids, "max_tokens": 12, "temperature": 0} | fields)
        assert got["choices"][0]["token_ids"] == want, fields
    plain = _post(server, {"prompt": ids, "max_tokens": 12, "temperature": 0})
    forced = _post(server, {"prompt": ids, "max_tokens": 6, "temperature": 0,
                            "logit_bias": {"65": 100}})
    assert forced["choices"][0]["token_ids"] == [65] * 6
    assert plain["choices"][0]["token_ids"] != [65] * 12


def test_more_than_four_stop_strings_cut_at_the_earliest(server, engine):
    tok = engine.tokenizer
    full = _post(server, {"prompt": "def main(", "max_tokens": 16, "temperature": 0})
    text = full["choices"][0]["text"]
    k = len(text) // 2
    stop = [text[k:k + 2], "never seen 1", "never seen 2", "never seen 3", "\x00", text[-1:]]
    assert text[k:k + 2].strip(), text
    out = _post(server, {"prompt": "def main(", "max_tokens": 16, "temperature": 0,
                         "stop": stop})
    cut = min(text.index(s) for s in stop if s in text)
    assert out["choices"][0]["text"] == text[:cut] and out["choices"][0]["finish_reason"] == \
        "stop"
    assert tok is not None


def test_tokenize_detokenize_models_and_vllm_metrics(server, engine):
    tok = engine.tokenizer
    out = _post(server, {"model": "m", "prompt": "def f(x):"}, "/tokenize")
    assert out["tokens"] == [int(t) for t in tok.encode_prompt("def f(x):")]
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == engine.max_len
    back = _post(server, {"tokens": out["tokens"]}, "/detokenize")
    assert back["prompt"] == "def f(x):"
    status, text = server.request("POST", "/detokenize", {"tokens": [10 ** 9]})
    assert status == 400 and "tokens" in text
    status, text = server.request("GET", "/v1/models")
    card = json.loads(text)["data"][0]
    assert card["id"] == "m" and card["max_model_len"] == engine.max_len
    assert isinstance(card["created"], int) and card["owned_by"] == "lm"
    m = server.metrics()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count"):
        assert (name, M) in m, name
    assert m[("vllm:request_success_total", (("finished_reason", "length"),) + M)] > 0
    assert m[("vllm:prompt_tokens_total", M)] > 0


def _raw(port, data: bytes, read=True, timeout=30):
    """Sends raw bytes on a new connection; (status line, seconds to the answer)."""
    import socket
    t = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        reply = sock.recv(65536).decode(errors="replace") if read else ""
    finally:
        sock.close()
    return reply.split("\r\n", 1)[0], time.monotonic() - t


def test_bad_clients_get_their_status_while_a_normal_request_succeeds(server):
    """A 10 GB Content-Length (413, unread), a body that never finishes (408 after the 3 s read
    timeout), 500 idle connections (closed by the same timeout), NaN and Infinity, a lone
    surrogate, an unknown model: each is answered while a streamed request in parallel
    completes."""
    import socket
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        normal = pool.submit(lambda: list(server.client.completions.create(
            model="m", prompt="def ", max_tokens=24, temperature=0, stream=True)))
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(500)]
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        line, took = _raw(server.port, (head + "Content-Length: 10737418240\r\n\r\n{").encode())
        assert " 413 " in line and took < 2, line
        line, took = _raw(server.port, (head + "Content-Length: 100\r\n\r\n{\"pro").encode())
        assert " 408 " in line and 2 < took < 10, (line, took)
        for raw, field in (('{"prompt": "hi", "top_p": Infinity}', "finite"),
                           ('{"prompt": "hi", "temperature": NaN}', "finite"),
                           ('{"prompt": "\\udc00 x"}', "prompt")):
            status, text = server.request("POST", "/v1/completions", raw=raw)
            assert status == 400 and field in text, text
        status, text = server.request("POST", "/v1/completions", {"model": "gpt-4",
                                                                  "prompt": "hi"})
        assert status == 404 and "gpt-4" in text and json.loads(text)["error"]["param"] == \
            "model"
        # Still answering at once with 500 idle connections open.
        t = time.monotonic()
        status, _ = server.request("GET", "/health")
        assert status == 200 and time.monotonic() - t < 2
        chunks = normal.result(timeout=120)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        time.sleep(4)  # past the read timeout: the server has closed the idle connections
        closed = 0
        for sock in idle:
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except OSError:
                pass
            sock.close()
        assert closed == 500
