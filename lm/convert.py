"""Hugging Face checkpoints in and out: GPT2LMHeadModel and LlamaForCausalLM.

    python -m lm.convert from-hf HF_DIR OUT_DIR     # safetensors (+ index json) + config.json
    python -m lm.convert to-hf CKPT_DIR HF_DIR      # a workdir, checkpoints/ or one step dir

from-hf writes OUT_DIR as a training workdir holding one checkpoint (step 0: parameters and the
run config) and, where HF_DIR has a `tokenizer.json` with an end-of-text token, the tokenizer:
OUT_DIR then works as `--checkpoint` of lm.generate / lm.serve / lm.export and as
`--config.train.init_from` of lm.train. Parameters are stored float32 in lm's layout: the layers
stacked on a leading axis (scanned), attention weights split per head ([embed, heads, head_dim]).
to-hf writes `model.safetensors` and a `config.json` that `from_pretrained` loads, plus the
tokenizer.json where the run had a BPE tokenizer. Needs no transformers or torch.

Mapping (HF -> lm; HF Linear weights are [out, in], GPT-2's Conv1D [in, out]):
    GPT-2  wte -> embed, wpe -> pos_embed, h.i.ln_1/ln_2 -> attn_norm/mlp_norm (scale, bias),
           attn.c_attn [d, 3d] -> wq|wk|wv (+ bq|bk|bv), attn.c_proj -> attn.wo (+ bo),
           mlp.c_fc -> mlp.wi (+ bi), mlp.c_proj -> mlp.wo (+ bo), ln_f -> final_norm; tied head
    Llama  embed_tokens -> embed, layers.i.input_layernorm / post_attention_layernorm ->
           attn_norm / mlp_norm, self_attn.{q,k,v,o}_proj -> wq, wk, wv, wo, mlp.gate_proj ->
           wg, up_proj -> wi, down_proj -> wo, norm -> final_norm, lm_head -> unembed (a tied
           Llama gets unembed = embed)
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

from lm.checkpoint import Checkpointer
from lm.config import ConfigError, defaults, from_config_dict, override
from lm.data.tokenizer import DATA_FILE, BPETokenizer
from lm.generate import Engine
from lm.model import abstract_model

ARCHS = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
# Buffers some exports carry that are not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


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


def model_fields(hf: dict) -> dict:
    """lm's model.* keys from a Hugging Face config.json; unsupported choices are errors that
    name the field."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHS), None)
    if arch is None:
        raise ConfigError(f"unsupported architecture {archs or hf.get('model_type')!r}; "
                          f"supported: {', '.join(ARCHS)}")

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


def hf_config(m, eod_id: int | None = None) -> dict:
    """A config.json for `from_pretrained` from lm's ModelConfig."""
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


def from_hf_tensors(m, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """lm's parameters ('blocks/attn/wq', ... stacked over layers) from HF tensors; shape or
    name mismatches are errors naming the tensor and the config fields."""
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


def to_hf_tensors(m, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `from_hf_tensors`."""
    d, n, k, h = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    b = {path[len("blocks/"):]: x for path, x in params.items() if path.startswith("blocks/")}
    t = {}
    if m.style == "gpt2":
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
    fields = model_fields(hf)
    if os.path.isdir(os.path.join(out_dir, "checkpoints")):
        raise ConfigError(f"{out_dir} already holds checkpoints; choose a new OUT_DIR")
    run = from_config_dict(override(defaults(), **{f"model.{k}": v for k, v in fields.items()},
                                    **{"train.seq_len": min(1024, fields["max_len"])}))
    raw = read_safetensors(hf_dir)
    if run.model.style == "gpt2" and "wte.weight" in raw and "transformer.wte.weight" not in raw:
        raw = {f"transformer.{k}": x for k, x in raw.items()}  # the original GPT-2 uploads
    tensors = from_hf_tensors(run.model, raw)
    _, abstract = abstract_model(run.model, run.precision)
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: np.asarray(tensors[_path_of(p)], a.dtype), abstract)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = Checkpointer(out_dir, async_save=False)
    ckpt.save(0, {"params": params}, None, run.to_dict())
    ckpt.wait()
    ckpt.close()
    tokenizer = _carry_tokenizer_in(hf_dir, out_dir)
    return {"style": run.model.style, "params": sum(x.size for x in tensors.values()),
            "tokenizer": tokenizer}


def _carry_tokenizer_in(hf_dir: str, out_dir: str) -> str | None:
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(path):
        return None
    try:
        tok = BPETokenizer.from_file(path)
    except (ValueError, OSError, Exception) as e:  # noqa: BLE001 (any tokenizer problem)
        print(f"lm.convert: tokenizer not carried over: {e}", file=sys.stderr)
        return None
    with open(os.path.join(out_dir, DATA_FILE), "w") as f:
        json.dump({"tokenizer": tok.save(out_dir), "converted_from": os.path.abspath(hf_dir)},
                  f, indent=1)
    return path


def to_hf(checkpoint: str, hf_dir: str) -> dict:
    """Writes model.safetensors + config.json (+ tokenizer.json) of an lm checkpoint."""
    engine = Engine.from_checkpoint(checkpoint)
    m = engine.cfg
    params = {_path_of(p): np.asarray(x) for p, x in
              jax.tree_util.tree_flatten_with_path(engine.params)[0]}
    tensors = to_hf_tensors(m, params)
    write_safetensors(tensors, hf_dir)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        tok = engine.tokenizer
        json.dump(hf_config(m, tok.eod_id if tok is not None else None), f, indent=1)
    if tok is not None and getattr(tok, "path", None):
        shutil.copy(tok.path, os.path.join(hf_dir, "tokenizer.json"))
    elif tok is not None:
        byte_level_tokenizer(tok.eod_id, tok.pad_id).save(os.path.join(hf_dir, "tokenizer.json"))
    return {"style": m.style, "tensors": len(tensors)}


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
                  f"{args.out_dir}" + ("" if info["tokenizer"] else " (no tokenizer)"))
        else:
            info = to_hf(args.checkpoint, args.hf_dir)
            print(f"wrote {info['tensors']} tensors of a {info['style']} model to {args.hf_dir}")
    except (ConfigError, ValueError, OSError) as e:
        print(f"lm.convert: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
