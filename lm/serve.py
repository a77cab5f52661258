"""An OpenAI-compatible HTTP server with continuous batching.

    python -m lm.serve (--checkpoint DIR | --export DIR) [--host 127.0.0.1] [--port 8000]
        [--max-batch-size 8] [--max-queue-delay-ms 5] [--max-queue-size 256] [--timeout-s 60]
        [--quantize int8] [--kv-cache int8] [--data N --tensor N]

    POST /v1/completions   prompt (text, token ids, or a list of either), max_tokens, temperature,
                           top_p, top_k (extension), stop, seed, n, stream (server-sent events)
    GET  /v1/models, /health, /metrics (Prometheus text)

One scheduler thread owns the model: `--max-batch-size` decode slots (rows of one KV cache,
`lm.generate.DecodeSlots`). Each loop it moves queued requests into free slots (a prefill each)
and then runs one decode step for every slot at once, so a new request joins while the others
keep decoding (continuous batching). When the server is idle, the first request waits up to
`--max-queue-delay-ms` for others to arrive so that they start together. A request that does not
fit the queue (`--max-queue-size` sequences waiting) gets 429 at once; one not finished within
`--timeout-s` gets 503 and its slot is freed; a bad request gets 400 naming the field. Every
accepted request is answered.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import queue
import secrets
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import prometheus_client as prom

from lm.generate import SamplingParams, _bucket


class BadRequest(ValueError):
    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(eq=False)
class Sequence:
    """One choice of one request, from the queue through a slot to its last token."""
    index: int
    prompt: list[int]
    sampling: SamplingParams
    events: queue.Queue  # shared by the request's sequences: (index, kind, value)
    arrival: float
    cancelled: threading.Event
    ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # what has been sent (stop strings cut, incomplete characters held back)
    finish_reason: str | None = None


class Scheduler:
    """Continuous batching over `slots` (a DecodeSlots) in a thread of its own."""

    def __init__(self, slots, tokenizer, stop_ids: tuple[int, ...], max_queue_delay_s: float,
                 max_queue_size: int, metrics: "Metrics"):
        self.slots, self.tokenizer, self.stop_ids = slots, tokenizer, stop_ids
        self.delay, self.max_queue_size, self.metrics = max_queue_delay_s, max_queue_size, metrics
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.cond = threading.Condition()
        self.active: dict[int, Sequence] = {}
        self.free = list(range(slots.num_slots))
        self._stop = threading.Event()
        self.failures = 0
        self.thread = threading.Thread(target=self._loop, name="lm-scheduler", daemon=True)

    def submit(self, seqs: list[Sequence]) -> bool:
        """Queues all of a request's sequences, or none (False: the queue is full)."""
        with self.cond:
            if len(self.waiting) + len(seqs) > self.max_queue_size:
                return False
            self.waiting.extend(seqs)
            self.metrics.queue_size.set(len(self.waiting))
            self.cond.notify()
        return True

    def start(self):
        self.thread.start()

    def stop(self):
        self._stop.set()
        with self.cond:
            self.cond.notify()
        self.thread.join(timeout=10)

    def _take(self) -> list[Sequence]:
        """The sequences to start now: as many as there are free slots. Idle, wait for the
        first and then up to the queue delay (from its arrival) for more."""
        with self.cond:
            if not self.active:
                while not self.waiting and not self._stop.is_set():
                    self.cond.wait(timeout=0.5)
                if self.waiting:
                    deadline = self.waiting[0].arrival + self.delay
                    while (len(self.waiting) < len(self.free) and not self._stop.is_set()
                           and (left := deadline - time.monotonic()) > 0):
                        self.cond.wait(timeout=left)
            taken = []
            while self.waiting and len(taken) < len(self.free):
                taken.append(self.waiting.popleft())
            self.metrics.queue_size.set(len(self.waiting))
            return taken

    def _loop(self):
        while not self._stop.is_set():
            for seq in self._take():
                if seq.cancelled.is_set():
                    continue
                slot = self.free.pop()
                self.metrics.queue_seconds.observe(time.monotonic() - seq.arrival)
                try:
                    first = self.slots.insert(slot, seq.prompt, seq.sampling)
                except Exception as e:  # noqa: BLE001 (a failure must not stop the server)
                    self.free.append(slot)
                    seq.events.put((seq.index, "error", f"prefill failed: {e}"))
                    self._fail_all(f"prefill of another request failed: {e}")
                    continue
                self.metrics.ttft.observe(time.monotonic() - seq.arrival)
                self.active[slot] = seq
                self._accept(slot, seq, first)
            for slot, seq in list(self.active.items()):
                if seq.cancelled.is_set():
                    self._release(slot)
            self.metrics.slots_in_use.set(len(self.active))
            if not self.active:
                continue
            self.metrics.batch_size.observe(len(self.active))
            try:
                tokens = self.slots.step()
            except Exception as e:  # noqa: BLE001 (answer everyone, keep serving)
                self._fail_all(f"decode failed: {e}")
                continue
            for slot, seq in list(self.active.items()):
                self._accept(slot, seq, int(tokens[slot]))

    def _fail_all(self, message: str):
        """Answers every running sequence with an error and starts from a fresh cache (a failed
        step may have consumed the donated one)."""
        for slot, seq in list(self.active.items()):
            seq.events.put((seq.index, "error", message))
            self._release(slot)
        self.slots.reset()
        self.failures += 1

    def drain(self, timeout: float):
        """Waits (at shutdown) until every queued and running sequence is answered."""
        deadline = time.monotonic() + timeout
        while (self.waiting or self.active) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _accept(self, slot: int, seq: Sequence, token: int):
        """Records a sequence's next token; sends the new text and finishes it when due."""
        if token in self.stop_ids:
            if self.tokenizer is not None:  # send the text held back for a stop string
                text = self.tokenizer.decode(np.asarray(seq.ids, np.int32))
                cut = min((text.index(s) for s in seq.sampling.stop if s in text),
                          default=len(text))
                if text[:cut] != seq.text:
                    seq.events.put((seq.index, "delta", (text[:cut][len(seq.text):], [])))
                    seq.text = text[:cut]
            return self._finish(slot, seq, "stop")
        seq.ids.append(token)
        self.metrics.tokens.inc()
        reason = "length" if len(seq.ids) >= seq.sampling.max_new_tokens else None
        if self.tokenizer is None:
            seq.events.put((seq.index, "delta", ("", [token])))
        else:
            text = self.tokenizer.decode(np.asarray(seq.ids, np.int32))
            cut = min((text.index(s) for s in seq.sampling.stop if s in text), default=None)
            if cut is not None:
                text, reason = text[:cut], "stop"
            elif reason is None:
                text = _hold_back(text, seq.sampling.stop)
            seq.events.put((seq.index, "delta", (text[len(seq.text):], [token])))
            seq.text = text
        if reason:
            self._finish(slot, seq, reason)

    def _finish(self, slot: int, seq: Sequence, reason: str):
        seq.finish_reason = reason
        seq.events.put((seq.index, "done", reason))
        self._release(slot)

    def _release(self, slot: int):
        del self.active[slot]
        self.free.append(slot)
        self.slots.release(slot)


def _hold_back(text: str, stops: tuple[str, ...]) -> str:
    """`text` minus an ending that may still grow into a stop string or a character."""
    text = text.rstrip("\ufffd")
    for n in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return text[:-n]
    return text


class Metrics:
    def __init__(self):
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter("lm_requests", "HTTP completion requests by status",
                                     ["status"], registry=r)
        self.queue_seconds = prom.Histogram(
            "lm_queue_seconds", "Time from arrival to a decode slot", registry=r,
            buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.ttft = prom.Histogram(
            "lm_time_to_first_token_seconds", "Time from arrival to the first token", registry=r,
            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.tokens = prom.Counter("lm_generated_tokens", "Tokens generated", registry=r)
        self.batch_size = prom.Histogram("lm_batch_size", "Sequences in each decode step",
                                         registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.slots_in_use = prom.Gauge("lm_slots_in_use", "Decode slots in use", registry=r)
        self.queue_size = prom.Gauge("lm_queue_size", "Sequences waiting for a slot", registry=r)


# ---------------------------------------------------------------------------------------------
# Requests

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
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address, scheduler: Scheduler, *, model_name: str, max_len: int,
                 vocab_size: int, tokenizer, timeout_s: float, metrics: Metrics):
        super().__init__(address, Handler)
        self.scheduler, self.model_name, self.max_len = scheduler, model_name, max_len
        self.vocab_size, self.tokenizer, self.timeout_s = vocab_size, tokenizer, timeout_s
        self.metrics = metrics


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass

    def _send_json(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

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
                "failed_steps": sched.failures,
                                  "slots_in_use": len(sched.active),
                                  "queue": len(sched.waiting)})
        elif self.path == "/metrics":
            data = prom.generate_latest(srv.metrics.registry)
            self.send_response(200)
            self.send_header("Content-Type", prom.CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
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
            self._complete(seqs, prompts, n, head, deadline)

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

    def _complete(self, seqs, prompts, n, head, deadline):
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


def build(args):
    """(slots, tokenizer, max_len, vocab_size) from --checkpoint or --export."""
    if args.export:
        from lm.export import load
        exported = load(args.export)
        if args.quantize != "none" or args.kv_cache != "auto" or args.data * args.tensor > 1:
            raise ValueError("--quantize, --kv-cache, --data and --tensor apply to --checkpoint; "
                             "an export is served as it was exported")
        return (exported.slots(args.max_batch_size), exported.tokenizer, exported.max_len,
                exported.meta["vocab_size"])
    from lm.generate import Engine
    mesh = None
    if args.data * args.tensor > 1:
        from lm import sharding
        from lm.config import MeshConfig
        import jax
        n = args.data * args.tensor
        if n > jax.device_count():
            raise ValueError(f"--data {args.data} x --tensor {args.tensor} needs {n} devices; "
                             f"{jax.device_count()} are visible")
        mesh = sharding.make_mesh(MeshConfig(data=args.data, tensor=args.tensor),
                                  jax.devices()[:n])
    engine = Engine.from_checkpoint(args.checkpoint, mesh=mesh,
                                    cache_dtype="int8" if args.kv_cache == "int8" else None)
    if args.quantize == "int8":
        from lm.quantize import quantize
        engine = engine.replace(params=quantize(engine.params))
    return engine.slots(args.max_batch_size), engine.tokenizer, engine.max_len, \
        engine.cfg.vocab_size


def warm_up(slots, max_len: int) -> None:
    """Compiles the decode step and every prefill length bucket before the first request."""
    widths = sorted({min(_bucket(n), max_len) for n in range(1, max_len)})
    for width in widths:
        slots.insert(0, [0] * min(width, max_len - 1), SamplingParams())
    slots.step()
    slots.reset()


def main(argv: list[str] | None = None) -> None:
    from lm.config import ConfigError
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
        slots, tokenizer, max_len, vocab_size = build(args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"lm.serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    warm_up(slots, max_len)
    metrics = Metrics()
    stop_ids = (tokenizer.eod_id,) if tokenizer is not None else ()
    scheduler = Scheduler(slots, tokenizer, stop_ids, args.max_queue_delay_ms / 1000,
                          args.max_queue_size, metrics)
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint or args.export))
    server = Server((args.host, args.port), scheduler, model_name=name, max_len=max_len,
                    vocab_size=vocab_size, tokenizer=tokenizer, timeout_s=args.timeout_s,
                    metrics=metrics)
    scheduler.start()
    host, port = server.server_address[:2]
    print(f"lm.serve: {name} on http://{host}:{port} ({slots.num_slots} slots)", flush=True)
    import signal
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
