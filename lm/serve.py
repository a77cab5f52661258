"""An OpenAI-compatible HTTP server with continuous batching.

    python -m lm.serve (--checkpoint DIR | --export DIR) [--host 127.0.0.1] [--port 8000]
        [--max-batch-size 8] [--max-queue-delay-ms 5] [--max-queue-size 256] [--timeout-s 60]
        [--quantize int8] [--kv-cache int8] [--data N --tensor N]

    POST /v1/completions   prompt (text, token ids, or a list of either), max_tokens, temperature,
                           top_p, top_k (extension), stop, seed, n, stream (server-sent events)
    GET  /v1/models, /health, /metrics (Prometheus text)

This file is the HTTP layer: it parses a request into `lm.scheduler.Sequence`s (one per prompt
and choice), submits them to the `lm.scheduler.Scheduler` (continuous batching over
`--max-batch-size` decode slots, `lm.generate.DecodeSlots`) and answers with the events they
produce, as JSON or as server-sent events. When the server is idle, the first request waits up
to `--max-queue-delay-ms` for others to arrive so that they start together. A request that does
not fit the queue (`--max-queue-size` sequences waiting) gets 429 at once; one not finished
within `--timeout-s` gets 503 and its slot is freed; a bad request gets 400 naming the field.
Every accepted request is answered.
"""
from __future__ import annotations

import argparse
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
import prometheus_client as prom

from lm import sharding
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


class Server(ThreadingHTTPServer):
    """The HTTP front of one `Scheduler`; each connection is served by a thread of its own."""
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address, scheduler: Scheduler, *, model_name: str, vocab_size: int,
                 timeout_s: float):
        super().__init__(address, Handler)
        self.scheduler, self.model_name, self.timeout_s = scheduler, model_name, timeout_s
        self.vocab_size, self.tokenizer = vocab_size, scheduler.tokenizer
        self.max_len, self.metrics = scheduler.slots.max_len, scheduler.metrics


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
        if self.path.startswith("/v1/completions"):
            self.server.metrics.requests.labels(str(status)).inc()
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param,
                                           "code": status}})

    def do_GET(self):  # noqa: N802
        srv = self.server
        if self.path == "/health":
            sched = srv.scheduler
            alive = sched.thread.is_alive()
            self._send_json(200 if alive else 503, {
                "status": "ok" if alive else "scheduler stopped", "slots": sched.slots.num_slots,
                "failed_steps": sched.failures, "slots_in_use": len(sched.active),
                "queue": len(sched.waiting)})
        elif self.path == "/metrics":
            self._send(200, prom.generate_latest(srv.metrics.registry), prom.CONTENT_TYPE_LATEST)
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": srv.model_name, "object": "model", "owned_by": "lm",
                 "max_model_len": srv.max_len}]})
        else:
            self._error(404, f"no route GET {self.path}; try /v1/completions, /health, /metrics",
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
        if self.path != "/v1/completions":
            self._error(404, f"no route POST {self.path}; try /v1/completions", kind="not_found")
            return
        try:
            try:
                body = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(None, f"invalid JSON: {e}") from None
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lm.serve", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training workdir or one checkpoint directory")
    src.add_argument("--export", help="a directory written by python -m lm.export")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument("--model-name", help="the model id in responses (default: the directory)")
    p.add_argument("--max-batch-size", type=int, default=8, help="decode slots")
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                   help="idle: how long the first request waits for others to start with it")
    p.add_argument("--max-queue-size", type=int, default=256,
                   help="sequences waiting for a slot; beyond: 429")
    p.add_argument("--timeout-s", type=float, default=60.0,
                   help="a request not finished in this time gets 503 and is cancelled")
    p.add_argument("--quantize", choices=["none", "int8"], default="none")
    p.add_argument("--kv-cache", choices=["auto", "int8"], default="auto")
    p.add_argument("--data", type=int, default=1, help="devices the slots are split over")
    p.add_argument("--tensor", type=int, default=1, help="devices heads are split over")
    args = p.parse_args(argv)
    try:
        for name in ("max_batch_size", "max_queue_size", "data", "tensor"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got "
                                  f"{getattr(args, name)}")
        if args.timeout_s <= 0 or args.max_queue_delay_ms < 0:
            raise ConfigError("--timeout-s must be > 0 and --max-queue-delay-ms >= 0")
        slots, tokenizer, vocab_size = build(
            args.checkpoint, args.export, max_batch_size=args.max_batch_size,
            quantize=args.quantize, kv_cache=args.kv_cache, data=args.data, tensor=args.tensor)
    except (ConfigError, ValueError, OSError) as e:
        print(f"lm.serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    slots.warm_up()
    scheduler = Scheduler(slots, tokenizer, default_stop_ids(tokenizer),
                          args.max_queue_delay_ms / 1000, args.max_queue_size, Metrics())
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint or args.export))
    server = Server((args.host, args.port), scheduler, model_name=name,
                    vocab_size=vocab_size, timeout_s=args.timeout_s)
    scheduler.start()
    host, port = server.server_address[:2]
    print(f"lm.serve: {name} on http://{host}:{port} ({slots.num_slots} slots)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        # No new connections; everything accepted is finished and answered first.
        scheduler.drain(args.timeout_s)
        time.sleep(0.2)  # the handlers write their last bytes
        scheduler.stop()
        server.server_close()


if __name__ == "__main__":
    main()
