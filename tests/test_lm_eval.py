"""lm-evaluation-harness against lm.serve: the same scores as lm-eval's own `hf` model on the
`lm.convert to-hf` export of the same checkpoint.

Both halves run lm-eval from its command line (`python -m lm_eval run`) on the two tasks of
tests/lm_eval/ (copied into a temporary --include_path with their data_files made absolute):
lm_serve_mc (multiple choice: loglikelihood requests, acc and acc_norm) and lm_serve_gen
(generate_until: greedy, 16 tokens, six stop strings, exact_match). One is `--model hf` on the
export (CPU, float32); the other is `--model local-completions` on a live `python -m lm.serve`
of the checkpoint, with token-id prompts (tokenized_requests) and the export's tokenizer, so
that both score the same token ids. lm-eval asks the server for `echo` + `logprobs` (the
prompt's logprobs) for loglikelihoods and for `stop` with more than four strings.

The scores must be equal, and so must every sample: the generated texts exactly, the
loglikelihoods within 1e-4 (float32 JAX vs float32 torch: about 1e-5 apart here; the smallest
margin between two choices, in acc_norm, is about 5e-3, so acc and acc_norm cannot flip). The
scores themselves are not asserted: the model is trained 2 steps (greedy decoding repeats the
prompt's last byte: some samples stop at once on a stop string, others run 16 tokens).

A second check needs no lm-eval command line: the loglikelihood of one continuation by
transformers' forward on the export equals the sum of the `token_logprobs` lm.serve returns for
echo=True, max_tokens=1, logprobs=1 (what lm-eval sends), as lm-eval's own parser reads them.

Each lm-eval run takes 20-35 s on 2 (shared) CPU cores, nearly all of it start-up (imports ~5 s,
the task and dataset set-up, the model); the requests themselves take about a second. lm.serve's
start (its warm-up compiles) takes ~2 minutes there; it is started once for the module.
"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT

TASK_DIR = os.path.join(ROOT, "tests", "lm_eval")
TASKS = ("lm_serve_mc", "lm_serve_gen")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
LL_TOL = 1e-4  # per loglikelihood (a sum of up to 11 float32 log-probabilities)


# ---------------------------------------------------------------------------------------------
# Helpers: the tasks, lm-eval's command line, its output files, the server


def write_tasks(dst) -> str:
    """tests/lm_eval's task YAMLs, copied into `dst` with absolute data_files; returns dst."""
    os.makedirs(dst, exist_ok=True)
    for name in TASKS:
        with open(os.path.join(TASK_DIR, f"{name}.yaml")) as f:
            task = yaml.safe_load(f)
        files = task["dataset_kwargs"]["data_files"]
        files["test"] = os.path.join(TASK_DIR, files["test"])
        with open(os.path.join(dst, f"{name}.yaml"), "w") as f:
            yaml.safe_dump(task, f, sort_keys=False)
    return str(dst)


def offline_env(tmp) -> dict:
    """The environment of an lm-eval run: offline, its datasets cache in `tmp`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    return env | OFFLINE | {"HF_DATASETS_CACHE": os.path.join(str(tmp), "datasets"),
                            "PYTHONUNBUFFERED": "1"}


def lm_eval(model: str, model_args: str, tasks_dir: str, out, *extra: str) -> dict:
    """Runs `python -m lm_eval run` on TASKS with --log_samples; returns `read_output(out)`."""
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
           "--tasks", ",".join(TASKS), "--include_path", tasks_dir, "--output_path", str(out),
           "--log_samples", *extra]
    out.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(cmd, cwd=str(out.parent), env=offline_env(out.parent),
                       capture_output=True, text=True, timeout=900)
    # The server's answers to failed requests first (lm-eval logs them, then a long traceback).
    failed = [line for line in (p.stdout + p.stderr).splitlines() if "request failed" in line]
    assert p.returncode == 0, (f"lm_eval --model {model} failed ({p.returncode}):\n"
                               + "\n".join(failed[:3]) + f"\n...\n{p.stderr[-3000:]}")
    return read_output(out)


def read_output(out) -> dict:
    """{"results": results_*.json's "results", "samples": {task: [sample, ...] by doc_id}}
    of one lm-eval run's --output_path."""
    found = glob.glob(os.path.join(str(out), "**", "results_*.json"), recursive=True)
    assert len(found) == 1, f"expected one results file under {out}, found {found}"
    with open(found[0]) as f:
        results = json.load(f)["results"]
    samples = {}
    for task in TASKS:
        (path,) = glob.glob(os.path.join(str(out), "**", f"samples_{task}_*.jsonl"),
                            recursive=True)
        with open(path) as f:
            samples[task] = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    return {"results": results, "samples": samples}


def start_server(workdir):
    """`python -m lm.serve --checkpoint WORKDIR --port 0` (tests/test_serve.py's Served: one
    CPU device, `.port`, `.request(method, path, body)`, `.close()`)."""
    from test_serve import Served
    return Served("--checkpoint", str(workdir), "--max-batch-size", "8",
                  "--max-queue-size", "256", "--max-queue-delay-ms", "5")


def served_model(server) -> str:
    """The name lm.serve serves the checkpoint under (/v1/models; it 404s any other)."""
    status, text = server.request("GET", "/v1/models")
    assert status == 200, text
    return json.loads(text)["data"][0]["id"]


def assert_same_scores(ours: dict, ref: dict) -> None:
    """Equal metrics per task; every sample: generations equal, loglikelihoods within
    LL_TOL and the same is_greedy."""
    for task in TASKS:
        a, b = ours["results"][task], ref["results"][task]
        keys = [k for k in b if k.split(",")[0] in ("acc", "acc_norm", "exact_match")]
        assert keys, f"{task}: no metric in {b}"
        assert {k: a.get(k) for k in keys} == {k: b[k] for k in keys}, task
        assert len(ours["samples"][task]) == len(ref["samples"][task])
        for s, r in zip(ours["samples"][task], ref["samples"][task]):
            assert s["doc_id"] == r["doc_id"]
            where = f"{task} doc {r['doc_id']}: {r['doc']}"
            if task == "lm_serve_gen":
                assert s["filtered_resps"] == r["filtered_resps"], where
                continue
            got = [(float(x[0][0]), x[0][1]) for x in s["resps"]]
            want = [(float(x[0][0]), x[0][1]) for x in r["resps"]]
            np.testing.assert_allclose([g for g, _ in got], [w for w, _ in want], rtol=0,
                                       atol=LL_TOL, err_msg=where)
            assert [g for _, g in got] == [w for _, w in want], where


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def hf_dir(trained_workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval_hf") / "hf"
    p = subprocess.run([sys.executable, "-m", "lm.convert", "to-hf", str(trained_workdir),
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def max_len(hf_dir) -> int:
    with open(hf_dir / "config.json") as f:
        return json.load(f)["n_positions"]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def hf_reference(hf_dir, tasks_dir, tmp_path_factory):
    """lm-eval's own `hf` model on the export: the reference scores."""
    out = tmp_path_factory.mktemp("lm_eval_ref") / "out"
    return lm_eval("hf", f"pretrained={hf_dir},dtype=float32", tasks_dir, out,
                   "--device", "cpu", "--batch_size", "4")


@pytest.fixture(scope="module")
def server(trained_workdir):
    s = start_server(trained_workdir)
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# Tests


def test_the_export_loads_for_lm_eval(hf_dir):
    """What lm-eval's hf model and its local-completions tokenizer need of the export:
    AutoTokenizer / AutoModelForCausalLM load it, the tokenizer encodes bytes as lm does and
    has an end-of-text token (lm-eval's stop string and prefix token)."""
    import torch
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "def main():\n    return 1"
    assert tok(text, add_special_tokens=False).input_ids == list(text.encode())
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 256
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert model.config.eos_token_id == 256 and model.config.n_positions == 64


def test_lm_eval_hf_scores_the_export(hf_reference):
    """The reference run: both tasks scored, every doc, with loglikelihoods for every choice."""
    res, samples = hf_reference["results"], hf_reference["samples"]
    assert set(TASKS) <= set(res)
    for k in ("acc,none", "acc_norm,none"):
        assert 0 <= res["lm_serve_mc"][k] <= 1
    assert 0 <= res["lm_serve_gen"]["exact_match,none"] <= 1
    assert len(samples["lm_serve_mc"]) == 12 and len(samples["lm_serve_gen"]) == 8
    assert all(len(s["resps"]) == len(s["doc"]["choices"]) for s in samples["lm_serve_mc"])
    # The generations differ from doc to doc (the comparison below is not of constants).
    assert len({s["filtered_resps"][0] for s in samples["lm_serve_gen"]}) > 1


@pytest.mark.parametrize("concurrency, batch",
                         [(4, 4), (1, 1)],
                         ids=["concurrent-batched", "sequential"])
def test_lm_eval_local_completions_matches_hf(server, hf_reference, hf_dir, max_len, tasks_dir,
                                              tmp_path, concurrency, batch):
    """lm-eval's local-completions on lm.serve scores as its hf model does on the export.
    concurrent-batched: 4 requests in flight, each of 4 prompts (the stop list as the task has
    it); sequential: one prompt per request (lm-eval then adds the tokenizer's eos string to the
    stop list: seven strings)."""
    args = ",".join([
        f"model={served_model(server)}", f"base_url=http://127.0.0.1:{server.port}/v1/completions",
        "tokenizer_backend=huggingface", f"tokenizer={hf_dir}", "tokenized_requests=True",
        f"max_length={max_len}", f"num_concurrent={concurrency}", "max_retries=1",
        "timeout=120"])
    ours = lm_eval("local-completions", args, tasks_dir, tmp_path / "out",
                   "--batch_size", str(batch))
    assert_same_scores(ours, hf_reference)


def test_echo_logprobs_match_transformers(server, hf_dir):
    """One (context, continuation): transformers' loglikelihood of the continuation on the export
    equals the sum of lm.serve's echoed token_logprobs, as lm-eval's parser reads them."""
    import torch
    import transformers
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    context, continuation = "def __init__(self", ", name):"
    ids = list((context + continuation).encode())  # the export's tokenizer: one id per byte
    ctxlen = len(context.encode())
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).numpy()
    per_token = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    want = sum(per_token[ctxlen - 1:])
    greedy = all(int(np.argmax(logp[i - 1])) == ids[i] for i in range(ctxlen, len(ids)))

    body = {"model": served_model(server), "prompt": [ids], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}  # lm-eval's loglikelihood request
    status, text = server.request("POST", "/v1/completions", body)
    assert status == 200, text
    out = json.loads(text)
    lp = out["choices"][0]["logprobs"]
    n = len(ids) + 1  # the prompt's tokens, then the generated one
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], per_token, rtol=0, atol=1e-4)
    for top in lp["top_logprobs"][1:]:
        assert isinstance(top, dict) and 1 <= len(top) <= 2
    ll, is_greedy = LocalCompletionsAPI.parse_logprobs(outputs=out, tokens=[ids],
                                                       ctxlens=[ctxlen])[0]
    assert abs(ll - want) < 1e-4, (ll, want)
    assert is_greedy == greedy
    # echo: the text is the prompt's, then the generated token's (OpenAI's legacy completions).
    assert out["choices"][0]["text"].startswith(context + continuation)
