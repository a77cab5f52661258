"""lm.plan: the talk's and the ZeRO paper's arithmetic, and agreement with XLA where it compiles."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from lm import plan
from lm.config import from_config_dict, load_config_file, override

GB = 1e9


def load(name, **flat):
    return from_config_dict(override(load_config_file(os.path.join(ROOT, "configs", name)),
                                     **flat))


def test_fp16_adam_with_master_weights_is_16_bytes_per_parameter():
    run = load("llama_1b.py", **{"precision.param_dtype": "float16", "mesh.data": 1,
                                 "precision.master_weights": True, "mesh.rules": "dp"})
    p = plan.plan(run, devices=1)
    assert p["state_bytes"] == 16 * p["params"]  # 2 + 2 + (4 + 4 + 4)
    assert p["params_bytes"] == p["grads_bytes"] == 2 * p["params"]


@pytest.mark.parametrize("rules,paper_gb", [("dp", 120), ("zero1", 31.4), ("zero2", 16.6),
                                            ("zero3", 1.9)])
def test_zero_paper_7b5_on_64_devices(rules, paper_gb):
    p = plan.plan(load("zero_7b5.py", **{"mesh.rules": rules}), devices=64)
    assert p["params"] == pytest.approx(7.5e9, rel=0.01)
    assert p["state_bytes"] / GB == pytest.approx(paper_gb, rel=0.03)


def test_gpt3_175b_on_1024_gpus():
    p = plan.plan(load("gpt3_175b.py"), devices=1024)
    assert p["mesh"] == {"data": 8, "fsdp": 1, "tensor": 8, "sequence": 1, "pipeline": 16}
    assert p["params"] == pytest.approx(175e9, rel=0.01)
    assert p["flops_with_recompute"] == pytest.approx(4.5e18, rel=0.03)  # the talk: 4.5 EFLOP
    assert p["state_bytes_unsharded"] == pytest.approx(2.8e12, rel=0.03)  # ~2.8 TB in fp16
    assert p["pipeline_bubble"] == pytest.approx(15 / (192 + 15))
    assert p["total_bytes"] < 80 * GB  # fits an 80 GB GPU
    assert p["comm_bytes"]["tensor"] > p["comm_bytes"]["pipeline"] > p["comm_bytes"]["data"] > 0


# fp32 with scanned layers (the default layout): XLA:CPU computes bfloat16 in float32, and
# unrolled layers let its scheduler gather / keep more at once (see lm.plan's docstring).
XLA_CASES = {
    "dp": {"mesh.data": 8},
    "zero2": {"mesh.data": 8, "mesh.rules": "zero2"},
    "zero3": {"mesh.fsdp": 8, "mesh.rules": "zero3"},
    "fsdp": {"mesh.data": 4, "mesh.fsdp": 2, "mesh.rules": "fsdp"},
    "tp": {"mesh.data": 2, "mesh.tensor": 4, "mesh.rules": "tp"},
    "tp+sp": {"mesh.data": 2, "mesh.tensor": 4, "mesh.rules": "tp+sp"},
    "fsdp+tp": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
    "sequence": {"mesh.data": 4, "mesh.sequence": 2, "mesh.tensor": 1},
    "remat-full": {"mesh.data": 8, "model.remat": "full"},
    "remat-dots": {"mesh.data": 8, "model.remat": "dots"},
    "microbatches": {"mesh.data": 8, "mesh.rules": "zero2", "train.microbatches": 2},
    "pipeline-gpipe": {"mesh.data": 4, "mesh.pipeline": 2, "pipeline.microbatches": 4},
    "pipeline-interleaved": {"mesh.data": 1, "mesh.tensor": 2, "mesh.pipeline": 4,
                             "model.num_layers": 8, "pipeline.microbatches": 4,
                             "pipeline.schedule": "interleaved", "pipeline.virtual_stages": 2},
    "pipeline-remat": {"mesh.data": 2, "mesh.pipeline": 4, "model.num_layers": 8,
                       "pipeline.microbatches": 8, "model.remat": "full"},
}


@pytest.mark.parametrize("case", list(XLA_CASES))
def test_estimate_is_within_15_percent_of_xla(case):
    run = load("tiny.py", **{"model.scan_layers": True, **XLA_CASES[case]})
    estimate = plan.plan(run, devices=8)["total_bytes"]
    compiled = plan.compiled_memory(run)["total_bytes"]
    assert estimate == pytest.approx(compiled, rel=0.15), (estimate, compiled)


def test_zero1_estimate_is_an_upper_bound():
    # ZeRO's accounting keeps whole gradients under zero1; GSPMD sees that the optimizer only
    # reads its shard and reduce-scatters them anyway, so XLA's zero1 is zero2's memory.
    run = load("tiny.py", **{"model.scan_layers": True, "mesh.data": 8, "mesh.rules": "zero1"})
    p = plan.plan(run, devices=8)
    compiled = plan.compiled_memory(run)["total_bytes"]
    assert compiled <= p["total_bytes"] <= compiled + p["grads_bytes"]


def test_llama_gqa_estimate_is_within_15_percent_of_xla():
    run = load("tiny.py:llama", **{"model.scan_layers": True, "mesh.data": 2, "mesh.fsdp": 2,
                                   "mesh.tensor": 2})
    estimate = plan.plan(run, devices=8)["total_bytes"]
    compiled = plan.compiled_memory(run)["total_bytes"]
    assert estimate == pytest.approx(compiled, rel=0.15), (estimate, compiled)


def test_command_line_json_and_errors():
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "lm.plan", "--config", os.path.join(ROOT, "configs/zero_7b5.py"),
           "--devices", "64", "--config.mesh.rules=zero2", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
                "total_bytes", "flops_per_step", "comm_bytes"):
        assert key in p
    assert set(p["comm_bytes"]) == {"data", "fsdp", "tensor", "sequence", "pipeline"}
    tiny = subprocess.run([sys.executable, "-m", "lm.plan", "--config",
                           os.path.join(ROOT, "configs/tiny.py"), "--devices", "4",
                           "--config.mesh.data=4", "--compile"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert tiny.returncode == 0 and "XLA (compiled here)" in tiny.stdout, tiny.stderr
    gpt3 = subprocess.run([sys.executable, "-m", "lm.plan", "--config",
                           os.path.join(ROOT, "configs/gpt3_175b.py")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert gpt3.returncode == 0 and "on 1024 devices" in gpt3.stdout, gpt3.stderr
    bad = subprocess.run(cmd[:-2] + ["--config.mesh.rules=zero4"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "mesh.rules" in bad.stderr and "Traceback" not in bad.stderr


def plan_json(capsys, *args):
    """`python -m lm.plan ... --json`, in process: the plan, or (exit status, stderr)."""
    try:
        plan.main(["--config", os.path.join(ROOT, "configs/gpt3_175b.py"), "--json", *args])
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_days_to_train_gpt3_on_1024_a100s(capsys):
    # The talk's figure: Narayanan et al. 2021 reach 140 TFLOP/s per A100 counting recomputation
    # (8/6 x the model's 6N per token), i.e. ~34% MFU: ~34 days for 300B tokens.
    p = plan_json(capsys, "--tokens", "300e9", "--mfu", "0.35", "--device-kind", "A100")
    assert p["tokens"] == 300e9 and p["mfu"] == 0.35 and p["device_kind"] == "A100"
    assert p["peak_flops"] == 312e12  # float16 tensor cores
    assert 31 <= p["train_days"] <= 37, p["train_days"]
    assert p["train_steps"] == pytest.approx(300e9 / (1536 * 2048))
    same = plan_json(capsys, "--tokens", "300000000000", "--mfu", "0.35", "--device-kind", "a100")
    assert same["train_days"] == p["train_days"]
    # The default MFU (0.4), and the line format_plan prints.
    assert plan_json(capsys, "--tokens", "300e9", "--device-kind", "A100")["mfu"] == 0.4
    assert "days on 1024 x A100 at 35% MFU" in plan.format_plan(p)


@pytest.mark.parametrize("args,message", [
    (["--mfu", "1.5", "--device-kind", "A100"], "--mfu must be in (0, 1]"),
    (["--mfu", "0", "--device-kind", "A100"], "--mfu must be in (0, 1]"),
    (["--device-kind", "Z80"], "no peak FLOP/s known for 'Z80'; known: B200"),
    ([], "this machine's device ('cpu') has no known peak FLOP/s: pass --device-kind"),
])
def test_days_to_train_errors(capsys, args, message):
    code, err = plan_json(capsys, "--tokens", "300e9", *args)
    assert code == 2 and message in err and "Traceback" not in err, err
