"""Triton-style dynamic batching for `lm.serve`'s encoder endpoints, in one thread.

checkpoint -> `lm.finetune.Encoder` -> `Batcher` (here; it owns the encoder's forward passes)
-> `lm.serve` (HTTP). It needs no HTTP to run: `run(kind, rows, padded)` is any function that
answers a list of rows of one kind ("classify", "answer", "embed") with one result per row.

A request is a `Job` of one or more rows. Queued jobs are split and merged into batches of the
oldest job's kind, first come first served: a batch is launched at once when the queue holds
`max_batch_size` rows of that kind, or one of the `preferred` sizes (the largest that fits),
and otherwise when the oldest job has waited `max_queue_delay_s`, with what is there (at most
`max_batch_size` rows). A job larger than a batch is split over several; each gets exactly its
own rows' results, in order. `padded` is the batch size the forward runs at: the smallest
preferred size >= the rows, else `max_batch_size` (so the compiled shapes are the preferred
sizes and the largest). The queue holds at most `max_queue_size` rows (`submit` refuses a job
beyond). A failed batch fails the jobs with rows in it (their `error`), and the thread goes on.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import prometheus_client as prom


ENCODER_METRICS = {
    "lm_request_seconds": (prom.Histogram, "Time from arrival to the answer", ("endpoint",),
                           (.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)),
    "lm_queue_seconds": (prom.Histogram, "Time from arrival to the request's first batch", (),
                         (.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)),
    "lm_encoder_batch_size": (prom.Histogram, "Rows in each encoder forward batch", (),
                              (1, 2, 4, 8, 16, 32, 64, 128, 256)),
    "lm_encoder_batch_seconds": (prom.Histogram, "Time of each encoder batch", (),
                                 (.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)),
    "lm_encoder_rows": (prom.Counter, "Rows run by the encoder", ("kind",), None),
    "lm_encoder_failed_batches": (prom.Counter, "Batches that raised", (), None),
    "lm_queue_size": (prom.Gauge, "Rows waiting for a batch", (), None),
}


class EncoderMetrics:
    """The Prometheus metrics of one served encoder (`ENCODER_METRICS`, labelled model_name) in
    `registry` (a new one by default), as attributes: request_seconds (.labels(endpoint)),
    queue_seconds, batch_size, batch_seconds, rows (.labels(kind)), failed_batches,
    queue_size."""

    def __init__(self, model_name: str = "model", registry: prom.CollectorRegistry | None = None):
        from lm.scheduler import family
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        for name, (kind, doc, extra, buckets) in ENCODER_METRICS.items():
            f = family(self.registry, name, kind, doc, ("model_name",) + extra, buckets)
            labelled = _Labelled(f, model_name) if extra else f.labels(model_name=model_name)
            setattr(self, name.removeprefix("lm_").removeprefix("encoder_"), labelled)


class _Labelled:
    """A family with its model_name label fixed: `.labels(x)` fills the other one."""

    def __init__(self, family, model_name: str):
        self.family, self.model_name = family, model_name

    def labels(self, value):
        return self.family.labels(self.model_name, value)


@dataclasses.dataclass(eq=False)
class Job:
    """One request: its rows of one kind, and, once `finished` is set, their `results` (in
    order) or an `error`."""
    kind: str
    rows: list
    arrival: float
    results: list = dataclasses.field(default_factory=list)
    error: str | None = None
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)
    taken: int = 0  # rows handed to batches
    done: int = 0  # rows answered
    cancelled: bool = False
    notify: Callable[[], None] | None = None  # called (from the batcher's thread) when finished

    def __post_init__(self):
        self.results = [None] * len(self.rows)

    def finish(self) -> None:
        self.finished.set()
        if self.notify is not None:
            self.notify()


class Batcher:
    """Dynamic batching of `Job`s over `run` in a thread of its own (module docstring):
    `submit` queues a job, `start` runs the loop, `cancel` withdraws a job's waiting rows,
    `drain` waits until everything accepted is answered, `stop` ends the loop."""

    def __init__(self, run: Callable[[str, list, int], Sequence], *, max_batch_size: int,
                 max_queue_delay_s: float, max_queue_size: int, preferred: Sequence[int] = (),
                 metrics: EncoderMetrics | None = None):
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, "
                             "max_queue_delay_s >= 0")
        bad = [p for p in preferred if not 1 <= p <= max_batch_size]
        if bad:
            raise ValueError(f"preferred batch sizes must be in [1, max_batch_size "
                             f"{max_batch_size}], got {bad}")
        self.run, self.max_batch_size, self.delay = run, max_batch_size, max_queue_delay_s
        self.max_queue_size, self.preferred = max_queue_size, tuple(sorted(set(preferred)))
        self.metrics = metrics if metrics is not None else EncoderMetrics()
        self.waiting: collections.deque[Job] = collections.deque()
        self.queued = 0  # rows waiting (not yet in a batch)
        self.running = 0  # rows in the batch being run
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self.batches = self.failures = 0
        self.thread = threading.Thread(target=self._loop, name="lm-batcher", daemon=True)

    def padded(self, rows: int) -> int:
        """The batch size a forward of `rows` rows runs at."""
        return next((p for p in self.preferred if p >= rows), self.max_batch_size)

    def shapes(self) -> tuple[int, ...]:
        """Every batch size `padded` gives (what to compile at start-up)."""
        return tuple(sorted(set(self.preferred) | {self.max_batch_size}))

    def submit(self, kind: str, rows: list, arrival: float | None = None) -> Job | None:
        """A queued job of `rows`, or None when they do not fit the queue (it holds
        `max_queue_size` rows)."""
        job = Job(kind, list(rows), time.monotonic() if arrival is None else arrival)
        if not job.rows:
            job.finish()
            return job
        with self.cond:
            if self.queued + len(job.rows) > self.max_queue_size:
                return None
            self.waiting.append(job)
            self.queued += len(job.rows)
            self.metrics.queue_size.set(self.queued)
            self.cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Withdraws a job's rows that are still waiting (a timed-out or abandoned request)."""
        with self.cond:
            job.cancelled = True
            self._withdraw(job)

    def _withdraw(self, job: Job) -> None:
        if job in self.waiting:
            self.waiting.remove(job)
            self.queued -= len(job.rows) - job.taken
            job.taken = len(job.rows)
            self.metrics.queue_size.set(self.queued)

    def start(self):
        self.thread.start()

    def stop(self):
        self._stop.set()
        with self.cond:
            self.cond.notify()
        self.thread.join(timeout=10)

    def drain(self, timeout: float):
        """Waits (at shutdown) until every queued and running row is answered."""
        deadline = time.monotonic() + timeout
        while (self.queued or self.running) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _launch_size(self, rows: int, waited: bool) -> int:
        """How many of `rows` queued rows (of one kind) to launch now; 0: wait for more."""
        if rows >= self.max_batch_size:
            return self.max_batch_size
        fits = [p for p in self.preferred if p <= rows]
        if fits:
            return fits[-1]
        return rows if waited else 0

    def _take(self) -> tuple[str, list[tuple[Job, int, int]]] | None:
        """The next batch: (kind, [(job, first row, end row)]), or None when stopping."""
        with self.cond:
            while not self._stop.is_set():
                if not self.waiting:
                    self.cond.wait(timeout=0.5)
                    continue
                head = self.waiting[0]
                kind = head.kind
                rows = 0
                for job in self.waiting:
                    if job.kind == kind:
                        rows += len(job.rows) - job.taken
                        if rows >= self.max_batch_size:
                            break
                left = head.arrival + self.delay - time.monotonic()
                size = self._launch_size(rows, left <= 0)
                if size:
                    break
                self.cond.wait(timeout=left)
            else:
                return None
            pieces, got = [], 0
            for job in list(self.waiting):
                if job.kind != kind:
                    continue
                k = min(size - got, len(job.rows) - job.taken)
                pieces.append((job, job.taken, job.taken + k))
                job.taken += k
                got += k
                if job.taken == len(job.rows):
                    self.waiting.remove(job)
                if got == size:
                    break
            self.queued -= got
            self.running = got
            self.metrics.queue_size.set(self.queued)
            return kind, pieces

    def _loop(self):
        while not self._stop.is_set():
            taken = self._take()
            if taken is None:
                return
            kind, pieces = taken
            try:
                self._run(kind, pieces)
            except Exception as e:  # noqa: BLE001 (a failure must not stop the server)
                self._fail(pieces, f"the batch failed: {type(e).__name__}: {e}")
            finally:
                with self.cond:
                    self.running = 0

    def _run(self, kind: str, pieces: list[tuple[Job, int, int]]) -> None:
        m = self.metrics
        start = time.monotonic()
        for job, lo, _ in pieces:
            if lo == 0:
                m.queue_seconds.observe(start - job.arrival)
        rows = [r for job, lo, hi in pieces for r in job.rows[lo:hi]]
        m.batch_size.observe(len(rows))
        m.rows.labels(kind).inc(len(rows))
        self.batches += 1
        out = list(self.run(kind, rows, self.padded(len(rows))))
        if len(out) != len(rows):
            raise RuntimeError(f"{len(rows)} rows gave {len(out)} results")
        m.batch_seconds.observe(time.monotonic() - start)
        k = 0
        for job, lo, hi in pieces:
            job.results[lo:hi] = out[k:k + hi - lo]
            k += hi - lo
            job.done += hi - lo
            if job.done == len(job.rows) and job.error is None:
                job.finish()

    def _fail(self, pieces: list[tuple[Job, int, int]], message: str) -> None:
        """Answers the jobs with rows in a failed batch with `message` (their rows still
        waiting are withdrawn)."""
        self.failures += 1
        self.metrics.failed_batches.inc()
        with self.cond:
            for job, _, _ in pieces:
                if job.error is None:
                    job.error = message
                    self._withdraw(job)
                    job.finish()
