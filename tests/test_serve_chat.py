"""`python -m lm.serve --model NAME=DIR --model ...`: two models in one server. Chat completions
on a converted Llama with a chat template, through the official `openai` client, equal
`transformers`' apply_chat_template + greedy generation; requests are routed by `model`."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from conftest import ROOT
from lm.chat import validate_messages
from lm.generate import Engine, SamplingParams
from test_chat import make_chat_llama
from test_serve import Served

MESSAGES = [{"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Which colour is the sky?"},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": [{"type": "text", "text": "And grass?"}]}]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(a tiny random HF Llama with a Llama-3 chat template, its lm conversion)."""
    tmp = tmp_path_factory.mktemp("chat")
    hf = make_chat_llama(tmp / "hf")
    out = tmp / "lm"
    proc = subprocess.run([sys.executable, "-m", "lm.convert", "from-hf", hf, str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return hf, str(out)


@pytest.fixture(scope="module")
def server(llama, trained_workdir):
    s = Served("--model", f"llama={llama[1]}", "--model", f"tiny={trained_workdir}",
               "--max-batch-size", "4")
    yield s
    s.close()


def hf_greedy(hf_dir, messages, max_new_tokens):
    """transformers' answer: (the prompt ids apply_chat_template gives, the generated ids
    without the final eos, their text). The messages go through lm.chat.validate_messages first:
    text parts are joined into a string, as lm.serve and vLLM do for a template that reads
    content as a string (transformers would render the list's Python repr)."""
    messages = validate_messages(messages)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones_like(ids))
    new = out[0, ids.shape[1]:].tolist()
    if new and new[-1] == model.config.eos_token_id:
        new = new[:-1]
    return ids[0].tolist(), new, tok.decode(new, skip_special_tokens=False)


def test_chat_completions_equal_transformers_greedy(server, llama):
    prompt_ids, want_ids, want_text = hf_greedy(llama[0], MESSAGES, 12)
    out = server.client.chat.completions.create(model="llama", messages=MESSAGES,
                                                max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want_text
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == len(want_ids)
    assert choice.finish_reason == ("length" if len(want_ids) == 12 else "stop")
    chunks = list(server.client.chat.completions.create(
        model="llama", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want_text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want_ids)
    # The prompt the server rendered is the one transformers renders.
    status, body = server.request("POST", "/tokenize", {"model": "llama", "messages": MESSAGES})
    assert status == 200 and json.loads(body)["tokens"] == prompt_ids


def test_chat_logprobs_and_a_bad_conversation(server):
    out = server.client.chat.completions.create(
        model="llama", messages=MESSAGES[:2], max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) >= out.usage.completion_tokens >= 1
    for item in content:
        assert len(item.top_logprobs) == 3
        assert abs(item.logprob - item.top_logprobs[0].logprob) < 1e-5  # greedy
    status, text = server.request("POST", "/v1/chat/completions", {
        "model": "llama", "messages": [{"role": "wizard", "content": "hi"}]})
    assert status == 400 and json.loads(text)["error"]["param"] == "messages[0].role", text
    status, text = server.request("POST", "/v1/chat/completions", {
        "model": "llama", "messages": MESSAGES, "tools": [{"type": "function"}]})
    assert status == 400 and "tools" in text


def test_requests_are_routed_by_model(server, trained_workdir):
    engine = Engine.from_checkpoint(str(trained_workdir))
    ids = [int(t) for t in engine.tokenizer.encode("def main(")]
    want = engine.generate([ids], SamplingParams(max_new_tokens=8,
                                                 stop_ids=(engine.tokenizer.eod_id,)))[0]
    out = server.client.completions.create(model="tiny", prompt=ids, max_tokens=8,
                                           temperature=0)
    assert out.choices[0].model_extra["token_ids"] == want and out.model == "tiny"
    status, text = server.request("POST", "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and "llama, tiny" in text
    status, text = server.request("GET", "/v1/models")
    cards = {c["id"]: c for c in json.loads(text)["data"]}
    assert set(cards) == {"llama", "tiny"}
    assert cards["tiny"]["max_model_len"] == engine.max_len
    assert cards["llama"]["max_model_len"] == 256
    m = server.metrics()
    tokens = {dict(labels)["model_name"]: v for (name, labels), v in m.items()
              if name == "vllm:generation_tokens_total"}
    assert tokens["tiny"] >= len(want) and tokens["llama"] > 0
    status, text = server.request("GET", "/health")
    health = json.loads(text)
    assert status == 200 and set(health["models"]) == {"llama", "tiny"}
    assert np.all([h["slots"] == 4 for h in health["models"].values()])
