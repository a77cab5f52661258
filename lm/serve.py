"""An OpenAI- and vLLM-compatible HTTP server (FastAPI + uvicorn): continuous batching
(decoders), dynamic batching (encoders), several models in one process.

    python -m lm.serve (--checkpoint DIR | --export DIR | --model NAME=DIR ...) [--host 127.0.0.1]
        [--port 8000] [--model-name NAME] [--max-batch-size 8] [--max-queue-delay-ms 5]
        [--max-queue-size 256] [--timeout-s 60] [--max-body-mb 16] [--read-timeout-s 30]
        [--max-connections 1024] [--quantize int8] [--kv-cache int8] [--fuse]
        [--data N --tensor N]
        [--preferred-batch-sizes 4,8]                                  (encoders)

Routes (`lm.protocol` parses the bodies; docs/serving.md has every field):
    POST /v1/completions        decoders: prompt, max_tokens, temperature, top_p, top_k, n, seed,
                                stop (any number), logprobs (<= 20), echo, presence_penalty,
                                frequency_penalty, repetition_penalty, logit_bias, ignore_eos,
                                stop_token_ids, stream, stream_options.include_usage
    POST /v1/chat/completions   decoders: messages rendered by the model's chat template
                                (`lm.chat`), the same sampling fields, logprobs + top_logprobs
    POST /tokenize, /detokenize vLLM's
    POST /v1/embeddings         encoders (OpenAI's), POST /classify (classify / span heads)
    GET  /v1/models, /health, /metrics (Prometheus: vLLM's names, by model_name), /version
A request's `model` picks the served model (404 if none has that name; absent: the first).

Every failure is an OpenAI-shaped JSON error (`{"error": {message, type, param, code}}`) with
its status, counted in `lm_requests_total{status}`: 400 naming the field, 404 (route, model),
408 (a body not received within --read-timeout-s), 413 (a body over --max-body-mb, refused
before it is read), 429 (the queue is full), 503 (not finished within --timeout-s, or the
scheduler has stopped), 500 (a failed step). A connection that sends no complete request
headers within --read-timeout-s is closed; beyond --max-connections uvicorn answers 503.
SIGTERM / Ctrl-C: stop accepting, finish every accepted request (streams included, up to
--timeout-s), then exit.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lm import sharding
from lm.batcher import Batcher, EncoderMetrics
from lm.config import ConfigError, MeshConfig
from lm.export import load as load_export
from lm.generate import DecodeSlots, Engine, default_stop_ids
from lm.protocol import (ROW_FIELDS, BadRequest, Completion, chat_logprobs, completion_logprobs,
                         parse_chat, parse_classify, parse_completion, parse_detokenize,
                         parse_embeddings, parse_json, parse_tokenize, token_text, usage)
from lm.scheduler import Metrics, Scheduler, SchedulerDown, Sequence, TokenLogprob

VERSION = "0.1.0"
COUNTED = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/classify")


# ---------------------------------------------------------------------------------------------
# Served models


@dataclasses.dataclass(eq=False)
class DecoderModel:
    """A decoder behind its scheduler (its own slots); `template`: an `lm.chat.ChatTemplate`."""
    name: str
    scheduler: Scheduler
    vocab_size: int
    template: object = None
    root: str = ""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    kind = "decoder"

    @property
    def tokenizer(self):
        return self.scheduler.tokenizer

    @property
    def max_len(self) -> int:
        return self.scheduler.slots.max_len

    @property
    def worker(self):
        return self.scheduler

    def health(self) -> dict:
        s = self.scheduler
        return {"status": "ok" if s.alive else f"scheduler stopped: {s.crashed}",
                "slots": s.slots.num_slots, "failed_steps": s.failures,
                "slots_in_use": len(s.active), "queue": len(s.waiting)}

    def card(self) -> dict:
        return {}


@dataclasses.dataclass(eq=False)
class EncoderModel:
    """An `lm.finetune.Encoder` behind its started `lm.batcher.Batcher`."""
    name: str
    encoder: object
    batcher: Batcher
    root: str = ""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    kind = "encoder"

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def max_len(self) -> int:
        return self.encoder.cfg.max_len

    @property
    def worker(self):
        return self.batcher

    def health(self) -> dict:
        b = self.batcher
        alive = b.thread.is_alive()
        return {"status": "ok" if alive else "batcher stopped", "task": self.encoder.task.name,
                "max_batch_size": b.max_batch_size, "preferred_batch_sizes": list(b.preferred),
                "queue": b.queued, "running": b.running, "batches": b.batches,
                "failed_batches": b.failures}

    def card(self) -> dict:
        enc = self.encoder
        out = {"task": enc.task.name, "dimensions": enc.cfg.d_model,
               "max_input_tokens": enc.seq_len}
        if enc.task.name == "classify":
            out["labels"] = enc.labels
        return out


class AsyncEvents:
    """A sequence's event queue, filled from the scheduler's thread, read by the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (shutdown): nobody is waiting
            pass


# ---------------------------------------------------------------------------------------------
# The application


@dataclasses.dataclass
class Limits:
    timeout_s: float = 60.0  # a request's whole life
    max_body_bytes: int = 16 << 20
    read_timeout_s: float = 30.0  # headers and body


class App:
    """The routes over `models` (the first is the default). `app.fastapi` is the ASGI app."""

    def __init__(self, models: list, limits: Limits = Limits(),
                 registry: prom.CollectorRegistry | None = None):
        if not models:
            raise ValueError("serve at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ConfigError(f"model names must differ, got {names}")
        self.models = {m.name: m for m in models}
        self.default = models[0]
        self.limits = limits
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self.requests = prom.Counter("lm_requests", "HTTP requests by status", ["status"],
                                     registry=self.registry)
        self.fastapi = self._routes(FastAPI(title="lm.serve", version=VERSION, docs_url=None,
                                            redoc_url=None, openapi_url=None))

    # Errors and bodies

    def error(self, path: str, status: int, message: str, param=None,
              kind="invalid_request_error", close: bool = False) -> JSONResponse:
        if path in COUNTED:
            self.requests.labels(str(status)).inc()
        headers = {"Connection": "close"} if close else None
        return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                       "code": status}}, status, headers=headers)

    def ok(self, path: str, obj) -> JSONResponse:
        if path in COUNTED:
            self.requests.labels("200").inc()
        return JSONResponse(obj)

    async def body(self, request: Request):
        """The JSON body: 413 above the size limit (before reading it when Content-Length says
        so), 408 when it does not arrive within the read timeout."""
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise BadRequest(None, f"invalid Content-Length {length!r}")
            if int(length) > limit:
                raise BadRequest(None, f"the request body is {int(length)} bytes; this server "
                                 f"takes at most {limit} (--max-body-mb)", 413,
                                 "request_too_large")

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadRequest(None, f"the request body exceeds {limit} bytes "
                                     "(--max-body-mb)", 413, "request_too_large")
                chunks.append(chunk)
            return b"".join(chunks)
        try:
            raw = await asyncio.wait_for(read(), self.limits.read_timeout_s)
        except asyncio.TimeoutError:
            raise BadRequest(None, f"the request body did not arrive within "
                             f"{self.limits.read_timeout_s} s", 408, "timeout") from None
        return parse_json(raw)

    def model(self, body, kind: str | None = None):
        """The model a request names (404 if none), checked to be of `kind`."""
        name = body.get("model") if isinstance(body, dict) else None
        if name is None:
            model = self.default
        elif not isinstance(name, str):
            raise BadRequest("model", "model must be a string")
        elif name not in self.models:
            raise BadRequest("model", f"the model `{name}` does not exist; this server serves "
                             f"{', '.join(self.models)}", 404, "not_found_error")
        else:
            model = self.models[name]
        if kind is not None and model.kind != kind:
            what = (f"an encoder checkpoint (task {model.encoder.task.name})"
                    if model.kind == "encoder" else "a decoder (text generation) checkpoint")
            raise BadRequest("model", f"the model `{model.name}` is {what}, which has no "
                             f"such route; {_routes_of(model)}", 404, "not_found_error")
        return model

    def _routes(self, api: FastAPI) -> FastAPI:
        handlers = {"/v1/completions": self.completions,
                    "/v1/chat/completions": self.chat,
                    "/v1/embeddings": self.embeddings, "/classify": self.classify,
                    "/tokenize": self.tokenize, "/detokenize": self.detokenize}
        for path, handler in handlers.items():
            api.add_api_route(path, self._guarded(path, handler), methods=["POST"])
        api.add_api_route("/health", self.health, methods=["GET"])
        api.add_api_route("/metrics", self.metrics, methods=["GET"])
        api.add_api_route("/v1/models", self.list_models, methods=["GET"])
        api.add_api_route("/version", lambda: {"version": VERSION}, methods=["GET"])

        @api.exception_handler(StarletteHTTPException)
        async def not_found(request: Request, exc: StarletteHTTPException):
            path = request.url.path
            if exc.status_code in (404, 405):
                return self.error(path, exc.status_code, f"no route {request.method} {path}; "
                                  f"{_routes_of(self.default)}", kind="not_found")
            return self.error(path, exc.status_code, str(exc.detail), kind="server_error")
        return api

    def _guarded(self, path: str, handler):
        """`handler(request, path)` with every exception turned into an error response."""
        async def route(request: Request):
            try:
                return await handler(request, path)
            except BadRequest as e:
                return self.error(path, e.status, str(e), e.param, e.kind,
                                  close=e.status in (408, 413))
            except SchedulerDown as e:
                return self.error(path, 503, str(e), kind="server_error")
            except Exception as e:  # noqa: BLE001 (a bug answers 500, the server goes on)
                return self.error(path, 500, f"{type(e).__name__}: {e}", kind="server_error")
        return route

    # GET routes

    async def health(self):
        models = {name: m.health() for name, m in self.models.items()}
        ok = all(h["status"] == "ok" for h in models.values())
        return JSONResponse(models[self.default.name] | {"models": models}, 200 if ok else 503)

    async def metrics(self):
        return Response(prom.generate_latest(self.registry), media_type=prom.CONTENT_TYPE_LATEST)

    async def list_models(self):
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "lm",
             "root": m.root, "parent": None, "max_model_len": m.max_len, "permission": []}
            | m.card() for m in self.models.values()]}

    # Decoders

    async def completions(self, request: Request, path: str):
        body = await self.body(request)
        model = self.model(body, "decoder")
        s = model.scheduler
        req = parse_completion(body, model.tokenizer, model.vocab_size, model.max_len,
                               s.max_queue_size, default_stop_ids(model.tokenizer))
        if req.echo and not s.slots.can_score:
            raise BadRequest("echo", "echo (prompt logprobs) needs a checkpoint; this model is "
                             "served from an export, which has no scoring function")
        return await self._generate(path, model, req, chat=False)

    async def chat(self, request: Request, path: str):
        body = await self.body(request)
        model = self.model(body, "decoder")
        req, _ = parse_chat(body, model.template, model.tokenizer, model.vocab_size,
                            model.max_len, model.scheduler.max_queue_size,
                            default_stop_ids(model.tokenizer))
        return await self._generate(path, model, req, chat=True)

    async def _generate(self, path: str, model: DecoderModel, req: Completion, chat: bool):
        arrival = time.monotonic()
        events, cancelled = AsyncEvents(asyncio.get_running_loop()), threading.Event()
        seqs = [Sequence(i * req.n + j, p, req.sampling[j], events, arrival, cancelled,
                         logprobs=req.logprobs, echo=req.echo, stop_ids=req.stop_ids)
                for i, p in enumerate(req.prompts) for j in range(req.n)]
        if not model.scheduler.submit(seqs):
            raise BadRequest(None, f"the queue is full ({model.scheduler.max_queue_size} "
                             "sequences waiting); retry later", 429, "rate_limit_error")
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model.name}
        run = Run(self, path, model, req, seqs, head, arrival + self.limits.timeout_s, chat)
        if req.stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await run.complete()

    async def tokenize(self, request: Request, path: str):
        body = await self.body(request)
        model = self.model(body)
        ids, _ = parse_tokenize(body, model.tokenizer, getattr(model, "template", None))
        out = {"count": len(ids), "max_model_len": model.max_len, "tokens": ids,
               "token_strs": None}
        if body.get("return_token_strs"):
            out["token_strs"] = [token_text(model.tokenizer, t) for t in ids]
        return self.ok(path, out)

    async def detokenize(self, request: Request, path: str):
        body = await self.body(request)
        model = self.model(body)
        if model.tokenizer is None:
            raise BadRequest(None, "this model has no tokenizer")
        ids = parse_detokenize(body, model.tokenizer.vocab_size)
        return self.ok(path, {"prompt": model.tokenizer.decode(np.asarray(ids, np.int32))})

    # Encoders

    async def _batched(self, model: EncoderModel, kind: str, rows: list, path: str) -> list:
        """The results of `rows` through the model's batcher (429: the queue is full; 503: not
        answered within --timeout-s, then cancelled; 500: its batch failed)."""
        b = model.batcher
        arrival = time.monotonic()
        loop, done = asyncio.get_running_loop(), asyncio.Event()
        job = b.submit(kind, rows, arrival)
        if job is None:
            raise BadRequest(None, f"the queue is full ({b.max_queue_size} rows waiting at most, "
                             f"{b.queued} now); retry later", 429, "rate_limit_error")
        job.notify = lambda: loop.call_soon_threadsafe(done.set)
        if job.finished.is_set():
            done.set()
        try:
            await asyncio.wait_for(done.wait(), max(0.0, arrival + self.limits.timeout_s
                                                    - time.monotonic()))
        except asyncio.TimeoutError:
            b.cancel(job)
            raise BadRequest(None, f"the request was not finished within "
                             f"{self.limits.timeout_s} s (queue and forward); it was cancelled",
                             503, "timeout") from None
        if job.error is not None:
            raise BadRequest(None, job.error, 500, "server_error")
        b.metrics.request_seconds.labels(path).observe(time.monotonic() - arrival)
        return job.results

    async def embeddings(self, request: Request, path: str):
        from lm.finetune import encode_classify
        body = await self.body(request)
        model = self.model(body, "encoder")
        enc = model.encoder
        texts, fmt = parse_embeddings(body, enc.cfg.d_model, model.batcher.max_queue_size)
        tokens = sum(len(encode_classify(enc.tokenizer, t, None, enc.seq_len)[0])
                     for t in texts)
        vectors = await self._batched(model, "embed", texts, path)
        data = []
        for i, v in enumerate(vectors):
            v = np.asarray(v, "<f4")
            data.append({"object": "embedding", "index": i, "embedding": (
                base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist())})
        return self.ok(path, {"object": "list", "data": data, "model": model.name,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def classify(self, request: Request, path: str):
        body = await self.body(request)
        model = self.model(body, "encoder")
        task = model.encoder.task.name
        if task not in ROW_FIELDS:
            raise BadRequest(None, f"this checkpoint is task {task!r} (a masked-LM encoder "
                             "without a classification or span head): /classify needs a "
                             "task classify or span checkpoint; /v1/embeddings serves its "
                             "pooled vectors")
        rows = parse_classify(body, task, model.batcher.max_queue_size)
        results = await self._batched(model, "classify" if task == "classify" else "answer",
                                      rows, path)
        return self.ok(path, {"model": model.name, "results": results})


def _routes_of(model) -> str:
    if model.kind == "encoder":
        return "this model serves POST /v1/embeddings, /classify, /tokenize, /detokenize"
    return ("this model serves POST /v1/completions, /v1/chat/completions, /tokenize, "
            "/detokenize")


class Run:
    """One completions / chat request in flight: its sequences' events turned into the JSON
    answer (`complete`) or server-sent events (`stream`)."""

    def __init__(self, app: App, path: str, model: DecoderModel, req: Completion, seqs, head,
                 deadline: float, chat: bool):
        self.app, self.path, self.model, self.req, self.seqs = app, path, model, req, seqs
        self.head, self.deadline, self.chat = head, deadline, chat
        self.tok = model.tokenizer
        self.lp_tok = None if req.tokens_as_ids else model.tokenizer  # names tokens in logprobs
        self.prompts: dict[int, object] = {}  # index -> Scored (echo)
        self.logprobs: dict[int, list[TokenLogprob]] = {s.index: [] for s in seqs}
        self.prompt_chars: dict[int, int] = {}  # echo: generated text_offsets follow these

    async def events(self):
        """(index, kind, value) until every sequence is done; None when the deadline passes
        (the sequences are cancelled)."""
        open_, q = len(self.seqs), self.seqs[0].events.queue
        while open_:
            try:
                item = await asyncio.wait_for(q.get(), max(0.0, self.deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self.seqs[0].cancelled.set()
                yield None
                return
            if item[1] in ("done", "error"):
                open_ -= 1
            yield item

    def _usage(self) -> dict:
        return usage(sum(len(p) for p in self.req.prompts) * self.req.n,
                     sum(len(s.ids) for s in self.seqs))

    def _echo_entries(self, seq) -> tuple[str, list]:
        """The prompt's text and TokenLogprobs (the first token has no logprob)."""
        scored, stream = self.prompts[seq.index], self.tok.stream() if self.tok else None
        entries = []
        for i, t in enumerate(seq.prompt):
            offset = len(stream.text) if stream is not None else 0
            if stream is not None:
                stream.push(t)
            lp = scored.token_logprobs[i]
            top = [] if lp is None else list(zip(scored.top_ids[i][:self.req.logprobs or 0],
                                                  scored.top_logprobs[i][:self.req.logprobs
                                                                         or 0]))
            entries.append(TokenLogprob(t, lp, top, offset))
        return (stream.text if stream is not None else ""), entries

    def _choice(self, seq) -> dict:
        if self.chat:
            choice = {"index": seq.index, "message": {"role": "assistant", "content": seq.text},
                      "finish_reason": seq.finish_reason, "logprobs": None}
            if self.req.logprobs is not None:
                choice["logprobs"] = chat_logprobs(self.lp_tok, self.logprobs[seq.index])
            return choice
        text, entries = seq.text, self.logprobs[seq.index]
        lp = None if self.req.logprobs is None else completion_logprobs(self.lp_tok, entries)
        if self.req.echo:
            prompt_text, prompt_entries = self._echo_entries(seq)
            text = prompt_text + text
            if lp is not None:
                lp = _joined(completion_logprobs(self.lp_tok, prompt_entries),
                             completion_logprobs(self.lp_tok, entries, len(prompt_text)))
        return {"index": seq.index, "text": text, "finish_reason": seq.finish_reason,
                "logprobs": lp, "token_ids": seq.ids}

    async def complete(self):
        errors = []
        async for item in self.events():
            if item is None:
                return self.app.error(self.path, 503, f"the request was not finished within "
                                      f"{self.app.limits.timeout_s} s (queue and generation); "
                                      "it was cancelled", kind="timeout")
            index, kind, value = item
            if kind == "error":
                errors.append(value)
            elif kind == "prompt":
                self.prompts[index] = value
            elif kind == "delta":
                self.logprobs[index] += value.logprobs
        if errors:
            return self.app.error(self.path, 500, errors[0], kind="server_error")
        return self.app.ok(self.path, self.head | {
            "choices": [self._choice(s) for s in self.seqs], "usage": self._usage()})

    def _chunk(self, index: int, text: str, logprobs, finish=None, first=False) -> dict:
        head = self.head | {"object": "chat.completion.chunk"} if self.chat else self.head
        if self.chat:
            delta = ({"role": "assistant", "content": ""} if first else
                     {} if finish else {"content": text})
            lp = None if self.req.logprobs is None or finish or first else chat_logprobs(
                self.lp_tok, logprobs)
            return head | {"choices": [{"index": index, "delta": delta, "logprobs": lp,
                                        "finish_reason": finish}]}
        return head | {"choices": [{"index": index, "text": text, "finish_reason": finish,
                                    "logprobs": logprobs, "token_ids": None if finish else []}]}

    async def stream(self):
        """Server-sent events: chunks per token (after an echo's prompt chunk), a finish chunk
        per choice, the usage chunk (stream_options.include_usage), then [DONE]. A timeout or
        failure ends the stream with an error event, counted by its status."""
        status = 200
        try:
            if self.chat:
                for s in self.seqs:
                    yield _sse(self._chunk(s.index, "", None, first=True))
            async for item in self.events():
                if item is None:
                    status = 503
                    yield _sse({"error": {"message": "timed out; cancelled", "type": "timeout",
                                          "code": 503}})
                    break
                index, kind, value = item
                if kind == "prompt":
                    self.prompts[index] = value
                    seq = next(s for s in self.seqs if s.index == index)
                    text, entries = self._echo_entries(seq)
                    self.prompt_chars[index] = len(text)
                    lp = (None if self.req.logprobs is None
                          else completion_logprobs(self.lp_tok, entries))
                    yield _sse(self._chunk(index, text, lp))
                elif kind == "delta":
                    offset = self.prompt_chars.get(index, 0)
                    if self.chat:
                        yield _sse(self._chunk(index, value.text, value.logprobs))
                    else:
                        lp = (None if self.req.logprobs is None else
                              completion_logprobs(self.lp_tok, value.logprobs, offset))
                        chunk = self._chunk(index, value.text, lp)
                        chunk["choices"][0]["token_ids"] = value.ids
                        yield _sse(chunk)
                elif kind == "done":
                    yield _sse(self._chunk(index, "", None, finish=value))
                else:
                    status = 500
                    yield _sse({"error": {"message": value, "type": "server_error",
                                          "code": 500}})
            if self.req.include_usage and status == 200:
                head = self.head | ({"object": "chat.completion.chunk"} if self.chat else {})
                yield _sse(head | {"choices": [], "usage": self._usage()})
            yield b"data: [DONE]\n\n"
        finally:
            self.seqs[0].cancelled.set()  # the client left, or all done: frees any slot
            self.app.requests.labels(str(status)).inc()


def _joined(a: dict, b: dict) -> dict:
    """Two legacy `logprobs` objects, one after the other."""
    return {k: a[k] + b[k] for k in a}


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


# ---------------------------------------------------------------------------------------------
# The HTTP server


def protocol_class(read_timeout_s: float):
    """uvicorn's h11 protocol, closing a connection that has not sent a complete request's
    headers within `read_timeout_s` (uvicorn itself only times out idle kept-alive ones)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._headers_timer = self.loop.call_later(read_timeout_s, self._no_request)

        def _no_request(self):
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc):
            self._headers_timer.cancel()
            super().connection_lost(exc)
    return Protocol


class HTTPServer:
    """uvicorn over an `App` on a socket bound at construction (`port` is known before it
    runs). `run()` blocks (SIGTERM / Ctrl-C: graceful); `start()` / `stop()` run it in a
    thread (tests)."""

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0, *,
                 max_connections: int = 1024):
        import uvicorn
        self.app = app
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(2048)
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(
            app.fastapi, log_level="warning", lifespan="off", access_log=False,
            http=protocol_class(app.limits.read_timeout_s), limit_concurrency=max_connections,
            timeout_keep_alive=5, timeout_graceful_shutdown=max(1, int(app.limits.timeout_s)),
            h11_max_incomplete_event_size=64 << 10)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self) -> "HTTPServer":
        self.thread = threading.Thread(target=self.run, name="lm-http", daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.01)
        return self

    def stop(self, workers: bool = True) -> None:
        """Stops accepting, finishes what is in flight, then stops the models' workers."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=self.app.limits.timeout_s + 5)
        if workers:
            for m in self.app.models.values():
                m.worker.stop()
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# Building models


def build(checkpoint: str | None = None, export: str | None = None, *, max_batch_size: int = 8,
          quantize: str = "none", kv_cache: str = "auto", data: int = 1,
          tensor: int = 1, fuse: bool = False) -> tuple[DecodeSlots, object, int]:
    """(`max_batch_size` decode slots, the tokenizer (None: token ids only), the vocabulary size
    (prompt ids are checked against it)) for a checkpoint (`quantize="int8"`: int8 weights;
    `kv_cache="int8"`: an int8 cache; split over `data` x `tensor` devices; `fuse`: fused q, k, v
    and gate, up projections, `lm.fuse`) or for an export directory, which is served as it was
    exported."""
    if (checkpoint is None) == (export is None):
        raise ValueError("serve a checkpoint or an export directory (one of them)")
    if export is not None:
        if quantize != "none" or kv_cache != "auto" or data * tensor > 1 or fuse:
            raise ValueError("--quantize, --kv-cache, --fuse, --data and --tensor apply to "
                             "--checkpoint; an export is served as it was exported")
        exported = load_export(export)
        return exported.slots(max_batch_size), exported.tokenizer, exported.meta["vocab_size"]
    n = data * tensor
    if n > jax.device_count():
        raise ValueError(f"--data {data} x --tensor {tensor} needs {n} devices; "
                         f"{jax.device_count()} are visible")
    mesh = None if n == 1 else sharding.make_mesh(MeshConfig(data=data, tensor=tensor),
                                                  jax.devices()[:n])  # the first n devices
    engine = Engine.from_checkpoint(checkpoint, mesh=mesh, int8_weights=quantize == "int8",
                                    cache_dtype="int8" if kv_cache == "int8" else None,
                                    fuse=fuse)
    return engine.slots(max_batch_size), engine.tokenizer, engine.cfg.vocab_size


def decoder_model(name: str, checkpoint: str | None = None, export: str | None = None, *,
                  max_batch_size: int = 8, max_queue_delay_ms: float = 5.0,
                  max_queue_size: int = 256, registry=None, warm_up: bool = True,
                  **build_args) -> DecoderModel:
    """A started decoder (slots compiled, scheduler running) with its chat template."""
    from lm.chat import ChatTemplate
    slots, tokenizer, vocab_size = build(checkpoint, export, max_batch_size=max_batch_size,
                                         **build_args)
    if warm_up:  # scoring too: an echo request must not stall the running streams to compile
        slots.warm_up(score=slots.can_score)
    scheduler = Scheduler(slots, tokenizer, default_stop_ids(tokenizer),
                          max_queue_delay_ms / 1000, max_queue_size, Metrics(name, registry))
    scheduler.start()
    return DecoderModel(name, scheduler, vocab_size,
                        ChatTemplate.for_checkpoint(checkpoint or export),
                        root=os.path.abspath(checkpoint or export))


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


def encoder_model(name: str, encoder, *, max_batch_size: int = 8,
                  max_queue_delay_ms: float = 5.0, max_queue_size: int = 256,
                  preferred: tuple[int, ...] = (), warm_up: bool = True, registry=None,
                  root: str = "") -> EncoderModel:
    """An `lm.finetune.Encoder` behind a started `lm.batcher.Batcher`."""
    batcher = Batcher(encoder_run(encoder), max_batch_size=max_batch_size,
                      max_queue_delay_s=max_queue_delay_ms / 1000,
                      max_queue_size=max_queue_size, preferred=preferred,
                      metrics=EncoderMetrics(name, registry))
    if warm_up:
        encoder_warm_up(encoder, batcher.shapes())
    batcher.start()
    return EncoderModel(name, encoder, batcher, root=root)


def is_encoder_checkpoint(path: str) -> bool:
    """Whether the checkpoint PATH names is served by the encoder endpoints: model.style bert,
    or a fine-tuning head (task classify / span) of any style. Reads no array."""
    from lm.checkpoint import checkpoint_config
    saved, _ = checkpoint_config(path)
    if saved is None:
        return False
    return ((saved.get("model") or {}).get("style") == "bert"
            or (saved.get("task") or {}).get("name") in ("classify", "span"))


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


def parse_models(args) -> list[tuple[str, str, str]]:
    """(name, "checkpoint" | "export", path) of each model to serve."""
    given = [x for x in (args.checkpoint, args.export) if x] + list(args.model or [])
    if not given:
        raise ConfigError("serve something: --checkpoint DIR, --export DIR or --model NAME=DIR "
                          "(repeatable)")
    if args.model and (args.checkpoint or args.export or args.model_name):
        raise ConfigError("--model NAME=DIR names each model: use it instead of --checkpoint, "
                          "--export and --model-name")
    if args.checkpoint or args.export:
        path = args.checkpoint or args.export
        name = args.model_name or os.path.basename(os.path.normpath(path))
        return [(name, "checkpoint" if args.checkpoint else "export", path)]
    out = []
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model must be NAME=CHECKPOINT_DIR, got {item!r}")
        if not os.path.exists(path):
            raise ConfigError(f"--model {item}: {path} does not exist")
        out.append((name, "checkpoint", path))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"--model names must differ, got {names}")
    return out


def load_models(args, registry) -> tuple[list, list[str]]:
    """The started models of the command line, and a description of each."""
    preferred = parse_batch_sizes(args.preferred_batch_sizes, args.max_batch_size)
    models, what = [], []
    for name, kind, path in parse_models(args):
        if kind == "checkpoint" and is_encoder_checkpoint(path):
            if (args.quantize, args.kv_cache, args.data, args.tensor, args.fuse) != (
                    "none", "auto", 1, 1, False):
                raise ConfigError("--quantize, --kv-cache, --fuse, --data and --tensor apply to "
                                  "decoders; an encoder checkpoint is served on one device")
            from lm.finetune import Encoder
            encoder = Encoder.from_checkpoint(path, args.max_batch_size)
            models.append(encoder_model(
                name, encoder, max_batch_size=args.max_batch_size,
                max_queue_delay_ms=args.max_queue_delay_ms, max_queue_size=args.max_queue_size,
                preferred=preferred, registry=registry, root=os.path.abspath(path)))
            what.append(f"{name} (encoder, task {encoder.task.name}, batches of up to "
                        f"{args.max_batch_size} rows)")
            continue
        if preferred:
            raise ConfigError("--preferred-batch-sizes applies to encoder checkpoints; a "
                              "decoder batches continuously over --max-batch-size slots")
        model = decoder_model(
            name, **{kind: path}, max_batch_size=args.max_batch_size,
            max_queue_delay_ms=args.max_queue_delay_ms, max_queue_size=args.max_queue_size,
            registry=registry, quantize=args.quantize, kv_cache=args.kv_cache,
            data=args.data, tensor=args.tensor, fuse=args.fuse)
        model.scheduler.batched_prefill = args.prefill == "batched"
        model.scheduler.incremental = args.detokenize == "incremental"
        models.append(model)
        what.append(f"{name} ({model.scheduler.slots.num_slots} slots)")
    return models, what


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lm.serve", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="a training workdir or one checkpoint directory "
                   "(a decoder, or an encoder: model.style bert, task classify / span)")
    p.add_argument("--export", help="a directory written by python -m lm.export")
    p.add_argument("--model", action="append", metavar="NAME=DIR",
                   help="a checkpoint served as NAME (repeatable: several models, routed by the "
                   "request's model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument("--model-name", help="the model id in responses (default: the directory)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="decode slots (a decoder); rows per forward (an encoder); per model")
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                   help="while slots are free, how long the first waiting request waits for "
                   "others to start with it")
    p.add_argument("--preferred-batch-sizes",
                   help="an encoder: comma-separated batch sizes (e.g. 4,8) launched as soon "
                   "as the queue holds one")
    p.add_argument("--max-queue-size", type=int, default=256,
                   help="sequences (a decoder) or rows (an encoder) waiting; beyond: 429")
    p.add_argument("--timeout-s", type=float, default=60.0,
                   help="a request not finished in this time gets 503 and is cancelled")
    p.add_argument("--max-body-mb", type=float, default=16.0,
                   help="larger request bodies get 413 (unread)")
    p.add_argument("--read-timeout-s", type=float, default=30.0,
                   help="request headers and body must arrive within this time")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="concurrent connections; beyond: 503")
    p.add_argument("--prefill", choices=["batched", "one"], default="batched",
                   help="one: a prefill per request (bench/serve.py's comparison)")
    p.add_argument("--detokenize", choices=["incremental", "full"], default="incremental",
                   help="full: decode the whole text at every token (bench/serve.py's comparison)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none")
    p.add_argument("--kv-cache", choices=["auto", "int8"], default="auto")
    p.add_argument("--fuse", action="store_true",
                   help="q, k, v and the SwiGLU gate and up as one matmul each (lm.fuse)")
    p.add_argument("--data", type=int, default=1, help="devices the slots are split over")
    p.add_argument("--tensor", type=int, default=1, help="devices heads are split over")
    args = p.parse_args(argv)
    try:
        for key in ("max_batch_size", "max_queue_size", "data", "tensor", "max_connections"):
            if getattr(args, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got "
                                  f"{getattr(args, key)}")
        if args.timeout_s <= 0 or args.max_queue_delay_ms < 0 or args.read_timeout_s <= 0:
            raise ConfigError("--timeout-s and --read-timeout-s must be > 0 and "
                              "--max-queue-delay-ms >= 0")
        if args.max_body_mb <= 0:
            raise ConfigError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
        parse_models(args)  # bad names fail before anything loads
        registry = prom.CollectorRegistry()
        models, what = load_models(args, registry)
        app = App(models, Limits(args.timeout_s, int(args.max_body_mb * (1 << 20)),
                                 args.read_timeout_s), registry)
        server = HTTPServer(app, args.host, args.port, max_connections=args.max_connections)
    except (ConfigError, ValueError, OSError) as e:
        print(f"lm.serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    # The port is the line's last field (scripts read it).
    print(f"lm.serve: {'; '.join(what)} on http://{server.host}:{server.port}", flush=True)
    try:
        server.run()  # uvicorn: SIGTERM / Ctrl-C finish the accepted requests first
    finally:
        for m in app.models.values():
            m.worker.drain(args.timeout_s)
            m.worker.stop()
        server.sock.close()


if __name__ == "__main__":
    main()
