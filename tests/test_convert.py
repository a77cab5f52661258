"""`lm.convert`: Hugging Face GPT-2 and Llama checkpoints in and out, against `transformers`
(PyTorch CPU) on small random models saved locally."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT
from lm.config import ConfigError
from lm.convert import from_hf, to_hf
from lm.generate import Engine, SamplingParams

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_model(kind: str, **extra):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=128, vocab_size=384,
                                      n_positions=64, **extra)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=160,
                                       vocab_size=384, max_position_embeddings=64,
                                       rope_theta=5000.0, rms_norm_eps=1e-5, **extra)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # random norms and biases too, so that a swapped mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight")
                        else 0.1 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def lm_logits(engine: Engine, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(nnx.merge(engine.graphdef, engine.params)(jnp.asarray(tokens)))


TOKENS = np.random.default_rng(0).integers(0, 384, (3, 40))


@pytest.mark.parametrize("kind, extra", [("gpt2", {}), ("llama", {}),
                                         ("llama", {"tie_word_embeddings": True})],
                         ids=["gpt2", "llama-gqa", "llama-tied"])
def test_logits_and_greedy_generation_match_transformers(tmp_path, kind, extra):
    model = hf_model(kind, **extra)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    engine = Engine.from_checkpoint(str(tmp_path / "lm"))
    assert engine.cfg.style == kind and engine.cfg.num_kv_heads == (4 if kind == "gpt2" else 2)
    np.testing.assert_allclose(lm_logits(engine, TOKENS), hf_logits(model, TOKENS), atol=1e-4,
                               rtol=1e-4)
    prompts = TOKENS[:, :7]
    ours = engine.generate(prompts.tolist(), SamplingParams(max_new_tokens=20))
    with torch.no_grad():
        theirs = model.generate(torch.tensor(prompts), max_new_tokens=20, min_new_tokens=20,
                                do_sample=False, pad_token_id=0)[:, 7:].tolist()
    assert ours == theirs

    # Back out: transformers reloads it with the same logits.
    to_hf(str(tmp_path / "lm"), str(tmp_path / "back"))
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    np.testing.assert_allclose(hf_logits(auto, TOKENS), hf_logits(model, TOKENS), atol=1e-5,
                               rtol=1e-5)


def test_the_original_gpt2_layout_without_the_transformer_prefix(tmp_path):
    """The Hub's original GPT-2 files name tensors `wte.weight`, `h.0.attn.c_attn.weight`."""
    from safetensors.numpy import load_file, save_file
    model = hf_model("gpt2")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()
               if k != "lm_head.weight"}, path, metadata={"format": "pt"})
    from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    np.testing.assert_allclose(lm_logits(Engine.from_checkpoint(str(tmp_path / "lm")), TOKENS),
                               hf_logits(model, TOKENS), atol=1e-4, rtol=1e-4)


def test_sharded_safetensors_and_the_command_line(tmp_path):
    model = hf_model("llama")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    proc = subprocess.run([sys.executable, "-m", "lm.convert", "from-hf", str(tmp_path / "hf"),
                           str(tmp_path / "lm")], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    engine = Engine.from_checkpoint(str(tmp_path / "lm"))
    np.testing.assert_allclose(lm_logits(engine, TOKENS), hf_logits(model, TOKENS), atol=1e-4,
                               rtol=1e-4)
    # It generates from the command line like any checkpoint.
    proc = subprocess.run([sys.executable, "-m", "lm.generate", "--checkpoint",
                           str(tmp_path / "lm"), "--prompt-ids", "5,6,7", "--max-new-tokens",
                           "5", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["token_ids"] == engine.generate(
        [[5, 6, 7]], SamplingParams(max_new_tokens=5))[0]


def test_a_checkpoint_trained_by_lm_exports_to_transformers(trained_workdir, tmp_path):
    engine = Engine.from_checkpoint(str(trained_workdir))
    to_hf(str(trained_workdir), str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    np.testing.assert_allclose(hf_logits(model, TOKENS), lm_logits(engine, TOKENS), atol=1e-4,
                               rtol=1e-4)
    # The tokenizer goes along (the run's BPE tokenizer.json).
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" /
                                                                  "tokenizer.json"))
    assert tok.encode("def main():") == [int(t) for t in engine.tokenizer.encode("def main():")]


def test_fine_tuning_starts_from_a_converted_checkpoint(tmp_path):
    hf_model("gpt2").save_pretrained(tmp_path / "hf", safe_serialization=True)
    from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    proc = subprocess.run(
        [sys.executable, "-m", "lm.train", "--config", "configs/tiny.py", "--workdir",
         str(tmp_path / "ft"), f"--config.train.init_from={tmp_path / 'lm'}",
         "--config.model.num_layers=2", "--config.model.d_model=64", "--config.model.num_heads=4",
         "--config.model.num_kv_heads=4", "--config.model.mlp_dim=128",
         "--config.model.vocab_size=384", "--config.model.max_len=64",
         "--config.train.seq_len=32", "--config.train.steps=2", "--config.train.eval_every=2",
         "--config.train.eval_batches=1", "--config.train.sample_tokens=0",
         "--config.train.progress=False", "--config.mesh.data=1"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parameters from" in proc.stdout + proc.stderr


@pytest.mark.parametrize("edit, message", [
    ({"num_key_value_heads": 4}, "config does not match the weights"),
    ({"num_attention_heads": 8}, "head_dim=16 is not hidden_size / num_attention_heads"),
    ({"intermediate_size": 128}, "mlp.gate_proj.weight has shape"),
    ({"architectures": ["BertForMaskedLM"]}, "unsupported architecture"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_a_mismatched_or_unsupported_config_is_a_clear_error(tmp_path, edit, message):
    hf_model("llama").save_pretrained(tmp_path / "hf", safe_serialization=True)
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text()) | edit
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    if edit == {"num_key_value_heads": 4}:  # and on the command line: exit 2, no traceback
        proc = subprocess.run([sys.executable, "-m", "lm.convert", "from-hf",
                               str(tmp_path / "hf"), str(tmp_path / "lm2")],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 2 and "k_proj.weight has shape" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_bfloat16_weights_are_read(tmp_path):
    """Published Llama weights are bf16 (numpy has no bf16: read through safetensors' flax
    backend), stored by lm in float32."""
    model = hf_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    np.testing.assert_allclose(lm_logits(Engine.from_checkpoint(str(tmp_path / "lm")), TOKENS),
                               hf_logits(model.float(), TOKENS), atol=1e-4, rtol=1e-4)


def test_a_converted_tokenizer_adds_its_bos_to_prompts(tmp_path):
    """A Llama tokenizer.json whose post-processor prepends <s>: prompts for generation and
    serving get it (as Hugging Face's tokenizer gives it), training data does not."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    hf_model("llama").save_pretrained(tmp_path / "hf", safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate("abcdefgh ")}}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", 1)])
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    converted = Engine.from_checkpoint(str(tmp_path / "lm")).tokenizer
    hf_ids = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "hf" / "tokenizer.json")).encode("abc")
    assert converted.encode_prompt("abc").tolist() == hf_ids and hf_ids[0] == 1
    assert converted.encode("abc").tolist() == hf_ids[1:] and converted.eod_id == 2
