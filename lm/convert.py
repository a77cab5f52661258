"""Hugging Face checkpoints in and out: GPT2LMHeadModel, LlamaForCausalLM, BertForMaskedLM,
BertForPreTraining, BertForSequenceClassification and BertForQuestionAnswering.

    python -m lm.convert from-hf HF_DIR OUT_DIR     # safetensors (+ index json) + config.json
    python -m lm.convert to-hf CKPT_DIR HF_DIR      # a workdir, checkpoints/ or one step dir

from-hf writes OUT_DIR as a training workdir holding one checkpoint (step 0: parameters and the
run config) and, where HF_DIR has a `tokenizer.json` with an end-of-text token, the tokenizer:
OUT_DIR then works as `--checkpoint` of lm.generate / lm.serve / lm.export (a BERT: of
lm.predict) and as `--config.train.init_from` of lm.train. A chat template (chat_template.jinja,
or tokenizer_config.json's `chat_template`) comes along with its special-token strings, in
lm.chat's layout (OUT_DIR/chat_template.jinja + tokenizer_config.json), for lm.serve's chat
completions; to-hf writes it back (chat_template.jinja and tokenizer_config.json's
`chat_template`, bos_token, eos_token, ...). Parameters are stored float32 in lm's layout: the
layers stacked on a leading axis (scanned), attention weights split per head
([embed, heads, head_dim]). A BertForSequenceClassification becomes a run of task.name
classify (task.num_labels and task.labels = config.json's id2label values in id order), a
BertForQuestionAnswering one of task.name span (fine-tuning it further names its own data).
to-hf writes `model.safetensors` and a `config.json` that `from_pretrained` loads, plus the
tokenizer.json where the run had a BPE tokenizer (a BERT: and a tokenizer_config.json, so that
`AutoTokenizer.from_pretrained` works). Needs no transformers or torch. A BERT checkpoint of
task classify is written as a BertForSequenceClassification (num_labels, id2label and label2id
from task.labels, else LABEL_0, LABEL_1, ...), one of task span as a BertForQuestionAnswering;
a decoder's (gpt2, llama) classify or span head is refused (ConfigError): Hugging Face's
GPT2ForSequenceClassification / LlamaForSequenceClassification score without a bias and find
the last token by the pad id, which lm's head does not match.

Mapping (HF -> lm; HF Linear weights are [out, in], GPT-2's Conv1D [in, out]):
    GPT-2  wte -> embed, wpe -> pos_embed, h.i.ln_1/ln_2 -> attn_norm/mlp_norm (scale, bias),
           attn.c_attn [d, 3d] -> wq|wk|wv (+ bq|bk|bv), attn.c_proj -> attn.wo (+ bo),
           mlp.c_fc -> mlp.wi (+ bi), mlp.c_proj -> mlp.wo (+ bo), ln_f -> final_norm; tied head
    Llama  embed_tokens -> embed, layers.i.input_layernorm / post_attention_layernorm ->
           attn_norm / mlp_norm, self_attn.{q,k,v,o}_proj -> wq, wk, wv, wo, mlp.gate_proj ->
           wg, up_proj -> wi, down_proj -> wo, norm -> final_norm, lm_head -> unembed (a tied
           Llama gets unembed = embed)
    BERT   bert.embeddings.{word,position,token_type}_embeddings -> embed, pos_embed,
           type_embed, embeddings.LayerNorm -> embed_norm; encoder.layer.i.attention.self.
           {query,key,value} -> wq|wk|wv (+ bq|bk|bv), attention.output.dense -> attn.wo (+ bo),
           attention.output.LayerNorm -> attn_norm (post-LN), intermediate.dense -> mlp.wi
           (+ bi), output.dense -> mlp.wo (+ bo), output.LayerNorm -> mlp_norm;
           cls.predictions.transform.{dense,LayerNorm} -> mlm_dense, mlm_norm,
           cls.predictions.bias -> vocab_bias, the decoder tied to embed (a file's
           cls.predictions.decoder.* must equal them); where both are present bert.pooler.dense
           -> pooler and cls.seq_relationship -> nsp (model.nsp_head, task mlm_nsp).
           TF-era LayerNorm.gamma / .beta are read as .weight / .bias.
           BertForSequenceClassification: bert.pooler.dense -> pooler, classifier -> classifier
           (task classify), no masked-LM head; BertForQuestionAnswering: qa_outputs -> span
           (row 0 start, row 1 end; task span), no pooler (a file's bert.pooler.* is dropped)
           and no masked-LM head.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from lm.chat import CHAT_TEMPLATE_FILE, ChatTemplate, template_directory
from lm.checkpoint import Checkpointer
from lm.config import ConfigError, defaults, from_config_dict, override
from lm.data import tokenizer as lm_tokenizer
from lm.data.tokenizer import DATA_FILE
from lm.model import abstract_model, default_task
from lm.predict import load_checkpoint

ARCHS = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "BertForMaskedLM": "bert",
         "BertForPreTraining": "bert", "BertForSequenceClassification": "bert",
         "BertForQuestionAnswering": "bert"}
# The BERT fine-tuning heads: Hugging Face architecture -> lm's task.name, and back.
BERT_HEADS = {"BertForSequenceClassification": "classify", "BertForQuestionAnswering": "span"}
BERT_HEAD_ARCHS = {task: arch for arch, task in BERT_HEADS.items()}
# Buffers some exports carry that are not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq",
                    "embeddings.position_ids", "embeddings.token_type_ids")
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


# ---------------------------------------------------------------------------------------------
# Reading and writing safetensors


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of `model.safetensors` or of the files a `model.safetensors.index.json`
    names, as float32 numpy arrays."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json "
                          "(PyTorch .bin checkpoints are not read: save with safetensors)")
    tensors = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.exists(path):
            raise ConfigError(f"{index} names {name}, which is missing")
        # framework "flax" returns jax arrays, bfloat16 included (numpy has no bfloat16).
        with safe_open(path, framework="flax") as f:
            for key in f.keys():
                tensors[key] = np.asarray(f.get_tensor(key), np.float32)
    return tensors


def write_safetensors(tensors: dict[str, np.ndarray], hf_dir: str) -> None:
    os.makedirs(hf_dir, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Configs


def _get(hf: dict, key: str, default=None):
    value = hf.get(key, default)
    if value is None:
        raise ConfigError(f"config.json lacks {key!r}")
    return value


def hf_architecture(hf: dict) -> str:
    """The first of config.json's architectures that lm converts; none is an error naming the
    supported ones."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHS), None)
    if arch is None:
        bert = [a for a in ARCHS if ARCHS[a] == "bert"]
        why = (f" (BertModel has no masked-LM head nor a fine-tuning head: convert a "
               f"{', '.join(bert[:-1])} or {bert[-1]})" if "BertModel" in archs else "")
        raise ConfigError(f"unsupported architecture {archs or hf.get('model_type')!r}; "
                          f"supported: {', '.join(ARCHS)}{why}")
    return arch


def model_fields(hf: dict) -> dict:
    """lm's model.* keys from a Hugging Face config.json; unsupported choices are errors that
    name the field."""
    arch = hf_architecture(hf)

    def unsupported(field, value, allowed):
        if hf.get(field, allowed) != allowed:
            raise ConfigError(f"config.json: {field}={hf.get(field)!r} is not supported "
                              f"(lm implements {field}={allowed!r})")

    if ARCHS[arch] == "gpt2":
        d, heads = _get(hf, "n_embd"), _get(hf, "n_head")
        unsupported("activation_function", "gelu_new", "gelu_new")
        unsupported("scale_attn_by_inverse_layer_idx", False, False)
        unsupported("reorder_and_upcast_attn", False, False)
        unsupported("scale_attn_weights", True, True)
        unsupported("add_cross_attention", False, False)
        fields = dict(style="gpt2", num_layers=_get(hf, "n_layer"), d_model=d, num_heads=heads,
                      num_kv_heads=heads, mlp_dim=hf.get("n_inner") or 4 * d,
                      vocab_size=_get(hf, "vocab_size"), max_len=_get(hf, "n_positions"),
                      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    elif ARCHS[arch] == "bert":
        d, heads = _get(hf, "hidden_size"), _get(hf, "num_attention_heads")
        unsupported("hidden_act", "gelu", "gelu")  # exact (erf) GELU, in the MLM head too
        unsupported("position_embedding_type", "absolute", "absolute")
        unsupported("is_decoder", False, False)
        unsupported("add_cross_attention", False, False)
        if arch not in BERT_HEADS:  # the masked-LM decoder is tied; the other heads have none
            unsupported("tie_word_embeddings", True, True)
        fields = dict(style="bert", num_layers=_get(hf, "num_hidden_layers"), d_model=d,
                      num_heads=heads, num_kv_heads=heads, mlp_dim=_get(hf, "intermediate_size"),
                      vocab_size=_get(hf, "vocab_size"),
                      max_len=_get(hf, "max_position_embeddings"),
                      type_vocab_size=_get(hf, "type_vocab_size", 2),
                      norm_eps=float(hf.get("layer_norm_eps", 1e-12)))
    else:
        d, heads = _get(hf, "hidden_size"), _get(hf, "num_attention_heads")
        unsupported("hidden_act", "silu", "silu")
        unsupported("attention_bias", False, False)
        unsupported("mlp_bias", False, False)
        unsupported("rope_scaling", None, None)
        unsupported("pretraining_tp", 1, 1)
        if hf.get("head_dim") not in (None, d // heads):
            raise ConfigError(f"config.json: head_dim={hf['head_dim']} is not hidden_size / "
                              f"num_attention_heads = {d // heads}; lm derives it that way")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"config.json: rope_parameters.rope_type="
                              f"{rope['rope_type']!r} is not supported (only 'default')")
        fields = dict(style="llama", num_layers=_get(hf, "num_hidden_layers"), d_model=d,
                      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                      mlp_dim=_get(hf, "intermediate_size"), vocab_size=_get(hf, "vocab_size"),
                      max_len=_get(hf, "max_position_embeddings"),
                      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                      norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
    if d % heads:
        raise ConfigError(f"config.json: the hidden size {d} is not a multiple of the "
                          f"{heads} heads")
    if fields["num_heads"] % fields["num_kv_heads"]:
        raise ConfigError(f"config.json: {fields['num_heads']} heads are not a multiple of "
                          f"{fields['num_kv_heads']} key/value heads")
    return fields


def hf_labels(hf: dict) -> list[str]:
    """A sequence classifier's labels in id order: config.json's id2label values (its keys must
    be 0 .. n-1), else LABEL_0 .. LABEL_{num_labels-1} (transformers' names; num_labels
    defaults to 2 there)."""
    id2label = hf.get("id2label")
    if not id2label:
        return [f"LABEL_{i}" for i in range(int(hf.get("num_labels") or 2))]
    try:
        ids = {int(k): v for k, v in id2label.items()}
    except (AttributeError, TypeError, ValueError):
        raise ConfigError(f"config.json: id2label must map the ids 0, 1, ... to labels, got "
                          f"{id2label!r}") from None
    if sorted(ids) != list(range(len(ids))):
        raise ConfigError(f"config.json: id2label's ids must be 0 .. {len(ids) - 1}, got "
                          f"{sorted(ids)}")
    return [str(ids[i]) for i in range(len(ids))]


def head_fields(hf: dict, arch: str) -> dict:
    """lm's task.* keys of a BERT fine-tuning architecture (BERT_HEADS): task classify with
    num_labels and labels (`hf_labels`), or task span (num_labels 2: start, end). A regression
    or multi-label classifier is an error: lm's classify head is one softmax over the
    labels."""
    task, labels = BERT_HEADS[arch], hf_labels(hf)
    if task == "span":  # transformers sizes qa_outputs by num_labels
        if len(labels) != 2:
            raise ConfigError(f"config.json: a {arch} with num_labels={len(labels)} is not "
                              "supported (lm's span head has 2 outputs: start and end)")
        return {"task.name": "span"}
    problem = hf.get("problem_type")
    if len(labels) < 2 or problem not in (None, "single_label_classification"):
        raise ConfigError(f"config.json: a {arch} with {len(labels)} label(s) and problem_type="
                          f"{problem!r} is not supported (lm's classify head is single-label "
                          "classification over >= 2 labels, a softmax)")
    return {"task.name": "classify", "task.num_labels": len(labels),
            "task.labels": json.dumps(labels)}


def hf_architecture_of(m, task=None) -> str:
    """The Hugging Face class to-hf writes for lm's model and task (default: the style's
    pretraining task); a decoder's fine-tuning head is an error saying what is supported."""
    task = task or default_task(m)
    if m.style == "bert":
        if task.name in BERT_HEAD_ARCHS:
            return BERT_HEAD_ARCHS[task.name]
        return "BertForPreTraining" if m.nsp_head else "BertForMaskedLM"
    if task.finetune:
        raise ConfigError(f"to-hf does not convert a {m.style} model of task.name "
                          f"{task.name!r}: fine-tuning heads are converted for BERT only "
                          f"(task classify -> BertForSequenceClassification, span -> "
                          f"BertForQuestionAnswering); {m.style} converts with task.name 'lm'")
    return {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[m.style]


def _label_fields(task) -> dict:
    """config.json's num_labels, id2label and label2id of a classify task (its labels as
    strings, LABEL_i where the run has none)."""
    labels = [str(x) for x in task.label_list] or [f"LABEL_{i}" for i in range(task.num_labels)]
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {x: i for i, x in enumerate(labels)},
            "problem_type": "single_label_classification", "classifier_dropout": None}


def hf_config(m, eod_id: int | None = None, pad_id: int | None = None, task=None) -> dict:
    """A config.json for `from_pretrained` from lm's ModelConfig and TaskConfig (default: the
    style's pretraining task)."""
    task = task or default_task(m)
    arch = hf_architecture_of(m, task)
    if m.style == "bert":
        return {"architectures": [arch],
                "model_type": "bert", "num_hidden_layers": m.num_layers,
                "hidden_size": m.d_model, "num_attention_heads": m.num_heads,
                "intermediate_size": m.mlp_dim, "vocab_size": m.vocab_size,
                "max_position_embeddings": m.max_len, "type_vocab_size": m.type_vocab_size,
                "layer_norm_eps": m.norm_eps, "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                "initializer_range": 0.02, "pad_token_id": 0 if pad_id is None else pad_id,
                "is_decoder": False, "add_cross_attention": False,
                "tie_word_embeddings": True, "torch_dtype": "float32"} | (
                    _label_fields(task) if task.name == "classify" else {})
    ids = {"bos_token_id": eod_id, "eos_token_id": eod_id}
    if m.style == "gpt2":
        return ids | {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_layer": m.num_layers, "n_embd": m.d_model, "n_head": m.num_heads,
                "n_inner": m.mlp_dim, "n_positions": m.max_len, "n_ctx": m.max_len,
                "vocab_size": m.vocab_size, "layer_norm_epsilon": m.norm_eps,
                "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0, "tie_word_embeddings": True, "torch_dtype": "float32"}
    return ids | {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "num_hidden_layers": m.num_layers, "hidden_size": m.d_model,
            "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
            "head_dim": m.head_dim, "intermediate_size": m.mlp_dim, "vocab_size": m.vocab_size,
            "max_position_embeddings": m.max_len, "rms_norm_eps": m.norm_eps,
            "rope_theta": m.rope_theta, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": "float32"}


# ---------------------------------------------------------------------------------------------
# Tensor maps: (lm path, HF name per layer or None, to lm, from lm)


def _gpt2_layer(m, i):
    d, n, h, f = m.d_model, m.num_heads, m.head_dim, m.mlp_dim
    p = f"transformer.h.{i}."
    return {
        "attn_norm.scale": (p + "ln_1.weight", (d,)), "attn_norm.bias": (p + "ln_1.bias", (d,)),
        "mlp_norm.scale": (p + "ln_2.weight", (d,)), "mlp_norm.bias": (p + "ln_2.bias", (d,)),
        "attn.wo": (p + "attn.c_proj.weight", (d, d)), "attn.bo": (p + "attn.c_proj.bias", (d,)),
        "mlp.wi": (p + "mlp.c_fc.weight", (d, f)), "mlp.bi": (p + "mlp.c_fc.bias", (f,)),
        "mlp.wo": (p + "mlp.c_proj.weight", (f, d)), "mlp.bo": (p + "mlp.c_proj.bias", (d,)),
    }, (p + "attn.c_attn.weight", (d, 3 * d)), (p + "attn.c_attn.bias", (3 * d,)), (n, h)


def _bert_top(m, task=None):
    """lm path -> (HF name, HF shape, lm shape, is an nn.Linear weight: [out, in] there), for
    the heads of `task` (default: the style's, mlm): the masked-LM head (and, model.nsp_head,
    the pooler and next-sentence head), or the pooler and classifier (classify), or the span
    head (span)."""
    task = task or default_task(m)
    d, v = m.d_model, m.vocab_size
    e, c = "bert.embeddings.", "cls.predictions."
    top = {"embed": (e + "word_embeddings.weight", (v, d), (v, d), False),
           "pos_embed": (e + "position_embeddings.weight", (m.max_len, d), (m.max_len, d), False),
           "type_embed": (e + "token_type_embeddings.weight", (m.type_vocab_size, d),
                          (m.type_vocab_size, d), False),
           "embed_norm/scale": (e + "LayerNorm.weight", (d,), (d,), False),
           "embed_norm/bias": (e + "LayerNorm.bias", (d,), (d,), False)}
    pooler = {"pooler/w": ("bert.pooler.dense.weight", (d, d), (d, d), True),
              "pooler/bias": ("bert.pooler.dense.bias", (d,), (d,), False)}
    if task.masked:
        top |= {"mlm_dense/w": (c + "transform.dense.weight", (d, d), (d, d), True),
                "mlm_dense/bias": (c + "transform.dense.bias", (d,), (d,), False),
                "mlm_norm/scale": (c + "transform.LayerNorm.weight", (d,), (d,), False),
                "mlm_norm/bias": (c + "transform.LayerNorm.bias", (d,), (d,), False),
                "vocab_bias": (c + "bias", (v,), (v,), False)}
    if task.masked and m.nsp_head:
        top |= pooler | {"nsp/w": ("cls.seq_relationship.weight", (2, d), (d, 2), True),
                         "nsp/bias": ("cls.seq_relationship.bias", (2,), (2,), False)}
    if task.name == "classify":
        n = task.num_labels
        top |= pooler | {"classifier/w": ("classifier.weight", (n, d), (d, n), True),
                         "classifier/bias": ("classifier.bias", (n,), (n,), False)}
    if task.name == "span":
        top |= {"span/w": ("qa_outputs.weight", (2, d), (d, 2), True),
                "span/bias": ("qa_outputs.bias", (2,), (2,), False)}
    return top


def _bert_layer(m, i):
    """As `_bert_top`, for layer i (lm paths under blocks/, one layer's slice)."""
    d, n, h, f = m.d_model, m.num_heads, m.head_dim, m.mlp_dim
    p = f"bert.encoder.layer.{i}."
    a, o = p + "attention.self.", p + "attention.output."
    return {
        **{f"attn/w{x}": (f"{a}{name}.weight", (d, d), (d, n, h), True)
           for x, name in zip("qkv", ("query", "key", "value"))},
        **{f"attn/b{x}": (f"{a}{name}.bias", (d,), (n, h), False)
           for x, name in zip("qkv", ("query", "key", "value"))},
        "attn/wo": (o + "dense.weight", (d, d), (n, h, d), True),
        "attn/bo": (o + "dense.bias", (d,), (d,), False),
        "attn_norm/scale": (o + "LayerNorm.weight", (d,), (d,), False),
        "attn_norm/bias": (o + "LayerNorm.bias", (d,), (d,), False),
        "mlp/wi": (p + "intermediate.dense.weight", (f, d), (d, f), True),
        "mlp/bi": (p + "intermediate.dense.bias", (f,), (f,), False),
        "mlp/wo": (p + "output.dense.weight", (d, f), (f, d), True),
        "mlp/bo": (p + "output.dense.bias", (d,), (d,), False),
        "mlp_norm/scale": (p + "output.LayerNorm.weight", (d,), (d,), False),
        "mlp_norm/bias": (p + "output.LayerNorm.bias", (d,), (d,), False),
    }


def bert_aliases(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """TF-era names (LayerNorm.gamma / .beta) as today's (.weight / .bias)."""
    def name(k):
        if ".LayerNorm." in k or k.startswith("LayerNorm."):
            return k.removesuffix(".gamma") + ".weight" if k.endswith(".gamma") else (
                k.removesuffix(".beta") + ".bias" if k.endswith(".beta") else k)
        return k
    return {name(k): x for k, x in t.items()}


def from_hf_tensors(m, t: dict[str, np.ndarray], task=None) -> dict[str, np.ndarray]:
    """lm's parameters ('blocks/attn/wq', ... stacked over layers) from HF tensors, with the
    heads of `task` (a BERT's; default: the style's pretraining task); shape or name mismatches
    are errors naming the tensor and the config fields."""
    task = task or default_task(m)
    used = set()

    def take(name, shape, why):
        if name not in t:
            raise ConfigError(f"tensor {name} is missing from the checkpoint")
        x = t[name]
        if tuple(x.shape) != tuple(shape):
            raise ConfigError(f"tensor {name} has shape {tuple(x.shape)} but config.json implies "
                              f"{tuple(shape)} ({why}): the config does not match the weights")
        used.add(name)
        return x

    d, n, k, h, f, v = (m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
                        m.vocab_size)
    why = (f"num_layers={m.num_layers}, d_model={d}, heads={n}, kv_heads={k}, mlp={f}, "
           f"vocab={v}, max_len={m.max_len}")
    layers: dict[str, list] = {}

    def put(path, x):
        layers.setdefault(path, []).append(x)

    if m.style == "gpt2":
        out = {"embed": take("transformer.wte.weight", (v, d), why),
               "pos_embed": take("transformer.wpe.weight", (m.max_len, d), why),
               "final_norm/scale": take("transformer.ln_f.weight", (d,), why),
               "final_norm/bias": take("transformer.ln_f.bias", (d,), why)}
        for i in range(m.num_layers):
            simple, (wn, ws), (bn, bs), _ = _gpt2_layer(m, i)
            for path, (name, shape) in simple.items():
                x = take(name, shape, why)
                put(path.replace(".", "/"), x.reshape(n, h, d) if path == "attn.wo" else x)
            w, b = take(wn, ws, why), take(bn, bs, why)
            for j, part in enumerate("qkv"):
                put(f"attn/w{part}", w[:, j * d:(j + 1) * d].reshape(d, n, h))
                put(f"attn/b{part}", b[j * d:(j + 1) * d].reshape(n, h))
        if "lm_head.weight" in t:
            if not np.array_equal(take("lm_head.weight", (v, d), why), out["embed"]):
                raise ConfigError("lm_head.weight differs from transformer.wte.weight: lm's "
                                  "gpt2 style ties the output head to the input embedding")
    elif m.style == "bert":
        why += (f", type_vocab={m.type_vocab_size}, nsp_head={m.nsp_head}, task={task.name}"
                + (f", num_labels={task.num_labels}" if task.name == "classify" else ""))

        def lm(entry):
            name, hf_shape, lm_shape, linear = entry
            x = take(name, hf_shape, why)
            return (x.T if linear else x).reshape(lm_shape)

        if (task.masked and "cls.predictions.bias" not in t
                and "cls.predictions.decoder.bias" in t):
            t = {**t, "cls.predictions.bias": t["cls.predictions.decoder.bias"]}
        out = {path: lm(entry) for path, entry in _bert_top(m, task).items()}
        for i in range(m.num_layers):
            for path, entry in _bert_layer(m, i).items():
                put(path, lm(entry))
        # Older files hold the tied decoder too; lm ties it, so it must be the same tensors.
        tied_decoder = (("cls.predictions.decoder.weight", "bert.embeddings."
                         "word_embeddings.weight", out["embed"]),
                        ("cls.predictions.decoder.bias", "cls.predictions.bias",
                         out["vocab_bias"])) if task.masked else ()
        for name, tied, ours in tied_decoder:
            if name in t and not np.array_equal(take(name, ours.shape, why), ours):
                raise ConfigError(f"{name} differs from {tied}: lm's bert style ties the "
                                  "masked-LM decoder to the input embedding and its bias")
    else:
        out = {"embed": take("model.embed_tokens.weight", (v, d), why),
               "final_norm/scale": take("model.norm.weight", (d,), why)}
        out["unembed"] = (take("lm_head.weight", (v, d), why) if "lm_head.weight" in t
                          else out["embed"])  # tied
        for i in range(m.num_layers):
            p = f"model.layers.{i}."
            put("attn_norm/scale", take(p + "input_layernorm.weight", (d,), why))
            put("mlp_norm/scale", take(p + "post_attention_layernorm.weight", (d,), why))
            put("attn/wq", take(p + "self_attn.q_proj.weight", (n * h, d), why).T
                .reshape(d, n, h))
            put("attn/wk", take(p + "self_attn.k_proj.weight", (k * h, d), why).T
                .reshape(d, k, h))
            put("attn/wv", take(p + "self_attn.v_proj.weight", (k * h, d), why).T
                .reshape(d, k, h))
            put("attn/wo", take(p + "self_attn.o_proj.weight", (d, n * h), why).T
                .reshape(n, h, d))
            put("mlp/wg", take(p + "mlp.gate_proj.weight", (f, d), why).T)
            put("mlp/wi", take(p + "mlp.up_proj.weight", (f, d), why).T)
            put("mlp/wo", take(p + "mlp.down_proj.weight", (d, f), why).T)
    extra = sorted(x for x in set(t) - used
                   if not x.endswith(IGNORED_SUFFIXES) and x != "lm_head.weight")
    if extra:
        raise ConfigError(f"unexpected tensors for a {m.style} model: {', '.join(extra[:8])}"
                          + (" ..." if len(extra) > 8 else ""))
    out.update({f"blocks/{path}": np.stack(xs) for path, xs in layers.items()})
    return out


def to_hf_tensors(m, params: dict[str, np.ndarray], task=None) -> dict[str, np.ndarray]:
    """The inverse of `from_hf_tensors`."""
    d, n, k, h = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    b = {path[len("blocks/"):]: x for path, x in params.items() if path.startswith("blocks/")}
    t = {}

    def hf(x, entry):
        _, hf_shape, _, linear = entry
        return x.reshape(hf_shape[::-1]).T if linear else x.reshape(hf_shape)

    if m.style == "bert":  # the tied decoder is left out, as transformers 5 saves it
        t = {entry[0]: hf(params[path], entry) for path, entry in _bert_top(m, task).items()}
        for i in range(m.num_layers):
            t |= {entry[0]: hf(b[path][i], entry) for path, entry in _bert_layer(m, i).items()}
    elif m.style == "gpt2":
        t["transformer.wte.weight"] = params["embed"]
        t["transformer.wpe.weight"] = params["pos_embed"]
        t["transformer.ln_f.weight"] = params["final_norm/scale"]
        t["transformer.ln_f.bias"] = params["final_norm/bias"]
        for i in range(m.num_layers):
            simple, (wn, _), (bn, _), _ = _gpt2_layer(m, i)
            for path, (name, _) in simple.items():
                x = b[path.replace(".", "/")][i]
                t[name] = x.reshape(d, d) if path == "attn.wo" else x
            t[wn] = np.concatenate([b[f"attn/w{p}"][i].reshape(d, d) for p in "qkv"], axis=1)
            t[bn] = np.concatenate([b[f"attn/b{p}"][i].reshape(d) for p in "qkv"])
    else:
        t["model.embed_tokens.weight"] = params["embed"]
        t["model.norm.weight"] = params["final_norm/scale"]
        t["lm_head.weight"] = params["unembed"]
        for i in range(m.num_layers):
            p = f"model.layers.{i}."
            t[p + "input_layernorm.weight"] = b["attn_norm/scale"][i]
            t[p + "post_attention_layernorm.weight"] = b["mlp_norm/scale"][i]
            t[p + "self_attn.q_proj.weight"] = b["attn/wq"][i].reshape(d, n * h).T
            t[p + "self_attn.k_proj.weight"] = b["attn/wk"][i].reshape(d, k * h).T
            t[p + "self_attn.v_proj.weight"] = b["attn/wv"][i].reshape(d, k * h).T
            t[p + "self_attn.o_proj.weight"] = b["attn/wo"][i].reshape(n * h, d).T
            t[p + "mlp.gate_proj.weight"] = b["mlp/wg"][i].T
            t[p + "mlp.up_proj.weight"] = b["mlp/wi"][i].T
            t[p + "mlp.down_proj.weight"] = b["mlp/wo"][i].T
    return {name: np.asarray(x, np.float32) for name, x in t.items()}


# ---------------------------------------------------------------------------------------------
# The two directions


def _path_of(path) -> str:
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    return "/".join(n for n in names if n != "value")


def from_hf(hf_dir: str, out_dir: str) -> dict:
    """Converts a Hugging Face directory into an lm workdir with one checkpoint (step 0)."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise ConfigError(f"{hf_dir} has no config.json (is it a Hugging Face model directory?)")
    with open(config_path) as f:
        hf = json.load(f)
    fields, arch = model_fields(hf), hf_architecture(hf)
    if os.path.isdir(os.path.join(out_dir, "checkpoints")):
        raise ConfigError(f"{out_dir} already holds checkpoints; choose a new OUT_DIR")
    if arch in BERT_HEADS:
        head_fields(hf, arch)  # its errors before reading the weights
    raw, task = read_safetensors(hf_dir), {}
    if fields["style"] == "bert":
        raw, task = bert_heads(bert_aliases(raw), fields, hf, arch)
    run = from_config_dict(override(defaults(), **{f"model.{k}": v for k, v in fields.items()},
                                    **{"train.seq_len": min(1024, fields["max_len"])}, **task))
    if run.model.style == "gpt2" and "wte.weight" in raw and "transformer.wte.weight" not in raw:
        raw = {f"transformer.{k}": x for k, x in raw.items()}  # the original GPT-2 uploads
    tensors = from_hf_tensors(run.model, raw, run.task)
    _, abstract = abstract_model(run.model, run.precision, run.task)
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: np.asarray(tensors[_path_of(p)], a.dtype), abstract)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = Checkpointer(out_dir, async_save=False)
    ckpt.save(0, {"params": params}, None, run.to_dict())
    ckpt.wait()
    ckpt.close()
    tokenizer = _carry_tokenizer_in(hf_dir, out_dir)
    chat = _carry_chat_template_in(hf_dir, out_dir)
    return {"style": run.model.style, "params": sum(x.size for x in tensors.values()),
            "tokenizer": tokenizer, "chat_template": chat}


def bert_heads(raw: dict[str, np.ndarray], fields: dict, hf: dict, arch: str
               ) -> tuple[dict[str, np.ndarray], dict]:
    """(the tensors to convert, the task.* keys) of a BERT file; sets fields["nsp_head"].
    A fine-tuning architecture (BERT_HEADS) gives its task (`head_fields`) and no next-sentence
    head; a BertForQuestionAnswering's pooler, which its span head does not use, is dropped.
    Otherwise the tensors decide, not the architecture name: the Hub's bert-base-uncased says
    BertForMaskedLM and ships the pooler and the next-sentence head (task mlm_nsp)."""
    pooler = [k for k in raw if k.startswith("bert.pooler.")]
    if arch in BERT_HEADS:
        fields["nsp_head"] = False
        task = head_fields(hf, arch)
        keep_pooler, why = task["task.name"] == "classify", "its span head does not use it"
    else:
        fields["nsp_head"] = bool(pooler) and "cls.seq_relationship.weight" in raw
        task = {"task.name": "mlm_nsp" if fields["nsp_head"] else "mlm"}
        keep_pooler, why = fields["nsp_head"], "no cls.seq_relationship: no next-sentence head"
    if pooler and not keep_pooler:
        print(f"lm.convert: bert.pooler.* is not converted ({why})", file=sys.stderr)
        raw = {k: x for k, x in raw.items() if k not in pooler}
    return raw, task


def _carry_tokenizer_in(hf_dir: str, out_dir: str) -> str | None:
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(path):
        return None
    try:
        tok = lm_tokenizer.load(path)
    except (ValueError, OSError, Exception) as e:  # noqa: BLE001 (any tokenizer problem)
        print(f"lm.convert: tokenizer not carried over: {e}", file=sys.stderr)
        return None
    with open(os.path.join(out_dir, DATA_FILE), "w") as f:
        json.dump({"tokenizer": tok.save(out_dir), "converted_from": os.path.abspath(hf_dir)},
                  f, indent=1)
    return path


def _carry_chat_template_in(hf_dir: str, out_dir: str) -> bool:
    """Copies HF_DIR's chat template and its special-token strings into OUT_DIR (lm.chat's
    layout); a malformed one is reported and left behind, as a tokenizer is."""
    try:
        chat = ChatTemplate.from_directory(hf_dir)
    except ValueError as e:
        print(f"lm.convert: chat template not carried over: {e}", file=sys.stderr)
        return False
    if chat is not None:
        chat.save(out_dir)
    return chat is not None


def _chat_template_out(checkpoint: str, hf_dir: str) -> dict:
    """Writes the checkpoint's chat template (if it has one) as HF_DIR/chat_template.jinja;
    returns the tokenizer_config.json keys that carry it too ({} without one)."""
    chat = ChatTemplate.from_directory(template_directory(checkpoint))
    if chat is None:
        return {}
    with open(os.path.join(hf_dir, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
        f.write(chat.template)
    return chat.hf_tokenizer_config()


def to_hf(checkpoint: str, hf_dir: str) -> dict:
    """Writes model.safetensors + config.json (+ tokenizer.json) of an lm checkpoint; a
    decoder's classify / span checkpoint is a ConfigError (`hf_architecture_of`)."""
    run, params, tok = load_checkpoint(checkpoint)
    m = run.model
    config = hf_config(m, *((tok.eod_id, tok.pad_id) if tok is not None else (None, None)),
                       task=run.task)  # first: an unsupported head writes nothing
    params = {_path_of(p): np.asarray(x) for p, x in
              jax.tree_util.tree_flatten_with_path(params)[0]}
    tensors = to_hf_tensors(m, params, run.task)
    write_safetensors(tensors, hf_dir)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    tok_file = os.path.join(hf_dir, "tokenizer.json")
    if tok is not None and getattr(tok, "path", None):
        shutil.copy(tok.path, tok_file)
    elif tok is not None and hasattr(getattr(tok, "tokenizer", None), "save"):
        tok.tokenizer.save(tok_file)
    elif tok is not None:
        byte_level_tokenizer(tok.eod_id, tok.pad_id).save(tok_file)
    chat = _chat_template_out(checkpoint, hf_dir)
    if tok is not None:  # BERT's keys win over a chat template's, a chat template's over ours
        keys = (chat | tokenizer_config(tok_file, m.max_len) if m.style == "bert" else
                decoder_tokenizer_config(tok_file, tok.eod_id, tok.pad_id, m.max_len) | chat)
        with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
            json.dump(keys, f, indent=1)
    return {"style": m.style, "tensors": len(tensors), "architecture": config["architectures"][0]}


def decoder_tokenizer_config(tok_file: str, eod_id: int, pad_id: int, max_len: int) -> dict:
    """A decoder's tokenizer_config.json: the generic class over the file, and lm's
    end-of-document token as eos and bos (GPT-2's convention) and its pad token by name, so
    that transformers and lm-evaluation-harness stop and pad where lm does."""
    import tokenizers
    t = tokenizers.Tokenizer.from_file(tok_file)
    eos, pad = t.id_to_token(eod_id), t.id_to_token(pad_id)
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
    if eos is not None:
        out |= {"eos_token": eos, "bos_token": eos}
    if pad is not None:
        out["pad_token"] = pad
    return out


def tokenizer_config(tok_file: str, max_len: int) -> dict:
    """tokenizer_config.json for `AutoTokenizer.from_pretrained`: BertTokenizer for a standard
    BERT WordPiece tokenizer.json (transformers rebuilds its normalizer, pre-tokenizer and
    [CLS] / [SEP] template from these keys, so they must say what the file does), else the
    generic class, which runs the file as it is."""
    with open(tok_file) as f:
        spec = json.load(f)
    vocab = (spec.get("model") or {}).get("vocab") or {}
    added = {t.get("content") for t in spec.get("added_tokens") or []}
    present = [t for t in BERT_SPECIALS if t in vocab or t in added]
    names = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"),
                     BERT_SPECIALS))
    out = {k: v for k, v in names.items() if v in present}
    norm, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    bert_like = ((spec.get("model") or {}).get("type") == "WordPiece"
                 and (spec["model"].get("continuing_subword_prefix") or "##") == "##"
                 and spec["model"].get("unk_token", "[UNK]") == "[UNK]"
                 and norm.get("type") == "BertNormalizer"
                 and pre.get("type") == "BertPreTokenizer" and len(present) == len(BERT_SPECIALS))
    if bert_like:
        out |= {"tokenizer_class": "BertTokenizer", "do_lower_case": bool(norm.get("lowercase")),
                "strip_accents": norm.get("strip_accents"),
                "tokenize_chinese_chars": bool(norm.get("handle_chinese_chars", True))}
    else:
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    return out | {"model_max_length": max_len}


def byte_level_tokenizer(eod_id: int, pad_id: int):
    """lm's byte tokenizer (id = byte value, then eod and pad) as a `tokenizers` Tokenizer:
    byte-level BPE without merges, whose vocabulary puts each byte's printable stand-in (GPT-2's
    byte-to-unicode table) at the byte's value."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    stand_in, extra = {}, 0
    for b in range(256):
        if b in printable:
            stand_in[b] = chr(b)
        else:
            stand_in[b] = chr(256 + extra)
            extra += 1
    vocab = {stand_in[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = {eod_id: "<|endoftext|>", pad_id: "<|pad|>"}
    tok.add_special_tokens([AddedToken(specials[i], special=True) for i in sorted(specials)])
    return tok


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lm.convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("from-hf", help="a Hugging Face directory -> an lm workdir")
    a.add_argument("hf_dir")
    a.add_argument("out_dir")
    b = sub.add_parser("to-hf", help="an lm checkpoint -> a Hugging Face directory")
    b.add_argument("checkpoint")
    b.add_argument("hf_dir")
    args = p.parse_args(argv)
    try:
        if args.direction == "from-hf":
            info = from_hf(args.hf_dir, args.out_dir)
            print(f"converted {info['style']} ({info['params']:,} parameters) into "
                  f"{args.out_dir}" + ("" if info["tokenizer"] else " (no tokenizer)")
                  + (" with its chat template" if info["chat_template"] else ""))
        else:
            info = to_hf(args.checkpoint, args.hf_dir)
            print(f"wrote {info['tensors']} tensors of a {info['style']} model to {args.hf_dir}")
    except (ConfigError, ValueError, OSError) as e:
        print(f"lm.convert: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
