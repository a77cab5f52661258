#!/usr/bin/env python3
"""Training peer for bench/train_throughput.py on a GPU (or the CPU): PyTorch + Hugging Face
transformers training a randomly initialised GPT-2 or Llama (sdpa attention) with AdamW, under
bf16 / fp16 autocast (float32 weights and optimizer state, as lm's master weights), optionally
with gradient checkpointing. ../shared/bench/hf_peer.py is the CPU-only fp32 peer.
Prints one JSON line with train_step_s and train_tokens_per_s (median step, after a warm-up)."""
import argparse
import json
import time

import torch


def build(a):
    if a.arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        return GPT2LMHeadModel(GPT2Config(
            n_layer=a.layers, n_embd=a.d_model, n_head=a.heads, n_inner=a.mlp,
            vocab_size=a.vocab, n_positions=a.seq, attn_implementation="sdpa"))
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=a.layers, hidden_size=a.d_model, num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads or a.heads, intermediate_size=a.mlp, vocab_size=a.vocab,
        max_position_embeddings=a.seq, attn_implementation="sdpa"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=["gpt2", "llama"], default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=0)
    p.add_argument("--mlp", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", help="autocast dtype, or float32 for none")
    p.add_argument("--remat", action="store_true", help="gradient checkpointing per layer")
    a = p.parse_args()
    torch.manual_seed(0)
    model = build(a).to(a.device)
    if a.remat:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=a.device.startswith("cuda"))
    x = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device)
    autocast = a.dtype != "float32"

    def step():
        with torch.autocast(a.device.split(":")[0], dtype=getattr(torch, a.dtype),
                            enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        step()  # warm-up
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    dt = sorted(times)[len(times) // 2]
    print(json.dumps({
        "peer": f"torch {torch.__version__} + transformers ({a.arch}, {a.device}, {a.dtype} "
                f"autocast{', remat' if a.remat else ''})",
        "batch": a.batch, "train_step_s": dt, "train_tokens_per_s": a.batch * a.seq / dt}))


if __name__ == "__main__":
    main()
