"""An OpenAI-compatible HTTP server: continuous batching (decoders), dynamic batching (encoders).

    python -m lm.serve (--checkpoint DIR | --export DIR) [--host 127.0.0.1] [--port 8000]
        [--max-batch-size 8] [--max-queue-delay-ms 5] [--max-queue-size 256] [--timeout-s 60]
        [--quantize int8] [--kv-cache int8] [--data N --tensor N]     (decoders)
        [--preferred-batch-sizes 4,8]                                  (encoders)

A decoder checkpoint (or an export):
    POST /v1/completions   prompt (text, token ids, or a list of either), max_tokens, temperature,
                           top_p, top_k (extension), stop, seed, n, stream (server-sent events)
An encoder checkpoint (model.style bert, or task classify / span of any style; lm.finetune's
`Encoder`):
    POST /v1/embeddings    OpenAI's: input (a string or a list of strings), model,
                           encoding_format (float / base64), dimensions (only the model's)
                           -> {"object": "list", "data": [{"object": "embedding", "index",
                           "embedding"}], "model", "usage"}: the pooled vectors
    POST /classify         {"inputs": [{"text", "text_pair"?} or a string, ...]} (classify) or
                           [{"question", "context"}, ...] (span) -> {"model", "results":
                           [{"label", "probs"} or {"answer", "start", "end", "score"}, ...]}
Both: GET /v1/models, /health, /metrics (Prometheus text). The other kind's endpoints get 404
saying what the checkpoint is; /classify on a masked-LM checkpoint (no head) gets 400.

This file is the HTTP layer. A completions request becomes `lm.scheduler.Sequence`s (one per
prompt and choice), submitted to the `lm.scheduler.Scheduler` (continuous batching over
`--max-batch-size` decode slots, `lm.generate.DecodeSlots`), and is answered with the events they
produce, as JSON or as server-sent events. When the server is idle, the first request waits up
to `--max-queue-delay-ms` for others to arrive so that they start together. An encoder request
becomes one `lm.batcher.Job` of its rows for the `lm.batcher.Batcher`, whose thread owns the
encoder: rows of all requests are split and merged into forward batches of up to
`--max-batch-size` rows, launched when the queue holds a `--preferred-batch-sizes` size (or the
maximum), else when the oldest has waited `--max-queue-delay-ms`; each batch runs at the
smallest preferred size that holds it (all compiled at start-up), and every request gets its own
rows' results. For both, a request that does not fit the queue (`--max-queue-size` sequences,
or rows, waiting) gets 429 at once; one not finished within `--timeout-s` gets 503 (and is
cancelled); a bad request gets 400 naming the field; a failed step or batch answers the requests
in it with 500 and the server goes on. Every accepted request is answered.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import secrets
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
import numpy as np
import prometheus_client as prom

from lm import sharding
from lm.batcher import Batcher, EncoderMetrics
from lm.config import ConfigError, MeshConfig
from lm.export import load as load_export
from lm.generate import DecodeSlots, Engine, SamplingParams, default_stop_ids
from lm.scheduler import Metrics, Scheduler, Sequence


# ---------------------------------------------------------------------------------------------
# Requests


class BadRequest(ValueError):
    """A request a client can fix: 400, naming the field (`param`)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n",
          "stream", "user", "stream_options"}
# Accepted only with the value that changes nothing.
UNSUPPORTED = {"logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "logit_bias": (None, {}), "suffix": (None, "")}


def _number(body, name, default, lo, hi, integer=False, lo_open=False):
    x = body.get(name, default)
    if x is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(x, bool) or not isinstance(x, int if integer else (int, float)):
        raise BadRequest(name, f"{name} must be {kind}, got {json.dumps(x)}")
    if x < lo or x > hi or (lo_open and x == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise BadRequest(name, f"{name} must be {low} and <= {hi}, got {x}")
    return x


def parse_request(body, tokenizer, vocab_size: int, max_len: int, max_n: int):
    """(prompts as token ids, SamplingParams per choice, n, stream) from a completions body;
    BadRequest naming the field otherwise."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    for name in sorted(set(body) - FIELDS):
        if name in UNSUPPORTED:
            if any(body[name] == v and type(body[name]) is type(v) for v in UNSUPPORTED[name]):
                continue
            raise BadRequest(name, f"{name}={json.dumps(body[name])} is not supported by this "
                             "server")
        raise BadRequest(name, f"unknown field {name!r}; known: {', '.join(sorted(FIELDS))}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or options.get("include_usage"):
        raise BadRequest("stream_options", "stream_options.include_usage is not supported")
    if "prompt" not in body:
        raise BadRequest("prompt", "prompt is required (a string, a list of token ids, or a "
                         "list of either)")
    prompts = _prompts(body["prompt"], tokenizer, vocab_size)
    for p in prompts:
        if len(p) >= max_len:
            raise BadRequest("prompt", f"the prompt has {len(p)} tokens; the model's context is "
                             f"{max_len} (the prompt must leave room for a generated token)")
    longest = max(len(p) for p in prompts)
    room = max_len - longest
    max_tokens = _number(body, "max_tokens", min(16, room), 1, 2 ** 31, integer=True)
    if max_tokens > room:
        raise BadRequest("max_tokens", f"max_tokens is {max_tokens}, but the prompt has "
                         f"{longest} tokens and the model's context is {max_len}: at most "
                         f"{room}")
    temperature = _number(body, "temperature", 1.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1, lo_open=True)
    top_k = _number(body, "top_k", 0, 0, vocab_size, integer=True)
    n = _number(body, "n", 1, 1, max_n, integer=True)
    if len(prompts) * n > max_n:
        raise BadRequest("n", f"{len(prompts)} prompts x n={n} sequences exceed what the server "
                         f"queues at once ({max_n})")
    seed = _number(body, "seed", None, 0, 2 ** 32 - 1 - n, integer=True)
    if seed is None:
        seed = secrets.randbelow(2 ** 31)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream", f"stream must be true or false, got {json.dumps(stream)}")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if (not isinstance(stop, list) or len(stop) > 4
            or not all(isinstance(s, str) and s for s in stop)):
        raise BadRequest("stop", "stop must be a non-empty string or a list of up to 4")
    if stop and tokenizer is None:
        raise BadRequest("stop", "stop strings need a tokenizer; this model has none")
    for name in ("model", "user"):
        if name in body and not isinstance(body[name], str):
            raise BadRequest(name, f"{name} must be a string")
    sampling = [SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature),
                               top_k=top_k, top_p=float(top_p), seed=seed + j, stop=tuple(stop))
                for j in range(n)]
    return prompts, sampling, n, stream


def _prompts(prompt, tokenizer, vocab_size: int) -> list[list[int]]:
    def one(p):
        if isinstance(p, str):
            if tokenizer is None:
                raise BadRequest("prompt", "this model has no tokenizer: send token ids as the "
                                 "prompt")
            ids = [int(t) for t in tokenizer.encode_prompt(p)]
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in p):
            ids = p
            if any(not 0 <= t < vocab_size for t in ids):
                raise BadRequest("prompt", f"prompt token ids must be in [0, {vocab_size})")
        else:
            raise BadRequest("prompt", "prompt must be a string, a list of token ids, or a list "
                             "of either")
        if not ids:
            raise BadRequest("prompt", "prompt is empty")
        return ids
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [one(p) for p in prompt]
    return [one(prompt)]


# Encoder requests: /v1/embeddings and /classify

EMBEDDING_FIELDS = {"input", "model", "encoding_format", "dimensions", "user"}
CLASSIFY_FIELDS = {"inputs", "model"}
ROW_FIELDS = {"classify": ("text", "text_pair"), "span": ("question", "context")}


def _fields(body, known: set[str]) -> None:
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    for name in sorted(set(body) - known):
        raise BadRequest(name, f"unknown field {name!r}; known: {', '.join(sorted(known))}")
    for name in ("model", "user"):
        if name in body and not isinstance(body[name], str):
            raise BadRequest(name, f"{name} must be a string")


def parse_embeddings(body, dim: int, max_rows: int) -> tuple[list[str], str]:
    """(the input texts, the encoding format) of an /v1/embeddings body (OpenAI's); BadRequest
    naming the field otherwise."""
    _fields(body, EMBEDDING_FIELDS)
    if "input" not in body:
        raise BadRequest("input", "input is required (a string or a list of strings)")
    texts = body["input"]
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts:
        raise BadRequest("input", "input must be a string or a non-empty list of strings")
    for i, t in enumerate(texts):
        if isinstance(t, int) or (isinstance(t, list) and t and isinstance(t[0], int)):
            raise BadRequest("input", "input as token ids is not supported by this server: "
                             "send text")
        if not isinstance(t, str):
            raise BadRequest("input", f"input[{i}] must be a string, got {json.dumps(t)}")
        if not t:
            raise BadRequest("input", f"input[{i}] is an empty string")
    if len(texts) > max_rows:
        raise BadRequest("input", f"{len(texts)} inputs exceed what the server queues at once "
                         f"({max_rows} rows)")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise BadRequest("encoding_format", f"encoding_format must be 'float' or 'base64', got "
                         f"{json.dumps(fmt)}")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or dims != dim):
        raise BadRequest("dimensions", f"dimensions: this model's embeddings have {dim} "
                         f"dimensions and cannot be shortened, got {json.dumps(dims)}")
    return texts, fmt


def parse_classify(body, task: str, max_rows: int) -> list[dict]:
    """The rows of a /classify body: {"text", "text_pair"?} for a classify model (a bare
    string is {"text": it}), {"question", "context"} for a span model; BadRequest naming the
    field otherwise."""
    _fields(body, CLASSIFY_FIELDS)
    if "inputs" not in body:
        raise BadRequest("inputs", "inputs is required (a list of objects, or of strings)")
    inputs = body["inputs"]
    inputs = [inputs] if isinstance(inputs, (str, dict)) else inputs
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("inputs", "inputs must be a non-empty list")
    if len(inputs) > max_rows:
        raise BadRequest("inputs", f"{len(inputs)} inputs exceed what the server queues at "
                         f"once ({max_rows} rows)")
    keys = ROW_FIELDS[task]
    rows = []
    for i, row in enumerate(inputs):
        where = f"inputs[{i}]"
        if isinstance(row, str) and task == "classify":
            row = {"text": row}
        if not isinstance(row, dict):
            form = ('{"text": ..., "text_pair": ... (optional)} or a string' if task == "classify"
                    else '{"question": ..., "context": ...}')
            raise BadRequest(where, f"{where} must be {form}, got {json.dumps(row)[:80]}")
        for name in sorted(set(row) - set(keys)):
            raise BadRequest(f"{where}.{name}", f"{where}.{name}: unknown field; a {task} model "
                             f"reads {', '.join(keys)}")
        for name in keys:
            x = row.get(name)
            if name == "text_pair" and x is None:
                continue
            if name not in row:
                raise BadRequest(f"{where}.{name}", f"{where}.{name} is required")
            if not isinstance(x, str) or not x.strip():
                raise BadRequest(f"{where}.{name}", f"{where}.{name} must be a non-empty "
                                 f"string, got {json.dumps(x)[:80]}")
        rows.append({k: row[k] for k in keys if row.get(k) is not None})
    return rows


def encoder_run(encoder):
    """The batcher's `run` over an `lm.finetune.Encoder` (owned by the batcher's thread): each
    batch runs at the batcher's padded batch size."""
    def run(kind: str, rows: list, padded: int) -> list:
        encoder.batch_size = padded
        if kind == "embed":
            return list(encoder.embed(rows))
        if kind == "classify":
            return encoder.classify(rows)
        return encoder.answer(rows)
    return run


def encoder_warm_up(encoder, batch_sizes) -> None:
    """Compiles the encoder's forward for every batch size and length bucket a request can
    reach (inputs are cut to train.seq_len tokens), so that no request waits for a compile."""
    from lm.predict import bucket
    cap, top = encoder.cfg.max_len, bucket(encoder.seq_len, encoder.cfg.max_len)
    lengths, t = [], bucket(1, cap)
    while True:
        lengths.append(t)
        if t >= top:
            break
        t = bucket(t + 1, cap)
    pad = encoder.tokenizer.pad_id
    for b in batch_sizes:
        encoder.batch_size = b
        for t in lengths:
            encoder.forward([([pad] * t, [0] * t)])


def encoder_server(encoder, address, *, model_name: str, max_batch_size: int = 8,
                   max_queue_delay_ms: float = 5.0, max_queue_size: int = 256,
                   timeout_s: float = 60.0, preferred: tuple[int, ...] = (),
                   warm_up: bool = True) -> "Server":
    """A `Server` of an `lm.finetune.Encoder` behind a started `lm.batcher.Batcher`."""
    batcher = Batcher(encoder_run(encoder), max_batch_size=max_batch_size,
                      max_queue_delay_s=max_queue_delay_ms / 1000,
                      max_queue_size=max_queue_size, preferred=preferred,
                      metrics=EncoderMetrics())
    if warm_up:
        encoder_warm_up(encoder, batcher.shapes())
    server = Server(address, model_name=model_name, timeout_s=timeout_s, encoder=encoder,
                    batcher=batcher)
    batcher.start()
    return server


def is_encoder_checkpoint(path: str) -> bool:
    """Whether the checkpoint PATH names is served by the encoder endpoints: model.style bert,
    or a fine-tuning head (task classify / span) of any style. Reads no array."""
    from lm.checkpoint import checkpoint_config
    saved, _ = checkpoint_config(path)
    if saved is None:
        return False
    return ((saved.get("model") or {}).get("style") == "bert"
            or (saved.get("task") or {}).get("name") in ("classify", "span"))


class Server(ThreadingHTTPServer):
    """The HTTP front of one `Scheduler` (a decoder) or of one `lm.batcher.Batcher` over an
    `lm.finetune.Encoder`; each connection is served by a thread of its own."""
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address, scheduler: Scheduler | None = None, *, model_name: str,
                 timeout_s: float, vocab_size: int = 0, encoder=None,
                 batcher: Batcher | None = None):
        if (scheduler is None) == (batcher is None):
            raise ValueError("a server fronts a scheduler (a decoder) or a batcher (an "
                             "encoder): one of them")
        super().__init__(address, Handler)
        self.scheduler, self.model_name, self.timeout_s = scheduler, model_name, timeout_s
        self.encoder, self.batcher = encoder, batcher
        if scheduler is not None:
            self.vocab_size, self.tokenizer = vocab_size, scheduler.tokenizer
            self.max_len, self.metrics = scheduler.slots.max_len, scheduler.metrics
            self.routes = {"/v1/completions"}
        else:
            self.vocab_size, self.tokenizer = encoder.cfg.vocab_size, encoder.tokenizer
            self.max_len, self.metrics = encoder.cfg.max_len, batcher.metrics
            self.routes = {"/v1/embeddings", "/classify"}

    @property
    def worker(self):
        """What answers the requests: the scheduler or the batcher (start, drain, stop)."""
        return self.scheduler if self.scheduler is not None else self.batcher

    def what(self) -> str:
        if self.encoder is None:
            return "a decoder (text generation) checkpoint"
        return f"an encoder checkpoint (task {self.encoder.task.name})"


COUNTED = {"/v1/completions", "/v1/embeddings", "/classify"}  # lm_requests_total{status}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass

    def _send(self, status: int, data: bytes, content_type="application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, message: str, param=None, kind="invalid_request_error"):
        if self.path in COUNTED:
            self.server.metrics.requests.labels(str(status)).inc()
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param,
                                           "code": status}})

    def do_GET(self):  # noqa: N802
        srv = self.server
        if self.path == "/health":
            if srv.batcher is not None:
                b = srv.batcher
                alive = b.thread.is_alive()
                self._send_json(200 if alive else 503, {
                    "status": "ok" if alive else "batcher stopped",
                    "task": srv.encoder.task.name, "max_batch_size": b.max_batch_size,
                    "preferred_batch_sizes": list(b.preferred), "queue": b.queued,
                    "running": b.running, "batches": b.batches, "failed_batches": b.failures})
                return
            sched = srv.scheduler
            alive = sched.thread.is_alive()
            self._send_json(200 if alive else 503, {
                "status": "ok" if alive else "scheduler stopped", "slots": sched.slots.num_slots,
                "failed_steps": sched.failures, "slots_in_use": len(sched.active),
                "queue": len(sched.waiting)})
        elif self.path == "/metrics":
            self._send(200, prom.generate_latest(srv.metrics.registry), prom.CONTENT_TYPE_LATEST)
        elif self.path == "/v1/models":
            model = {"id": srv.model_name, "object": "model", "owned_by": "lm",
                     "max_model_len": srv.max_len}
            if srv.encoder is not None:
                enc = srv.encoder
                model |= {"task": enc.task.name, "dimensions": enc.cfg.d_model,
                          "max_input_tokens": enc.seq_len}
                if enc.task.name == "classify":
                    model["labels"] = enc.labels
            self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._error(404, f"no route GET {self.path}; try "
                        f"{', '.join(sorted(srv.routes))} (POST), /v1/models, /health, /metrics",
                        kind="not_found")

    def do_POST(self):  # noqa: N802
        srv = self.server
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True  # the body's end is unknown: this connection is done
            self._error(411, "a request body with a valid Content-Length is required")
            return
        raw = self.rfile.read(length)
        if self.path not in srv.routes:
            if self.path in COUNTED:
                self._error(404, f"this server serves {srv.what()}, which has no POST "
                            f"{self.path}; its routes: {', '.join(sorted(srv.routes))}",
                            kind="not_found")
            else:
                self._error(404, f"no route POST {self.path}; try "
                            f"{', '.join(sorted(srv.routes))}", kind="not_found")
            return
        try:
            try:
                body = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(None, f"invalid JSON: {e}") from None
            if self.path == "/v1/embeddings":
                self._embeddings(body)
                return
            if self.path == "/classify":
                self._classify(body)
                return
            prompts, sampling, n, stream = parse_request(
                body, srv.tokenizer, srv.vocab_size, srv.max_len, srv.scheduler.max_queue_size)
        except BadRequest as e:
            self._error(400, str(e), e.param)
            return
        arrival = time.monotonic()
        events, cancelled = queue.Queue(), threading.Event()
        seqs = [Sequence(i * n + j, p, sampling[j], events, arrival, cancelled)
                for i, p in enumerate(prompts) for j in range(n)]
        if not srv.scheduler.submit(seqs):
            self._error(429, f"the queue is full ({srv.scheduler.max_queue_size} sequences "
                        "waiting); retry later", kind="rate_limit_error")
            return
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": srv.model_name}
        deadline = arrival + srv.timeout_s
        if stream:
            self._stream(seqs, head, deadline)
        else:
            self._complete(seqs, prompts, head, deadline)

    # The encoder endpoints

    def _batched(self, kind: str, rows: list) -> list | None:
        """The results of `rows` through the batcher, or None once an error is answered (429:
        the queue is full; 503: not answered within --timeout-s; 500: its batch failed)."""
        srv = self.server
        b = srv.batcher
        arrival = time.monotonic()
        job = b.submit(kind, rows, arrival)
        if job is None:
            self._error(429, f"the queue is full ({b.max_queue_size} rows waiting at most, "
                        f"{b.queued} now); retry later", kind="rate_limit_error")
            return None
        if not job.finished.wait(timeout=max(0.0, arrival + srv.timeout_s - time.monotonic())):
            b.cancel(job)
            self._error(503, f"the request was not finished within {srv.timeout_s} s (queue "
                        "and forward); it was cancelled", kind="timeout")
            return None
        if job.error is not None:
            self._error(500, job.error, kind="server_error")
            return None
        srv.metrics.request_seconds.labels(self.path).observe(time.monotonic() - arrival)
        return job.results

    def _embeddings(self, body) -> None:
        from lm.finetune import encode_classify
        srv = self.server
        enc = srv.encoder
        texts, fmt = parse_embeddings(body, enc.cfg.d_model, srv.batcher.max_queue_size)
        tokens = sum(len(encode_classify(enc.tokenizer, t, None, enc.seq_len)[0])
                     for t in texts)
        vectors = self._batched("embed", texts)
        if vectors is None:
            return
        data = []
        for i, v in enumerate(vectors):
            v = np.asarray(v, "<f4")
            data.append({"object": "embedding", "index": i, "embedding": (
                base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist())})
        srv.metrics.requests.labels("200").inc()
        self._send_json(200, {"object": "list", "data": data, "model": srv.model_name,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def _classify(self, body) -> None:
        srv = self.server
        task = srv.encoder.task.name
        if task not in ROW_FIELDS:
            raise BadRequest(None, f"this checkpoint is task {task!r} (a masked-LM encoder "
                             "without a classification or span head): /classify needs a "
                             "task classify or span checkpoint; /v1/embeddings serves its "
                             "pooled vectors")
        rows = parse_classify(body, task, srv.batcher.max_queue_size)
        results = self._batched("classify" if task == "classify" else "answer", rows)
        if results is None:
            return
        srv.metrics.requests.labels("200").inc()
        self._send_json(200, {"model": srv.model_name, "results": results})

    # The decoder endpoint

    def _events(self, seqs, deadline):
        """(index, kind, value) until every sequence is done; None when the deadline passes."""
        open_ = len(seqs)
        events = seqs[0].events
        while open_:
            try:
                item = events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                seqs[0].cancelled.set()
                yield None
                return
            if item[1] in ("done", "error"):
                open_ -= 1
            yield item

    def _complete(self, seqs, prompts, head, deadline):
        errors = []
        for item in self._events(seqs, deadline):
            if item is None:
                self._error(503, f"the request was not finished within {self.server.timeout_s} "
                            "s (queue and generation); it was cancelled", kind="timeout")
                return
            if item[1] == "error":
                errors.append(item[2])
        if errors:
            self._error(500, errors[0], kind="server_error")
            return
        choices = [{"index": s.index, "text": s.text, "finish_reason": s.finish_reason,
                    "logprobs": None, "token_ids": s.ids} for s in seqs]
        completion = sum(len(s.ids) for s in seqs)
        prompt_tokens = sum(len(p) for p in prompts)
        self.server.metrics.requests.labels("200").inc()
        self._send_json(200, head | {"choices": choices, "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}})

    def _stream(self, seqs, head, deadline):
        started = False

        def send(obj):
            nonlocal started
            if not started:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                started = True
            self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else
                                          json.dumps(obj).encode()) + b"\n\n")
            self.wfile.flush()

        self.close_connection = True
        try:
            for item in self._events(seqs, deadline):
                if item is None:
                    if not started:
                        self._error(503, f"the request was not finished within "
                                    f"{self.server.timeout_s} s; it was cancelled",
                                    kind="timeout")
                        return
                    send({"error": {"message": "timed out; cancelled", "type": "timeout"}})
                    break
                index, kind, value = item
                if kind == "delta":
                    text, ids = value
                    send(head | {"choices": [{"index": index, "text": text,
                                              "finish_reason": None, "logprobs": None,
                                              "token_ids": ids}]})
                elif kind == "done":
                    send(head | {"choices": [{"index": index, "text": "",
                                              "finish_reason": value, "logprobs": None}]})
                else:
                    send({"error": {"message": value, "type": "server_error"}})
            else:
                self.server.metrics.requests.labels("200").inc()
            send(b"[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            seqs[0].cancelled.set()  # the client left: free its slots


# ---------------------------------------------------------------------------------------------
# Building and running a server


def build(checkpoint: str | None = None, export: str | None = None, *, max_batch_size: int = 8,
          quantize: str = "none", kv_cache: str = "auto", data: int = 1,
          tensor: int = 1) -> tuple[DecodeSlots, object, int]:
    """(`max_batch_size` decode slots, the tokenizer (None: token ids only), the vocabulary size
    (prompt ids are checked against it)) for a checkpoint (`quantize="int8"`: int8 weights;
    `kv_cache="int8"`: an int8 cache; split over `data` x `tensor` devices) or for an export
    directory, which is served as it was exported."""
    if (checkpoint is None) == (export is None):
        raise ValueError("serve a checkpoint or an export directory (one of them)")
    if export is not None:
        if quantize != "none" or kv_cache != "auto" or data * tensor > 1:
            raise ValueError("--quantize, --kv-cache, --data and --tensor apply to --checkpoint; "
                             "an export is served as it was exported")
        exported = load_export(export)
        return exported.slots(max_batch_size), exported.tokenizer, exported.meta["vocab_size"]
    n = data * tensor
    if n > jax.device_count():
        raise ValueError(f"--data {data} x --tensor {tensor} needs {n} devices; "
                         f"{jax.device_count()} are visible")
    mesh = None if n == 1 else sharding.make_mesh(MeshConfig(data=data, tensor=tensor),
                                                  jax.devices()[:n])  # the first n devices
    engine = Engine.from_checkpoint(checkpoint, mesh=mesh, int8_weights=quantize == "int8",
                                    cache_dtype="int8" if kv_cache == "int8" else None)
    return engine.slots(max_batch_size), engine.tokenizer, engine.cfg.vocab_size


def parse_batch_sizes(text: str | None, max_batch_size: int) -> tuple[int, ...]:
    """--preferred-batch-sizes "4,8" -> (4, 8); ConfigError unless each is in
    [1, max_batch_size]."""
    if not text:
        return ()
    try:
        sizes = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise ConfigError(f"--preferred-batch-sizes must be comma-separated integers such as "
                          f"'4,8', got {text!r}") from None
    bad = [x for x in sizes if not 1 <= x <= max_batch_size]
    if bad or not sizes:
        raise ConfigError(f"--preferred-batch-sizes must be in [1, --max-batch-size "
                          f"{max_batch_size}], got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lm.serve", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training workdir or one checkpoint directory "
                     "(a decoder, or an encoder: model.style bert, task classify / span)")
    src.add_argument("--export", help="a directory written by python -m lm.export")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument("--model-name", help="the model id in responses (default: the directory)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="decode slots (a decoder); rows per forward (an encoder)")
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                   help="how long the first request waits for others to start with it")
    p.add_argument("--preferred-batch-sizes",
                   help="an encoder: comma-separated batch sizes (e.g. 4,8) launched as soon "
                   "as the queue holds one")
    p.add_argument("--max-queue-size", type=int, default=256,
                   help="sequences (a decoder) or rows (an encoder) waiting; beyond: 429")
    p.add_argument("--timeout-s", type=float, default=60.0,
                   help="a request not finished in this time gets 503 and is cancelled")
    p.add_argument("--quantize", choices=["none", "int8"], default="none")
    p.add_argument("--kv-cache", choices=["auto", "int8"], default="auto")
    p.add_argument("--data", type=int, default=1, help="devices the slots are split over")
    p.add_argument("--tensor", type=int, default=1, help="devices heads are split over")
    args = p.parse_args(argv)
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint or args.export))
    address = (args.host, args.port)
    try:
        for key in ("max_batch_size", "max_queue_size", "data", "tensor"):
            if getattr(args, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got "
                                  f"{getattr(args, key)}")
        if args.timeout_s <= 0 or args.max_queue_delay_ms < 0:
            raise ConfigError("--timeout-s must be > 0 and --max-queue-delay-ms >= 0")
        preferred = parse_batch_sizes(args.preferred_batch_sizes, args.max_batch_size)
        if args.checkpoint is not None and is_encoder_checkpoint(args.checkpoint):
            if (args.quantize, args.kv_cache, args.data, args.tensor) != ("none", "auto", 1, 1):
                raise ConfigError("--quantize, --kv-cache, --data and --tensor apply to "
                                  "decoders; an encoder checkpoint is served on one device")
            from lm.finetune import Encoder
            encoder = Encoder.from_checkpoint(args.checkpoint, args.max_batch_size)
            server = encoder_server(
                encoder, address, model_name=name, max_batch_size=args.max_batch_size,
                max_queue_delay_ms=args.max_queue_delay_ms, max_queue_size=args.max_queue_size,
                timeout_s=args.timeout_s, preferred=preferred)
            what = (f"encoder, task {encoder.task.name}, batches of up to "
                    f"{args.max_batch_size} rows")
        else:
            if preferred:
                raise ConfigError("--preferred-batch-sizes applies to encoder checkpoints; a "
                                  "decoder batches continuously over --max-batch-size slots")
            server, what = _decoder_server(args, address, name)
    except (ConfigError, ValueError, OSError) as e:
        print(f"lm.serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    host, port = server.server_address[:2]
    print(f"lm.serve: {name} on http://{host}:{port} ({what})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        # No new connections; everything accepted is finished and answered first.
        server.worker.drain(args.timeout_s)
        time.sleep(0.2)  # the handlers write their last bytes
        server.worker.stop()
        server.server_close()


def _decoder_server(args, address, name) -> tuple[Server, str]:
    """A started decoder server (slots compiled, scheduler running) and its description."""
    slots, tokenizer, vocab_size = build(
        args.checkpoint, args.export, max_batch_size=args.max_batch_size,
        quantize=args.quantize, kv_cache=args.kv_cache, data=args.data, tensor=args.tensor)
    slots.warm_up()
    scheduler = Scheduler(slots, tokenizer, default_stop_ids(tokenizer),
                          args.max_queue_delay_ms / 1000, args.max_queue_size, Metrics())
    server = Server(address, scheduler, model_name=name, vocab_size=vocab_size,
                    timeout_s=args.timeout_s)
    scheduler.start()
    return server, f"{slots.num_slots} slots"


if __name__ == "__main__":
    main()
