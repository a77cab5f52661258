"""`lm.scheduler.Scheduler` driven directly over `Engine.slots`, without HTTP."""
import queue
import threading
import time

import pytest

from lm.generate import Engine, SamplingParams, default_stop_ids, text_of
from lm.scheduler import Metrics, Scheduler, SchedulerDown, Sequence

MODEL = {"model_name": "model"}


@pytest.fixture(scope="module")
def engine(trained_workdir):
    return Engine.from_checkpoint(str(trained_workdir))


def sequences(prompts, sampling):
    """One request's sequences: they share an event queue and a cancel flag."""
    events, cancelled, now = queue.Queue(), threading.Event(), time.monotonic()
    return [Sequence(i, p, sp, events, now, cancelled)
            for i, (p, sp) in enumerate(zip(prompts, sampling))]


def test_sequences_through_two_slots_equal_the_engine_alone(engine):
    tok = engine.tokenizer
    stop_ids = default_stop_ids(tok)
    prompts = [[int(t) for t in tok.encode(s)] for s in ("def main(", "x", "import os\n", "#")]
    greedy = engine.generate([prompts[0]], SamplingParams(max_new_tokens=12,
                                                          stop_ids=stop_ids))[0]
    full = text_of(greedy, tok)
    stop = next(full[k:k + 2] for k in range(len(full) // 2, len(full) - 1)
                if full[k:k + 2].strip())
    sampling = [SamplingParams(max_new_tokens=12, stop_ids=stop_ids, stop=(stop,)),
                SamplingParams(max_new_tokens=3, stop_ids=stop_ids),
                SamplingParams(max_new_tokens=9, temperature=1.0, top_p=0.9, seed=3,
                               stop_ids=stop_ids),
                SamplingParams(max_new_tokens=5, temperature=0.8, top_k=20, seed=4,
                               stop_ids=stop_ids)]
    metrics = Metrics()
    # Two slots for four sequences: the later ones start as the earlier ones finish.
    scheduler = Scheduler(engine.slots(2), tok, stop_ids, 0.0, 16, metrics)
    seqs = sequences(prompts, sampling)
    scheduler.start()
    try:
        assert scheduler.submit(seqs)
        sent, done = {s.index: "" for s in seqs}, {}
        while len(done) < len(seqs):
            index, kind, value = seqs[0].events.get(timeout=120)
            assert kind != "error", value
            if kind == "delta":
                sent[index] += value.text
            else:
                done[index] = value
    finally:
        scheduler.stop()
    for seq, sp in zip(seqs, sampling):
        want = engine.generate([seq.prompt], sp)[0]
        assert seq.ids == want
        assert seq.text == sent[seq.index] == text_of(want, tok, sp.stop)
        ended = len(want) < sp.max_new_tokens or (seq is seqs[0])
        assert seq.finish_reason == done[seq.index] == ("stop" if ended else "length")
    assert seqs[0].text == full[:full.index(stop)]
    assert metrics.registry.get_sample_value("vllm:generation_tokens_total", MODEL) == \
        sum(len(s.ids) for s in seqs)
    assert not scheduler.active and sorted(scheduler.free) == [0, 1]


def test_a_full_queue_refuses_a_whole_request(engine):
    # Not started: nothing leaves the queue.
    scheduler = Scheduler(engine.slots(1), engine.tokenizer, (), 0.0, 3)
    sp = SamplingParams(max_new_tokens=2)
    assert scheduler.submit(sequences([[5], [6]], [sp, sp]))
    assert not scheduler.submit(sequences([[7], [8]], [sp, sp]))  # all of it or none
    assert len(scheduler.waiting) == 2
    assert scheduler.submit(sequences([[9]], [sp]))
    assert not scheduler.submit(sequences([[10]], [sp]))
    assert scheduler.metrics.registry.get_sample_value("vllm:num_requests_waiting", MODEL) == 3


def run_all(scheduler, seqs, timeout=120):
    """Submits one request's sequences and collects {index: (sent text, finish or error)}."""
    assert scheduler.submit(seqs)
    sent, done = {s.index: "" for s in seqs}, {}
    while len(done) < len(seqs):
        index, kind, value = seqs[0].events.get(timeout=timeout)
        if kind == "delta":
            sent[index] += value.text
        elif kind in ("done", "error"):
            done[index] = (kind, value)
    return sent, done


def test_waiting_sequences_start_in_one_batched_prefill_and_equal_the_engine(engine):
    tok = engine.tokenizer
    stop_ids = default_stop_ids(tok)
    prompts = [[int(t) for t in tok.encode(s)] for s in
               ("def f(", "import", "class A:\n    def", "x = [", "#!", "return self.")]
    sampling = [SamplingParams(max_new_tokens=6 + i, stop_ids=stop_ids,
                               temperature=0.0 if i % 2 else 0.9, seed=i) for i in range(6)]
    scheduler = Scheduler(engine.slots(8), tok, stop_ids, 0.0, 16)
    scheduler.start()
    try:
        seqs = sequences(prompts, sampling)
        sent, done = run_all(scheduler, seqs)
    finally:
        scheduler.stop()
    prefills = scheduler.metrics.registry.get_sample_value("lm_prefill_batch_size_count", MODEL)
    assert prefills == 1  # all six in one call
    for seq, sp in zip(seqs, sampling):
        assert done[seq.index][0] == "done"
        want = engine.generate([seq.prompt], sp)[0]
        assert seq.ids == want
        assert sent[seq.index] == seq.text == text_of(want, tok)


def test_a_dead_loop_fails_everything_queued_and_refuses_new_work_at_once(engine):
    """A bug that kills the loop (here: the slots' step raising SystemExit) answers every
    running and waiting sequence with an error; `submit` then raises SchedulerDown."""
    slots = engine.slots(1)

    def broken():
        raise SystemExit("the loop's bug")
    slots.step = broken
    scheduler = Scheduler(slots, engine.tokenizer, (), 0.0, 8)
    scheduler.start()
    sp = SamplingParams(max_new_tokens=4)
    seqs = sequences([[5, 6], [7]], [sp, sp])
    sent, done = run_all(scheduler, seqs, timeout=60)
    assert [done[i][0] for i in (0, 1)] == ["error", "error"]
    assert "the loop's bug" in done[1][1]
    scheduler.thread.join(timeout=10)
    assert not scheduler.alive
    with pytest.raises(SchedulerDown, match="the loop's bug"):
        scheduler.submit(sequences([[5]], [sp]))


def test_a_failed_step_fails_only_running_sequences_and_the_loop_goes_on(engine):
    slots = engine.slots(2)
    real, calls = slots.step, []

    def flaky():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("one bad step")
        return real()
    slots.step = flaky
    scheduler = Scheduler(slots, engine.tokenizer, (), 0.0, 8)
    scheduler.start()
    try:
        sp = SamplingParams(max_new_tokens=5)
        _, done = run_all(scheduler, sequences([[5, 6]], [sp]))
        assert done[0][0] == "error" and "one bad step" in done[0][1]
        seqs = sequences([[5, 6]], [sp])
        _, done = run_all(scheduler, seqs)
        assert done[0] == ("done", "length")
        assert seqs[0].ids == engine.generate([[5, 6]], sp)[0]
        assert scheduler.alive and scheduler.failures == 1
    finally:
        scheduler.stop()
