"""Test set-up: 8 fake CPU devices, set before anything imports jax."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402,F401  (imported after XLA_FLAGS is set, before any test module)
import pytest  # noqa: E402

from lm.config import from_config_dict, load_config_file, override  # noqa: E402


@pytest.fixture(scope="session")
def root() -> str:
    return ROOT


def small_run(**flat):
    """A RunConfig for a small model, from configs/tiny.py with dotted overrides."""
    base = {"model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4,
            "model.num_kv_heads": 4, "model.mlp_dim": 128, "model.vocab_size": 384,
            "model.max_len": 64, "train.seq_len": 32, "train.batch_size": 8}
    base.update(flat)
    return from_config_dict(override(load_config_file(os.path.join(ROOT, "configs/tiny.py")),
                                     **base))


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A small model trained 2 steps by lm.train (checkpoints, tokenizer, config, metrics, a
    profile of step 2): shared by the generation, export and serving tests."""
    from lm import train
    out = tmp_path_factory.mktemp("trained") / "run"
    run = small_run(**{"train.steps": 2, "train.sample_tokens": 0, "train.progress": False,
                       "train.eval_every": 2, "train.eval_batches": 1, "mesh.data": 8,
                       "checkpoint.every": 1, "train.profile_steps": "2:2"})
    train.train(run, str(out))
    return out
