#!/usr/bin/env python3
"""Peer for bench/generate.py on a GPU: Hugging Face `generate` (greedy, KV cache, sdpa) of a
randomly initialised GPT-2 or Llama on a torch device and dtype. ../shared/bench/hf_peer.py is
the CPU peer; it has no device option. Prints one JSON line with generate_tokens_per_s."""
import argparse
import json
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--mlp", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    positions = a.prompt_len + a.new_tokens
    if a.arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(
            n_layer=a.layers, n_embd=a.d_model, n_head=a.heads, n_inner=a.mlp,
            vocab_size=a.vocab, n_positions=positions, attn_implementation="sdpa"))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(
            num_hidden_layers=a.layers, hidden_size=a.d_model, num_attention_heads=a.heads,
            intermediate_size=a.mlp, vocab_size=a.vocab, max_position_embeddings=positions,
            attn_implementation="sdpa"))
    model = model.to(a.device, getattr(torch, a.dtype)).eval()
    ids = torch.randint(0, a.vocab, (a.batch, a.prompt_len), device=a.device)

    def run(n):
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad():
        run(a.new_tokens)  # warm-up
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            run(a.new_tokens)
            times.append(time.perf_counter() - t)
    dt = sorted(times)[len(times) // 2]
    print(json.dumps({"peer": f"torch {torch.__version__} + transformers generate ({a.arch}, "
                      f"{a.device}, {a.dtype})", "generate_tokens_per_s":
                      a.batch * a.new_tokens / dt}))


if __name__ == "__main__":
    main()
