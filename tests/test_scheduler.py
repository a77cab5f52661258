"""`lm.scheduler.Scheduler` driven directly over `Engine.slots`, without HTTP."""
import queue
import threading
import time

import pytest

from lm.generate import Engine, SamplingParams, default_stop_ids, text_of
from lm.scheduler import Metrics, Scheduler, Sequence


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
                sent[index] += value[0]
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
    assert metrics.registry.get_sample_value("lm_generated_tokens_total") == \
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
    assert scheduler.metrics.registry.get_sample_value("lm_queue_size") == 3
