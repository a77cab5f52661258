"""`python -m lm.trace`: the profile of the shared trained workdir (train.profile_steps "2:2")
summed into the model's scopes."""
import subprocess
import sys

import pytest

from conftest import ROOT
from lm import trace


def test_scope_paths_fall_in_their_groups():
    assert trace.group("jit(train_step)/jvp(block)/attention/dot_general") == "forward attention"
    assert trace.group("jit(train_step)/transpose(jvp())/while/body/closed_call/block/mlp/"
                       "block/mlp/checkpoint/dot_general") == "backward mlp"  # scanned, remat
    assert trace.group("jit(train_step)/transpose(jvp(loss))/add_any") == "backward loss"
    assert trace.group("jit(train_step)/jvp(btd,vd->btv)/dot_general") == "forward other"
    assert trace.group("jit(train_step)/optimizer/mul") == "optimizer"
    assert trace.group("jit(train_step)/(transpose(jvp(block))/mlp/reduce_sum:jvp()/reduce_sum)",
                       "all-reduce", "all-reduce.38") == "collectives"  # combined metadata
    assert trace.group("") == trace.group("jit(add)/add") == "other"


def test_trace_of_a_trained_workdir_splits_time_by_scope(trained_workdir):
    summary = trace.summarize(trace.find_trace(str(trained_workdir)), top=10**6)
    groups = summary["groups"]
    assert set(groups) == set(trace.GROUPS)
    for name in ("forward attention", "backward attention", "forward mlp", "backward mlp",
                 "forward loss", "backward loss", "optimizer", "collectives"):  # data=8
        assert groups[name] > 0, (name, groups)
    ops = summary["top_ops"]  # every op, each counted in exactly one group
    assert sum(groups.values()) == pytest.approx(sum(r["ms"] for r in ops), rel=1e-9)
    assert summary["total_ms"] == pytest.approx(sum(groups.values()), rel=1e-9)
    assert summary["devices"] == 8  # mesh.data=8: every fake device ran the step
    assert ops[0]["ms"] >= ops[-1]["ms"] > 0 and all(r["count"] >= 1 for r in ops)

    proc = subprocess.run([sys.executable, "-m", "lm.trace", str(trained_workdir), "--top", "3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = {line[:20].strip(): float(line.split()[-2]) for line in proc.stdout.splitlines()
               if line[:20].strip() in trace.GROUPS}
    assert list(printed) == list(trace.GROUPS)
    total = float(proc.stdout.split(" ms of XLA ops")[0].rsplit(" ", 1)[1])
    assert sum(printed.values()) == pytest.approx(total, abs=0.05 * len(printed))  # rounding
    assert "top 3 ops" in proc.stdout and "jit(train_step)/" in proc.stdout


def test_a_workdir_without_a_trace_is_a_clear_error(tmp_path):
    (tmp_path / "tb").mkdir()
    proc = subprocess.run([sys.executable, "-m", "lm.trace", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert f"no trace in {tmp_path}" in proc.stderr and "train.profile_steps" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_file_that_is_not_a_trace_is_a_clear_error(tmp_path):
    bad = tmp_path / "host.xplane.pb"
    bad.write_bytes(b"not a trace")
    with pytest.raises(trace.TraceError, match=f"{bad} is not a readable profiler trace"):
        trace.summarize(trace.find_trace(str(tmp_path)))
