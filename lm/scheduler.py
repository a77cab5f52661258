"""Continuous batching for `lm.serve`: queued sequences over decode slots, in one thread.

checkpoint (or export) -> `Engine.slots` (or `Exported.slots`): `lm.generate.DecodeSlots`, the
rows of one KV cache -> `Scheduler` (here) -> `lm.serve` (HTTP). It needs no HTTP to run.

Each loop moves queued `Sequence`s into free slots (a prefill each), then runs one decode step
for every slot, so a sequence joins while the others keep decoding; idle, the first waits up to
the queue delay for others. A sequence's `events` queue gets (index, "delta", (text, ids)) per
token (stop strings cut, text that may still change held back), then (index, "done",
finish_reason) or (index, "error", message).
"""
from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time

import numpy as np
import prometheus_client as prom

from lm.generate import DecodeSlots, SamplingParams, cut_at_stop


class Metrics:
    """The Prometheus metrics of a server: the scheduler records queueing, batching and tokens,
    the HTTP layer the requests by status."""

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
    """Continuous batching over `slots` (a DecodeSlots) in a thread of its own: `submit`
    queues a request's sequences, `start` runs the loop, `stop` ends it. `stop_ids` end a
    sequence (finish reason "stop", the id not returned); without a tokenizer the events carry
    token ids only."""

    def __init__(self, slots: DecodeSlots, tokenizer, stop_ids: tuple[int, ...],
                 max_queue_delay_s: float, max_queue_size: int, metrics: Metrics | None = None):
        metrics = metrics if metrics is not None else Metrics()
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
        stopped = token in self.stop_ids  # ends the sequence; not returned
        new_ids = [] if stopped else [token]
        seq.ids += new_ids
        self.metrics.tokens.inc(len(new_ids))
        reason = "stop" if stopped else (
            "length" if len(seq.ids) >= seq.sampling.max_new_tokens else None)
        text = seq.text  # stays "" without a tokenizer
        if self.tokenizer is not None:
            text, cut = cut_at_stop(self.tokenizer.decode(np.asarray(seq.ids, np.int32)),
                                    seq.sampling.stop)
            if cut:
                reason = "stop"
            elif reason is None:  # more text may follow: send only what cannot change
                text = _hold_back(text, seq.sampling.stop)
        if new_ids or text != seq.text:
            seq.events.put((seq.index, "delta", (text[len(seq.text):], new_ids)))
        seq.text = text
        if reason:
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
