"""Continuous batching for `lm.serve`: queued sequences over decode slots, in one thread.

checkpoint (or export) -> `Engine.slots` (or `Exported.slots`): `lm.generate.DecodeSlots`, the
rows of one KV cache -> `Scheduler` (here) -> `lm.serve` (HTTP). It needs no HTTP to run.

Each loop moves waiting `Sequence`s into free slots, all of them in one batched prefill
(`DecodeSlots.insert_many`, split into chunks by its token budget), then runs one decode step for
every slot, so a sequence joins while the others keep decoding. The queue delay is Triton's
dynamic-batching rule: while fewer sequences wait than there are free slots, the first waits up
to `max_queue_delay_s` (from its arrival) for others to start with it; the running sequences keep
decoding meanwhile. Text is decoded incrementally (`Tokenizer.stream`: constant work per token).

A sequence's `events` (any object with `put`) get, in order: (index, "prompt", Scored) when it
asked for `echo` (the prompt's logprobs), (index, "delta", Delta) per token (stop strings cut,
text that may still change held back), then (index, "done", finish_reason) or (index, "error",
message). A failed prefill or decode step answers the sequences it held with "error" and the loop
goes on from a fresh cache; if the loop itself dies, every queued and running sequence gets
"error", `alive` turns False and `submit` raises `SchedulerDown` at once.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import weakref

import numpy as np
import prometheus_client as prom

from lm.generate import DecodeSlots, SamplingParams

log = logging.getLogger("lm.scheduler")

LATENCY_BUCKETS = (.001, .005, .01, .02, .04, .06, .08, .1, .25, .5, .75, 1, 2.5, 5, 7.5, 10,
                   20, 40, 80)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

# name -> (kind, help, extra labels, buckets): vLLM's metric names (what its Grafana dashboard
# queries), each labelled by model_name; lm_* are ours.
METRICS = {
    "vllm:num_requests_running": (prom.Gauge, "Sequences in decode slots", (), None),
    "vllm:num_requests_waiting": (prom.Gauge, "Sequences waiting for a slot", (), None),
    "vllm:kv_cache_usage_perc": (prom.Gauge, "Fraction of the KV cache's positions in use (1 = "
                                 "full)", (), None),
    "vllm:prompt_tokens": (prom.Counter, "Prompt tokens prefilled", (), None),
    "vllm:generation_tokens": (prom.Counter, "Tokens generated", (), None),
    "vllm:request_success": (prom.Counter, "Sequences finished, by reason", ("finished_reason",),
                             None),
    "vllm:time_to_first_token_seconds": (prom.Histogram, "Arrival to first token", (),
                                         LATENCY_BUCKETS),
    "vllm:inter_token_latency_seconds": (prom.Histogram, "Time between a sequence's tokens", (),
                                         LATENCY_BUCKETS),
    "vllm:e2e_request_latency_seconds": (prom.Histogram, "Arrival to the last token", (),
                                         LATENCY_BUCKETS),
    "vllm:request_queue_time_seconds": (prom.Histogram, "Arrival to a decode slot", (),
                                        LATENCY_BUCKETS),
    "vllm:request_prompt_tokens": (prom.Histogram, "Prompt tokens per sequence", (),
                                   TOKEN_BUCKETS),
    "vllm:request_generation_tokens": (prom.Histogram, "Generated tokens per sequence", (),
                                       TOKEN_BUCKETS),
    "lm_batch_size": (prom.Histogram, "Sequences in each decode step", (),
                      (1, 2, 4, 8, 16, 32, 64, 128, 256)),
    "lm_prefill_batch_size": (prom.Histogram, "Sequences started by each batched prefill", (),
                              (1, 2, 4, 8, 16, 32, 64, 128, 256)),
    "lm_failed_steps": (prom.Counter, "Prefills and decode steps that raised", (), None),
}

_families: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def family(registry: prom.CollectorRegistry, name: str, kind, doc: str, labels=(),
           buckets=None):
    """The metric `name` of `registry`, registered on first use (several models of one server
    share the families and differ by label)."""
    known = _families.setdefault(registry, {})
    if name not in known:
        kw = {} if buckets is None else {"buckets": buckets}
        known[name] = kind(name, doc, list(labels), registry=registry, **kw)
    return known[name]


class Metrics:
    """One model's metrics (`METRICS`, labelled model_name=`model_name`) in `registry` (a new
    one by default): `m["vllm:prompt_tokens"].inc(n)`, `m.reason("stop").inc()`."""

    def __init__(self, model_name: str = "model", registry: prom.CollectorRegistry | None = None):
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self.model_name = model_name
        self._by_name = {}
        for name, (kind, doc, extra, buckets) in METRICS.items():
            f = family(self.registry, name, kind, doc, ("model_name",) + extra, buckets)
            self._by_name[name] = f if extra else f.labels(model_name=model_name)

    def __getitem__(self, name: str):
        return self._by_name[name]

    def reason(self, finished_reason: str):
        return self._by_name["vllm:request_success"].labels(model_name=self.model_name,
                                                            finished_reason=finished_reason)


@dataclasses.dataclass
class TokenLogprob:
    """A token's raw logprob (the model's log-softmax), the most likely alternatives at its
    position (best first), and the characters of the sequence's text before it."""
    token: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int


@dataclasses.dataclass
class Delta:
    """What one token adds: new text (may be "" while held back), the new id ([] for a stop
    id) and, when asked for, its TokenLogprob (a stop id's too)."""
    text: str
    ids: list[int]
    logprobs: list[TokenLogprob]


@dataclasses.dataclass(eq=False)
class Sequence:
    """One choice of one request, from the queue through a slot to its last token. `logprobs`:
    None (none) or how many alternatives to return per token; `echo`: also the prompt's
    logprobs; `stop_ids`: the ids that end it (None: the scheduler's)."""
    index: int
    prompt: list[int]
    sampling: SamplingParams
    events: object  # .put((index, kind, value)); shared by the request's sequences
    arrival: float
    cancelled: threading.Event
    logprobs: int | None = None
    echo: bool = False
    stop_ids: tuple[int, ...] | None = None
    ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # the final text, once done (stop strings cut)
    finish_reason: str | None = None
    stream: object = None  # the tokenizer's TextStream
    sent: int = 0  # characters sent
    last_token: float = 0.0


class SchedulerDown(RuntimeError):
    """The scheduler's loop has died: no request can be served (503)."""


class Scheduler:
    """Continuous batching over `slots` (a DecodeSlots) in a thread of its own: `submit`
    queues a request's sequences, `start` runs the loop, `stop` ends it. `stop_ids` end a
    sequence (finish reason "stop", the id not returned); without a tokenizer the events carry
    token ids only."""

    def __init__(self, slots: DecodeSlots, tokenizer, stop_ids: tuple[int, ...],
                 max_queue_delay_s: float, max_queue_size: int, metrics: Metrics | None = None):
        self.slots, self.tokenizer, self.stop_ids = slots, tokenizer, stop_ids
        self.delay, self.max_queue_size = max_queue_delay_s, max_queue_size
        self.metrics = metrics if metrics is not None else Metrics()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.cond = threading.Condition()
        self.active: dict[int, Sequence] = {}
        self.free = list(range(slots.num_slots))
        self._stop = threading.Event()
        self.failures = 0
        self.crashed: str | None = None  # why the loop died
        # bench/serve.py's "before": one prefill per sequence, the whole text decoded per token.
        self.batched_prefill = True
        self.incremental = True
        self.thread = threading.Thread(target=self._run, name="lm-scheduler", daemon=True)

    @property
    def alive(self) -> bool:
        return self.crashed is None and (self.thread.is_alive() or not self.thread.ident)

    def submit(self, seqs: list[Sequence]) -> bool:
        """Queues all of a request's sequences, or none (False: the queue is full).
        SchedulerDown when the loop has died."""
        with self.cond:
            if not self.alive:
                raise SchedulerDown(f"the scheduler has stopped: {self.crashed or 'not running'}")
            if len(self.waiting) + len(seqs) > self.max_queue_size:
                return False
            self.waiting.extend(seqs)
            self.metrics["vllm:num_requests_waiting"].set(len(self.waiting))
            self.cond.notify()
        return True

    def start(self):
        self.thread.start()

    def stop(self):
        self._stop.set()
        with self.cond:
            self.cond.notify()
        self.thread.join(timeout=10)

    def drain(self, timeout: float):
        """Waits (at shutdown) until every queued and running sequence is answered."""
        deadline = time.monotonic() + timeout
        while (self.waiting or self.active) and time.monotonic() < deadline and self.alive:
            time.sleep(0.05)

    # The loop

    def _run(self):
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 (whatever kills the loop is reported)
            log.exception("the scheduler loop died")
            self.crashed = f"{type(e).__name__}: {e}"
            with self.cond:
                dead = list(self.active.values()) + list(self.waiting)
                self.waiting.clear()
            for seq in dead:
                seq.events.put((seq.index, "error", f"the scheduler stopped: {self.crashed}"))
            self.active.clear()

    def _loop(self):
        while not self._stop.is_set():
            self._start([s for s in self._take() if not s.cancelled.is_set()])
            for slot, seq in list(self.active.items()):
                if seq.cancelled.is_set():
                    self._release(slot)
            self._gauges()
            if not self.active:
                continue
            self.metrics["lm_batch_size"].observe(len(self.active))
            try:
                step = self.slots.step()
            except Exception as e:  # noqa: BLE001 (answer those it held, keep serving)
                log.exception("a decode step failed")
                self._fail_all(f"decode failed: {e}")
                continue
            for slot, seq in list(self.active.items()):
                self._accept(slot, seq, step, slot)

    def _take(self) -> list[Sequence]:
        """The sequences to start now, at most one per free slot. While fewer wait than slots
        are free, the first waits up to the queue delay (from its arrival) for others: blocking
        when nothing runs, else by starting none yet (the running ones keep decoding)."""
        with self.cond:
            if not self.active:
                while not self.waiting and not self._stop.is_set():
                    self.cond.wait(timeout=0.5)
            if self.waiting and len(self.waiting) < len(self.free):
                deadline = self.waiting[0].arrival + self.delay
                if self.active:
                    if time.monotonic() < deadline:
                        return []
                else:
                    while (len(self.waiting) < len(self.free) and not self._stop.is_set()
                           and (left := deadline - time.monotonic()) > 0):
                        self.cond.wait(timeout=left)
            taken = []
            while self.waiting and len(taken) < len(self.free):
                taken.append(self.waiting.popleft())
            self.metrics["vllm:num_requests_waiting"].set(len(self.waiting))
            return taken

    def _start(self, seqs: list[Sequence]) -> None:
        """Scores the prompts that asked for echo, then prefills all of `seqs` into free slots
        (one batched prefill, or one each without batched_prefill) and records their first
        tokens."""
        if not seqs:
            return
        now = time.monotonic()
        scored = [s for s in seqs if s.echo]
        if scored:
            try:
                for seq, result in zip(scored, self.slots.score([s.prompt for s in scored])):
                    seq.events.put((seq.index, "prompt", result))
            except Exception as e:  # noqa: BLE001 (fails only these sequences)
                log.exception("scoring prompts failed")
                for seq in scored:
                    seq.events.put((seq.index, "error", f"scoring the prompt failed: {e}"))
                seqs = [s for s in seqs if not s.echo]
        groups = [seqs] if self.batched_prefill else [[s] for s in seqs]
        for group in groups:
            if group:
                self._prefill(group, now)

    def _prefill(self, seqs: list[Sequence], now: float) -> None:
        slots = [self.free.pop() for _ in seqs]
        for seq in seqs:
            self.metrics["vllm:request_queue_time_seconds"].observe(now - seq.arrival)
        try:
            first = self.slots.insert_many(slots, [s.prompt for s in seqs],
                                           [s.sampling for s in seqs])
        except Exception as e:  # noqa: BLE001 (a failure must not stop the server)
            log.exception("a prefill failed")
            self.free += slots
            for seq in seqs:
                seq.events.put((seq.index, "error", f"prefill failed: {e}"))
            # The donated cache may be gone: the running sequences fail too.
            self._fail_all(f"prefill of another request failed: {e}")
            return
        self.metrics["lm_prefill_batch_size"].observe(len(seqs))
        t = time.monotonic()
        for i, (slot, seq) in enumerate(zip(slots, seqs)):
            self.metrics["vllm:time_to_first_token_seconds"].observe(t - seq.arrival)
            self.metrics["vllm:prompt_tokens"].inc(len(seq.prompt))
            self.metrics["vllm:request_prompt_tokens"].observe(len(seq.prompt))
            seq.last_token = t
            if self.tokenizer is not None:
                seq.stream = self.tokenizer.stream()
            self.active[slot] = seq
            self._accept(slot, seq, first, i)

    def _gauges(self):
        self.metrics["vllm:num_requests_running"].set(len(self.active))
        used = sum(len(s.prompt) + len(s.ids) for s in self.active.values())
        self.metrics["vllm:kv_cache_usage_perc"].set(
            used / (self.slots.num_slots * self.slots.max_len))

    def _fail_all(self, message: str):
        """Answers every running sequence with an error and starts from a fresh cache (a failed
        step may have consumed the donated one)."""
        for slot, seq in list(self.active.items()):
            seq.events.put((seq.index, "error", message))
            self._release(slot)
        self.slots.reset()
        self.failures += 1
        self.metrics["lm_failed_steps"].inc()

    def _accept(self, slot: int, seq: Sequence, sampled, row: int):
        """Records a sequence's next token (row `row` of a `Sampled`); sends the new text and
        finishes it when due."""
        token = int(sampled.token_b[row])
        now = time.monotonic()
        if seq.ids:
            self.metrics["vllm:inter_token_latency_seconds"].observe(now - seq.last_token)
        seq.last_token = now
        stops = self.stop_ids if seq.stop_ids is None else seq.stop_ids
        stopped = token in stops  # ends the sequence; not returned
        entries = []
        if seq.logprobs is not None:
            k = seq.logprobs
            entries = [TokenLogprob(token, float(sampled.logprob_b[row]), list(zip(
                sampled.top_ids_bk[row, :k].tolist(), sampled.top_logprobs_bk[row, :k].tolist())),
                len(seq.stream.text) if seq.stream is not None else 0)]
        new_ids = [] if stopped else [token]
        seq.ids += new_ids
        self.metrics["vllm:generation_tokens"].inc(len(new_ids))
        reason = "stop" if stopped else (
            "length" if len(seq.ids) >= seq.sampling.max_new_tokens else None)
        text = ""
        if seq.stream is not None:
            text, cut = self._text(seq, [] if stopped else new_ids, final=reason is not None)
            if cut:
                reason = "stop"
        if new_ids or text or entries:
            seq.events.put((seq.index, "delta", Delta(text, new_ids, entries)))
        if reason:
            seq.finish_reason = reason
            seq.text = seq.stream.text[:seq.sent] if seq.stream is not None else ""
            self.metrics.reason(reason).inc()
            self.metrics["vllm:e2e_request_latency_seconds"].observe(now - seq.arrival)
            self.metrics["vllm:request_generation_tokens"].observe(len(seq.ids))
            seq.events.put((seq.index, "done", reason))
            self._release(slot)

    def _text(self, seq: Sequence, new_ids: list[int], final: bool) -> tuple[str, bool]:
        """(the text to send now, whether a stop string ended it): decodes only the new id and
        searches for stop strings only where the new characters can complete one."""
        stream, stops = seq.stream, seq.sampling.stop
        before = len(stream.text)
        if self.incremental:
            for t in new_ids:
                stream.push(t)
        elif new_ids:
            stream.text = self.tokenizer.decode(np.asarray(seq.ids, np.int32)).rstrip("\ufffd")
        if final:
            # Whatever bytes the stream still holds (an incomplete character) end as U+FFFD,
            # as a whole decode gives them.
            whole = self.tokenizer.decode(np.asarray(seq.ids, np.int32))
            if whole.startswith(stream.text):
                stream.text = whole
        full = stream.text
        longest = max((len(s) for s in stops), default=0)
        start = max(0, before - longest + 1)
        hits = [i for s in stops if (i := full.find(s, start)) >= 0]
        if hits:
            end = min(hits)
            out, seq.sent = full[seq.sent:end], max(seq.sent, end)
            return out, True
        end = len(full) if final else len(full) - _held(full, stops, longest)
        out = full[seq.sent:end] if end > seq.sent else ""
        seq.sent = max(seq.sent, end)
        return out, False

    def _release(self, slot: int):
        del self.active[slot]
        self.free.append(slot)
        self.slots.release(slot)


def _held(text: str, stops: tuple[str, ...], longest: int) -> int:
    """How many characters at the end of `text` to hold back: an ending that may still grow
    into a stop string, and a trailing U+FFFD (a character whose bytes may be incomplete)."""
    tail = text[-(longest + 8):] if longest else text[-8:]
    held = len(tail) - len(tail.rstrip("\ufffd"))
    tail = tail[:len(tail) - held]
    for n in range(min(len(tail), longest), 0, -1):
        if any(s.startswith(tail[-n:]) for s in stops):
            return held + n
    return held
