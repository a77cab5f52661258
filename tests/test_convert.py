"""`lm.convert`: Hugging Face GPT-2, Llama and BERT checkpoints in and out, against
`transformers` (PyTorch CPU) on small random models saved locally."""
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
    ({"architectures": ["RobertaForMaskedLM"]}, "unsupported architecture"),
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


# ---------------------------------------------------------------------------------------------
# BERT: an encoder with token types, right padding (lengths), the MLM head and the NSP head.

BERT_VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz")
              + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
              + "the cat dog sat on mat ran . , The Cat Dog".split())


def hf_bert(kind: str = "mlm", **extra):
    """A random BERT of shapes used nowhere else (3 layers, 6 heads, 3 token types), its
    LayerNorms and biases random too; eval mode, eager attention, float32. Weights of std 0.15
    (not BERT's 0.02, which leaves attention near uniform): a swapped query / key shows."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=3, hidden_size=48, num_attention_heads=6,
                                  intermediate_size=96, vocab_size=320,
                                  max_position_embeddings=40, type_vocab_size=3,
                                  initializer_range=0.15, **extra)
    cls = transformers.BertForPreTraining if kind == "pretraining" else \
        transformers.BertForMaskedLM
    model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight")
                        else 0.1 * torch.randn_like(p))
    return model.eval()


def bert_tokenizer(tmp_path, lowercase: bool):
    """A BertTokenizer (transformers v5: the tokenizers-backed one) from a small vocab.txt."""
    vocab_dir = tmp_path / f"vocab{int(lowercase)}"
    vocab_dir.mkdir()
    (vocab_dir / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    return transformers.BertTokenizer.from_pretrained(vocab_dir, do_lower_case=lowercase)


def save_bert(tmp_path, kind="mlm", lowercase=False, **extra):
    model = hf_bert(kind, **extra)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tok = bert_tokenizer(tmp_path, lowercase)
    tok.save_pretrained(tmp_path / "hf")
    return model, tok


BERT_LENGTHS = np.array([24, 17, 9])
_rng = np.random.default_rng(1)
BERT_TOKENS = _rng.integers(0, 320, (3, 24))
BERT_TYPES = _rng.integers(0, 3, (3, 24))


def hf_bert_outputs(model, tokens=BERT_TOKENS, types=BERT_TYPES, lengths=BERT_LENGTHS):
    """(MLM logits [B, T, V], NSP logits [B, 2] or None), padding masked on the keys."""
    mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(types),
                    attention_mask=torch.tensor(mask.astype(np.int64)))
    mlm = out.logits if hasattr(out, "logits") else out.prediction_logits
    nsp = getattr(out, "seq_relationship_logits", None)
    return mlm.numpy(), None if nsp is None else nsp.numpy()


def lm_bert_outputs(workdir, tokens=BERT_TOKENS, types=BERT_TYPES, lengths=BERT_LENGTHS):
    from lm.model import abstract_model
    from lm.predict import load_checkpoint
    run, params, _ = load_checkpoint(str(workdir))
    model = nnx.merge(abstract_model(run.model, run.precision)[0], params)
    x = model.hidden(jnp.asarray(tokens), token_types=jnp.asarray(types),
                     lengths=jnp.asarray(lengths, jnp.int32))
    return (np.asarray(model.logits(x)),
            np.asarray(model.nsp_logits(x)) if run.model.nsp_head else None), run


def assert_bert_close(ours, theirs, tol=1e-4):
    np.testing.assert_allclose(ours[0], theirs[0], atol=tol, rtol=tol)
    assert (ours[1] is None) == (theirs[1] is None)
    if theirs[1] is not None:
        np.testing.assert_allclose(ours[1], theirs[1], atol=tol, rtol=tol)
    return float(np.abs(ours[0] - theirs[0]).max())


@pytest.mark.parametrize("kind, lowercase", [("mlm", False), ("pretraining", True)],
                         ids=["BertForMaskedLM-cased", "BertForPreTraining-uncased"])
def test_bert_logits_match_transformers_and_go_back_out(tmp_path, kind, lowercase):
    model, tok = save_bert(tmp_path, kind, lowercase)
    info = from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    assert info["style"] == "bert" and info["tokenizer"]
    theirs = hf_bert_outputs(model)
    ours, run = lm_bert_outputs(tmp_path / "lm")
    assert run.model.nsp_head == (kind == "pretraining")
    assert run.task.name == ("mlm_nsp" if kind == "pretraining" else "mlm")
    assert (run.model.type_vocab_size, run.model.norm_eps, run.model.max_len) == (3, 1e-12, 40)
    assert_bert_close(ours, theirs)

    # Back out: transformers loads it (tied decoder, v5 layout) with the same outputs.
    to_hf(str(tmp_path / "lm"), str(tmp_path / "back"))
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]
    back = (transformers.BertForPreTraining if kind == "pretraining"
            else transformers.AutoModelForMaskedLM).from_pretrained(
        tmp_path / "back", attn_implementation="eager").eval()
    assert type(back) is type(model)
    assert_bert_close(hf_bert_outputs(back), theirs)

    # The tokenizer went in and comes back out: the same ids, pairs and token types included.
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    for a, b in [("The Cat sat on the mats.", None), ("the dog ran", "The Dog [MASK] ,")]:
        assert auto(a, b).input_ids == tok(a, b).input_ids
        assert auto(a, b).token_type_ids == tok(a, b).token_type_ids
    assert auto.mask_token_id == tok.mask_token_id == 4 and auto.pad_token_id == 0
    from lm.data.tokenizer import from_workdir
    ours_tok = from_workdir(str(tmp_path / "lm"))
    assert ours_tok.encode_prompt("The Cat sat").tolist() == tok("The Cat sat").input_ids
    assert (ours_tok.pad_id, ours_tok.eod_id) == (0, 3)


def test_an_old_style_bert_file_converts_and_a_mismatched_tied_decoder_is_an_error(tmp_path):
    """Files of older transformers / TF ports: LayerNorm.gamma / .beta, the position_ids buffer,
    the tied decoder stored (equal to the embedding: fine; different: lm cannot tie it)."""
    from safetensors.numpy import load_file, save_file
    model, _ = save_bert(tmp_path, "mlm")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                    "LayerNorm.beta"): v
           for k, v in tensors.items()}
    old["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
    old["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"]
    old["bert.embeddings.position_ids"] = np.arange(40)[None]
    save_file(old, path, metadata={"format": "pt"})
    from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    assert_bert_close(lm_bert_outputs(tmp_path / "lm")[0], hf_bert_outputs(model))

    old["cls.predictions.decoder.weight"] = old["cls.predictions.decoder.weight"] + 0.5
    save_file(old, path, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="cls.predictions.decoder.weight differs from "
                                          "bert.embeddings.word_embeddings.weight"):
        from_hf(str(tmp_path / "hf"), str(tmp_path / "lm2"))


@pytest.mark.parametrize("edit, message", [
    ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new' is not supported .*hidden_act='gelu'"),
    ({"is_decoder": True}, "is_decoder=True is not supported"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"architectures": ["BertModel"]}, "BertModel has no masked-LM head"),
    ({"intermediate_size": 64}, "intermediate.dense.weight has shape"),
])
def test_an_unsupported_bert_config_is_a_clear_error(tmp_path, edit, message):
    hf_bert().save_pretrained(tmp_path / "hf", safe_serialization=True)
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | edit))
    with pytest.raises(ConfigError, match=message):
        from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))


# ---------------------------------------------------------------------------------------------
# BERT fine-tuning heads: BertForSequenceClassification (task classify) and
# BertForQuestionAnswering (task span).

HEAD_LABELS = ["NEGATIVE", "NEUTRAL", "POSITIVE"]


def hf_bert_head(arch: str, **extra):
    """A random tiny BERT with a fine-tuning head (2 layers, hidden 32, vocab 100), its
    LayerNorms and biases random too (std 0.15 weights, as `hf_bert`); eval mode, eager
    attention, float32. The classifier has HEAD_LABELS."""
    torch.manual_seed(0)
    if arch == "BertForSequenceClassification":
        extra = {"id2label": dict(enumerate(HEAD_LABELS)),
                 "label2id": {x: i for i, x in enumerate(HEAD_LABELS)}} | extra
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=100,
                                  max_position_embeddings=40, initializer_range=0.15, **extra)
    model = getattr(transformers, arch)._from_config(cfg, attn_implementation="eager",
                                                     dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight")
                        else 0.1 * torch.randn_like(p))
    return model.eval()


def save_bert_head(tmp_path, arch: str, **extra):
    model = hf_bert_head(arch, **extra)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tok = bert_tokenizer(tmp_path, lowercase=True)
    tok.save_pretrained(tmp_path / "hf")
    return model, tok


HEAD_TEXTS = [("the cat sat on the mat.", None), ("a dog", "the dog ran , the cat sat"),
              ("sat", None), ("the mat ran on a cat , the dog sat on the mat .", "dog")]


def hf_head_rows(tok):
    """(ids, token types) of HEAD_TEXTS by the Hugging Face tokenizer: lengths 4 to 16, pairs
    with token type 1."""
    encoded = [tok(a, b) for a, b in HEAD_TEXTS]
    rows = [(e.input_ids, e.token_type_ids) for e in encoded]
    assert len({len(ids) for ids, _ in rows}) == len(rows) and any(1 in t for _, t in rows)
    return rows


def hf_head_out(model, ids, types):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types]))


def test_a_bert_sequence_classifier_converts_with_its_labels_and_goes_back_out(tmp_path):
    from lm.finetune import Encoder
    model, tok = save_bert_head(tmp_path, "BertForSequenceClassification")
    info = from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    assert info["style"] == "bert" and info["tokenizer"]
    enc = Encoder.from_checkpoint(str(tmp_path / "lm"))
    assert enc.run.task.name == "classify" and enc.run.task.num_labels == 3
    assert enc.labels == HEAD_LABELS and not enc.run.model.nsp_head
    rows = hf_head_rows(tok)
    theirs = [hf_head_out(model, ids, types).logits[0].softmax(-1).numpy() for ids, types in rows]
    assert max(float(np.ptp(p)) for p in theirs) > 0.1  # not near uniform: a swap would show
    np.testing.assert_allclose(np.stack(enc.forward(rows)["probs"]), np.stack(theirs),
                               atol=1e-4)
    # The text path (lm's own encoding of the converted tokenizer) gives the same.
    got = enc.classify([{"text": a, "text_pair": b} for a, b in HEAD_TEXTS])
    for g, p in zip(got, theirs):
        assert g["label"] == HEAD_LABELS[int(np.argmax(p))] and list(g["probs"]) == HEAD_LABELS
        np.testing.assert_allclose(list(g["probs"].values()), p, atol=1e-4)

    # Back out: transformers loads it with the same logits and labels.
    assert to_hf(str(tmp_path / "lm"), str(tmp_path / "back"))["architecture"] == \
        "BertForSequenceClassification"
    back = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "back", attn_implementation="eager").eval()
    assert type(back) is type(model) and back.config.id2label == dict(enumerate(HEAD_LABELS))
    assert back.config.label2id == {x: i for i, x in enumerate(HEAD_LABELS)}
    for ids, types in rows:
        np.testing.assert_allclose(hf_head_out(back, ids, types).logits.numpy(),
                                   hf_head_out(model, ids, types).logits.numpy(), atol=1e-5)


def test_a_bert_question_answerer_converts_to_a_span_model_and_goes_back_out(tmp_path):
    """Start and end logits at the real positions; a file's pooler (older exports hold one)
    is dropped, as transformers ignores it."""
    from safetensors.numpy import load_file, save_file
    from lm.finetune import Encoder
    model, tok = save_bert_head(tmp_path, "BertForQuestionAnswering")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    rng = np.random.default_rng(0)
    save_file(tensors | {"bert.pooler.dense.weight": rng.normal(size=(32, 32)).astype(np.float32),
                         "bert.pooler.dense.bias": np.zeros(32, np.float32)}, path,
              metadata={"format": "pt"})
    from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    enc = Encoder.from_checkpoint(str(tmp_path / "lm"))
    assert enc.run.task.name == "span" and not enc.run.model.nsp_head
    rows = hf_head_rows(tok)
    got = enc.forward(rows)
    for j, (ids, types) in enumerate(rows):
        out = hf_head_out(model, ids, types)
        n = len(ids)
        np.testing.assert_allclose(got["start"][j][:n], out.start_logits[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(got["end"][j][:n], out.end_logits[0].numpy(), atol=1e-4)
    answer = enc.answer([{"question": "who sat", "context": "the cat sat on the mat ."}])[0]
    assert set(answer) == {"answer", "start", "end", "score"}

    assert to_hf(str(tmp_path / "lm"), str(tmp_path / "back"))["architecture"] == \
        "BertForQuestionAnswering"
    back = transformers.AutoModelForQuestionAnswering.from_pretrained(
        tmp_path / "back", attn_implementation="eager").eval()
    assert type(back) is type(model)
    for ids, types in rows:
        ours, theirs = hf_head_out(back, ids, types), hf_head_out(model, ids, types)
        np.testing.assert_allclose(ours.start_logits.numpy(), theirs.start_logits.numpy(),
                                   atol=1e-5)
        np.testing.assert_allclose(ours.end_logits.numpy(), theirs.end_logits.numpy(), atol=1e-5)


@pytest.mark.parametrize("arch, edit, message", [
    ("BertForSequenceClassification", {"architectures": ["BertModel"]},
     "supported: .*BertForSequenceClassification, BertForQuestionAnswering"),
    ("BertForSequenceClassification", {"problem_type": "multi_label_classification"},
     "problem_type='multi_label_classification' is not supported"),
    ("BertForSequenceClassification", {"id2label": {"0": "x"}}, "1 label"),
    ("BertForSequenceClassification", {"id2label": {"0": "a", "1": "b"}},
     "classifier.weight has shape"),
    ("BertForSequenceClassification", {"id2label": {"0": "a", "2": "b", "3": "c"}},
     "id2label's ids must be 0 .. 2"),
    ("BertForQuestionAnswering", {"id2label": {"0": "a", "1": "b", "2": "c"}},
     "num_labels=3 is not supported"),
])
def test_an_unsupported_bert_head_is_a_clear_error(tmp_path, arch, edit, message):
    hf_bert_head(arch).save_pretrained(tmp_path / "hf", safe_serialization=True)
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | edit))
    with pytest.raises(ConfigError, match=message):
        from_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))


def test_to_hf_refuses_a_decoders_fine_tuning_head(tmp_path):
    """A gpt2 classify checkpoint: a ConfigError naming what is supported, nothing written."""
    import jax
    from conftest import small_run
    from lm.checkpoint import Checkpointer
    from lm.model import abstract_model
    run = small_run(**{"task.name": "classify", "task.num_labels": 2, "data.path": "x.jsonl",
                       "model.d_model": 32, "model.mlp_dim": 64})
    _, abstract = abstract_model(run.model, run.precision, run.task)
    ckpt = Checkpointer(str(tmp_path / "lm"), async_save=False)
    ckpt.save(0, {"params": jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)}, None,
              run.to_dict())
    ckpt.wait()
    ckpt.close()
    with pytest.raises(ConfigError, match="gpt2 model of task.name 'classify'.*BERT only "
                                          r"\(task classify -> BertForSequenceClassification"):
        to_hf(str(tmp_path / "lm"), str(tmp_path / "back"))
    assert not (tmp_path / "back").exists()
