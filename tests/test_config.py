"""Config files load, build abstractly, count parameters right, and reject bad values by name."""
import dataclasses
import glob
import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from conftest import ROOT
from lm.config import ConfigError, from_config_dict, load_config_file, override
from lm.model import abstract_model, param_count

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_and_builds_abstractly(path):
    run = from_config_dict(load_config_file(path))
    _, abstract = abstract_model(run.model, run.precision)
    params = jax.tree.leaves(abstract)
    assert params and all(isinstance(p, jax.ShapeDtypeStruct) for p in params)
    assert {p.dtype for p in params} == {jax.numpy.dtype(run.precision.param_dtype)}
    assert param_count(abstract) > 0


def test_tiny_nvlamb_variant_uses_the_batch_scaling_helper():
    run = from_config_dict(load_config_file(os.path.join(ROOT, "configs/tiny.py:nvlamb")))
    assert run.optim.name == "nvlamb" and run.train.microbatches == 4
    assert run.optim.lr == pytest.approx(2e-2)  # 1e-2 x sqrt(64 / 16)


def test_tiny_llama_variant():
    run = from_config_dict(load_config_file(os.path.join(ROOT, "configs/tiny.py:llama")))
    assert run.model.style == "llama" and run.model.num_kv_heads < run.model.num_heads
    with pytest.raises(ValueError, match="unknown variant"):
        load_config_file(os.path.join(ROOT, "configs/tiny.py:nope"))


def analytic_params(style, L, d, n, k, f, V, max_len):
    h = d // n
    if style == "gpt2":  # biases everywhere, LayerNorm scale + bias, tied embeddings
        layer = (d * n * h + 2 * d * k * h + n * h * d) + (n * h + 2 * k * h + d) \
            + (2 * d * f + f + d) + 2 * 2 * d
        return V * d + max_len * d + L * layer + 2 * d
    layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d  # RMSNorm scale only
    return 2 * V * d + L * layer + d


@pytest.mark.parametrize("name,expected", [
    ("gpt2_small", 124_439_808),   # exactly Hugging Face's gpt2 checkpoint
    ("llama_1b", 1_100_048_384),   # exactly TinyLlama-1.1B
])
def test_parameter_counts_match_the_analytic_formula(name, expected):
    run = from_config_dict(load_config_file(os.path.join(ROOT, f"configs/{name}.py")))
    m = run.model
    count = param_count(abstract_model(run.model, run.precision)[1])
    assert count == analytic_params(m.style, m.num_layers, m.d_model, m.num_heads,
                                    m.num_kv_heads, m.mlp_dim, m.vocab_size, m.max_len)
    assert count == expected


BASE = os.path.join(ROOT, "configs/base.py")


@pytest.mark.parametrize("key,value,match", [
    ("model.num_heads", 5, "model.num_heads"),          # 5 does not divide 256
    ("model.style", "bert2", "model.style"),
    ("train.steps", -3, "train.steps"),
    ("model.num_kv_heads", 3, "model.num_kv_heads"),
    ("precision.compute_dtype", "float8", "precision.compute_dtype"),
    ("train.seq_len", 4096, "train.seq_len"),
    ("mesh.tensor", 0, "mesh.tensor"),
    ("optim.name", "adam", "optim.name"),
    ("train.steps", "ten", "train.steps"),
    ("model.remat", "some", "model.remat"),
    ("model.remat", True, "model.remat"),                 # a string now: none/full/dots/minimal
    ("train.microbatches", 3, "train.microbatches"),       # does not divide the batch of 16
    ("optim.schedule", "step", "optim.schedule"),
    ("precision.loss_scale", "static", "precision.loss_scale"),
    ("precision.master_weights", True, "precision.master_weights"),  # with float32 params
    ("precision.backoff_factor", 2.0, "precision.backoff_factor"),
    ("optim.momentum", 1.0, r"'optim.momentum' must be >= 0 and < 1, got 1.0"),
    ("precision.param_dtype", "float16", "master_weights=True"),  # fp16 params need masters
    ("precision.loss_scal", "none", "precision.loss_scal"),  # unknown key
    ("train.profile_steps", "3:2", r"'train.profile_steps' must be 'START:STOP' with integers"),
    ("train.profile_steps", "0:2", "train.profile_steps"),  # steps count from 1
    ("train.profile_steps", "5", "train.profile_steps"),
    ("train.profile_steps", "a:b", "train.profile_steps"),
])
def test_bad_values_name_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        from_config_dict(override(load_config_file(BASE), **{key: value}))


def test_profile_steps_parse_to_a_window():
    window = lambda text: from_config_dict(override(load_config_file(BASE), **{
        "train.profile_steps": text})).train.profile_window
    assert window("") is None and window("10:12") == (10, 12) and window("3:3") == (3, 3)


def test_nvlamb_needs_its_gradient_norm_bound():
    with pytest.raises(ConfigError, match="max_grad_norm"):
        from_config_dict(override(load_config_file(BASE),
                                  **{"optim.name": "nvlamb", "optim.clip_norm": 0.0}))


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="model.num_layer"):
        override(load_config_file(BASE), **{"model.num_layer": 3})
    cfg = load_config_file(BASE)
    cfg.unlock()
    cfg.train.stepz = 3
    with pytest.raises(ConfigError, match="train.stepz"):
        from_config_dict(cfg)


@pytest.mark.parametrize("flag,match", [
    ("--config.model.num_layerz=3", "num_layerz"),
    ("--config.train.steps=abc", "train.steps"),
    ("--config.model.num_heads=7", "model.num_heads"),
    ("--config.model.style=bert2", "model.style"),
])
def test_cli_rejects_bad_flags_naming_the_key(flag, match, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lm.train", "--config", os.path.join(ROOT, "configs/tiny.py"),
         "--workdir", str(tmp_path), flag], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert match in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_configuration_reference_is_current():
    """docs/configuration.md is `python -m lm.config_reference`'s output."""
    from lm import config_reference
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        assert f.read() == config_reference.markdown(), (
            "docs/configuration.md is stale: python -m lm.config_reference > "
            "docs/configuration.md")


def test_a_key_declared_once_reaches_the_command_line_config_json_and_the_docs(
        monkeypatch, tmp_path):
    """One field added to a section of lm/config.py, nowhere else: the command line accepts
    it, config.json records it, docs/configuration.md's generated text documents it; a field
    without a meaning is refused."""
    from lm import config, config_reference, train
    from lm.tracking import Tracker

    @dataclasses.dataclass(frozen=True)
    class Train(config.TrainConfig):
        """The training loop (`lm/train.py`)."""
        new_knob: int = config.key(3, "a knob only this test declares", ge=0)

    monkeypatch.setitem(config.SECTIONS, "train", Train)
    seen = []
    monkeypatch.setattr(train, "train", lambda run, workdir: seen.append(run))
    train.main(["--config", os.path.join(ROOT, "configs/tiny.py"), "--workdir", str(tmp_path),
                "--config.train.new_knob=7"])
    assert seen[0].train.new_knob == 7
    for bad in ("seven", "-1"):  # its type and its bounds are checked like any other key's
        with pytest.raises(SystemExit) as exit_:
            train.main(["--config", os.path.join(ROOT, "configs/tiny.py"), "--workdir",
                        str(tmp_path), f"--config.train.new_knob={bad}"])
        assert exit_.value.code == 2

    tracker = Tracker(str(tmp_path), 1, progress=False)
    tracker.log_hparams(seen[0].to_dict(), str(tmp_path))
    tracker.finish()
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["train"]["new_knob"] == 7
    assert from_config_dict(ml_collections.ConfigDict(saved)).train.new_knob == 7

    assert "| `train.new_knob` | int | `3` | >= 0 | a knob only this test declares |" in \
        config_reference.markdown()

    @dataclasses.dataclass(frozen=True)
    class Undocumented(config.TrainConfig):
        other_knob: int = 1

    monkeypatch.setitem(config.SECTIONS, "train", Undocumented)
    with pytest.raises(ValueError, match=r"keys without a meaning.*train.other_knob"):
        config_reference.markdown()


@pytest.mark.parametrize("schedule,virtual", [("gpipe", 2), ("interleaved", 1)])
def test_pipeline_schedule_and_virtual_stages_cannot_disagree(schedule, virtual):
    with pytest.raises(ConfigError, match="pipeline.virtual_stages"):
        from_config_dict(override(load_config_file(BASE), **{
            "pipeline.schedule": schedule, "pipeline.virtual_stages": virtual}))


def test_installing_the_package_installs_no_configs_package(tmp_path):
    """`pip install .` into a fresh venv installs `lm` and no top-level `configs` (a name on
    the public registry that belongs to another project): config files are loaded by path."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    ROOT], check=True, cwd=tmp_path, timeout=600)
    records = glob.glob(str(venv / "lib" / "python*" / "site-packages" / "lm-*.dist-info" /
                            "RECORD"))
    assert len(records) == 1
    with open(records[0]) as f:
        installed = {line.split(",")[0].split("/")[0] for line in f}
    assert "lm" in installed and "configs" not in installed, sorted(installed)
    site = os.path.dirname(os.path.dirname(records[0]))
    assert not os.path.exists(os.path.join(site, "configs"))
