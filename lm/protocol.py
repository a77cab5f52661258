"""The OpenAI (and vLLM) request and response shapes of `lm.serve`, without HTTP.

Requests: `parse_json` (the body: finite numbers, valid Unicode), `parse_completion` (a
/v1/completions body), `parse_chat` (a /v1/chat/completions body, rendered by the model's chat
template), `parse_embeddings` and `parse_classify` (encoders), `parse_tokenize` and
`parse_detokenize` (vLLM's). Each raises `BadRequest(param, message)`, which the server answers
400 naming the field. Responses: `completion_logprobs` and `chat_logprobs` (the `logprobs`
objects of a choice), `usage`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import secrets

import numpy as np

from lm.generate import TOP_LOGPROBS, SamplingParams


class BadRequest(ValueError):
    """A request a client can fix: 400 (or `status`), naming the field (`param`)."""

    def __init__(self, param: str | None, message: str, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def _no_constant(name: str):
    raise BadRequest(None, f"invalid JSON: {name} is not a number JSON allows (numbers must be "
                     "finite)")


def parse_json(raw: bytes):
    """The request body as JSON; BadRequest for invalid JSON or UTF-8, NaN / Infinity, and
    strings that are not valid Unicode (a lone surrogate such as "\\ud800")."""
    try:
        body = json.loads(raw or b"null", parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(None, f"invalid JSON: {e}") from None
    _check_unicode(body, "")
    return body


def _check_unicode(x, where: str) -> None:
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(where or None, f"{where or 'the body'}: the string is not valid "
                             "Unicode (a lone surrogate escape such as \\ud800)") from None
    elif isinstance(x, dict):
        for k, v in x.items():
            _check_unicode(k, where)
            _check_unicode(v, f"{where}.{k}" if where else k)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _check_unicode(v, f"{where}[{i}]")


def number(body, name, default, lo, hi, integer=False, lo_open=False):
    """body[name] (default when absent or null), checked to be a number in [lo, hi] ((lo, hi]
    with lo_open)."""
    x = body.get(name, default)
    if x is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(x, bool) or not isinstance(x, int if integer else (int, float)):
        raise BadRequest(name, f"{name} must be {kind}, got {json.dumps(x)}")
    if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise BadRequest(name, f"{name} must be {low} and <= {hi}, got {x}")
    return x


def flag(body, name, default: bool) -> bool:
    """body[name] (default when absent or null), checked to be true or false."""
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise BadRequest(name, f"{name} must be true or false, got {json.dumps(x)[:80]}")
    return x


def _string(body, name):
    if name in body and body[name] is not None and not isinstance(body[name], str):
        raise BadRequest(name, f"{name} must be a string")


# Completions


COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop",
                     "seed", "n", "stream", "user", "stream_options", "logprobs", "echo",
                     "presence_penalty", "frequency_penalty", "repetition_penalty",
                     "logit_bias", "ignore_eos", "stop_token_ids", "best_of",
                     "add_special_tokens", "return_tokens_as_token_ids"}
CHAT_FIELDS = (COMPLETION_FIELDS - {"prompt", "echo", "logprobs", "best_of"}) | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "add_generation_prompt"}
# vLLM's and OpenAI's fields that lm does not implement, accepted with the value that changes
# nothing (what `vllm bench serve` and other clients send).
NEUTRAL = {"suffix": (None, ""), "min_p": (None, 0, 0.0), "min_tokens": (None, 0),
           "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
           "include_stop_str_in_output": (None, False), "use_beam_search": (None, False),
           "length_penalty": (None, 1, 1.0), "prompt_logprobs": (None,),
           "truncate_prompt_tokens": (None,), "allowed_token_ids": (None,),
           "bad_words": (None, []), "detokenize": (None, True), "priority": (None, 0),
           "tools": (None, []),
           "tool_choice": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
           "response_format": (None, {"type": "text"}), "request_id": None}


def _unknown_fields(body, known: set[str]) -> None:
    for name in sorted(set(body) - known - set(NEUTRAL)):
        raise BadRequest(name, f"unknown field {name!r}; known: "
                         f"{', '.join(sorted(known | set(NEUTRAL)))}")
    for name in sorted(set(body) & set(NEUTRAL)):
        allowed = NEUTRAL[name]
        if allowed is None or any(body[name] == v and type(body[name]) is type(v)
                                  for v in allowed):
            continue
        if name in known:
            continue  # parsed by the caller
        raise BadRequest(name, f"{name}={json.dumps(body[name])[:80]} is not supported by this "
                         f"server (accepted: {', '.join(json.dumps(v) for v in allowed)})")


@dataclasses.dataclass
class Completion:
    """A parsed completions (or chat) request: a prompt of token ids per prompt, sampling per
    choice, and what to return."""
    prompts: list[list[int]]
    sampling: list[SamplingParams]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; k: the chosen token's and k alternatives
    echo: bool
    stop_ids: tuple[int, ...] | None  # None: the model's end-of-text id
    model: str | None
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs name "token_id:N"


def parse_completion(body, tokenizer, vocab_size: int, max_len: int, max_n: int,
                     eod_ids: tuple[int, ...] = ()) -> Completion:
    """A /v1/completions body; BadRequest naming the field otherwise."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    _unknown_fields(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise BadRequest("prompt", "prompt is required (a string, a list of token ids, or a "
                         "list of either)")
    add_special = flag(body, "add_special_tokens", True)
    prompts = _prompts(body["prompt"], tokenizer, vocab_size, add_special)
    logprobs = number(body, "logprobs", None, 0, TOP_LOGPROBS, integer=True)
    echo = flag(body, "echo", False)
    return _sampling(body, prompts, tokenizer, vocab_size, max_len, max_n, eod_ids,
                     logprobs, echo, "max_tokens")


def _sampling(body, prompts, tokenizer, vocab_size, max_len, max_n, eod_ids, logprobs, echo,
              max_name) -> Completion:
    """The fields completions and chat share."""
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage",
                                                        "continuous_usage_stats"}:
        raise BadRequest("stream_options", "stream_options must be an object with "
                         "include_usage (true / false)")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadRequest("stream_options.include_usage", "include_usage must be true or false")
    for p in prompts:
        if len(p) >= max_len:
            raise BadRequest("prompt", f"the prompt has {len(p)} tokens; the model's context is "
                             f"{max_len} (the prompt must leave room for a generated token)")
    longest = max(len(p) for p in prompts)
    room = max_len - longest
    chat = max_name == "max_completion_tokens"
    max_tokens = number(body, max_name, None, 1, 2 ** 31, integer=True)
    if chat and max_tokens is None:
        max_tokens = number(body, "max_tokens", None, 1, 2 ** 31, integer=True)
        max_name = "max_completion_tokens" if max_tokens is None else "max_tokens"
    if max_tokens is None:  # OpenAI's defaults: 16 for completions, the context for chat
        max_tokens = room if chat else min(16, room)
    if max_tokens > room:
        raise BadRequest(max_name, f"{max_name} is {max_tokens}, but the prompt has {longest} "
                         f"tokens and the model's context is {max_len}: at most {room}")
    temperature = number(body, "temperature", 1.0, 0, 2)
    top_p = number(body, "top_p", 1.0, 0, 1, lo_open=True)
    top_k = number(body, "top_k", 0, -1, vocab_size, integer=True)
    n = number(body, "n", 1, 1, max_n, integer=True)
    best_of = number(body, "best_of", None, 1, max_n, integer=True)
    if best_of is not None and best_of != n:
        raise BadRequest("best_of", f"best_of must equal n ({n}) on this server, got {best_of}")
    if len(prompts) * n > max_n:
        raise BadRequest("n", f"{len(prompts)} prompts x n={n} sequences exceed what the server "
                         f"queues at once ({max_n})")
    seed = number(body, "seed", None, 0, 2 ** 32 - 1 - n, integer=True)
    if seed is None:
        seed = secrets.randbelow(2 ** 31)
    stream = flag(body, "stream", False)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop", "stop must be a non-empty string or a list of them")
    if stop and tokenizer is None:
        raise BadRequest("stop", "stop strings need a tokenizer; this model has none")
    presence = number(body, "presence_penalty", 0.0, -2, 2)
    frequency = number(body, "frequency_penalty", 0.0, -2, 2)
    repetition = number(body, "repetition_penalty", 1.0, 0, 2, lo_open=True)
    bias = _logit_bias(body.get("logit_bias"), vocab_size)
    ignore_eos = flag(body, "ignore_eos", False)
    extra_ids = body.get("stop_token_ids") or []
    if not isinstance(extra_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
            for t in extra_ids):
        raise BadRequest("stop_token_ids", f"stop_token_ids must be a list of token ids in "
                         f"[0, {vocab_size})")
    stop_ids = None
    if ignore_eos or extra_ids:
        stop_ids = tuple(extra_ids) + (() if ignore_eos else tuple(eod_ids))
    for name in ("model", "user"):
        _string(body, name)
    as_ids = flag(body, "return_tokens_as_token_ids", False)
    sampling = [SamplingParams(
        max_new_tokens=max_tokens, temperature=float(temperature), top_k=max(0, top_k),
        top_p=float(top_p), seed=seed + j, stop=tuple(stop), presence_penalty=float(presence),
        frequency_penalty=float(frequency), repetition_penalty=float(repetition),
        logit_bias=bias, logprobs=logprobs or 0) for j in range(n)]
    return Completion(prompts, sampling, n, stream, include_usage, logprobs, echo, stop_ids,
                      body.get("model"), as_ids)


def _logit_bias(bias, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias in [-100, 100]} as ((id, bias), ...)."""
    if bias is None or bias == {}:
        return ()
    if not isinstance(bias, dict):
        raise BadRequest("logit_bias", "logit_bias must be an object {token id: bias}")
    out = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size:
            raise BadRequest("logit_bias", f"logit_bias: {key!r} is not a token id in "
                             f"[0, {vocab_size})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                -100 <= value <= 100):
            raise BadRequest("logit_bias", f"logit_bias[{key!r}] must be a number in "
                             f"[-100, 100], got {json.dumps(value)}")
        out.append((token, float(value)))
    return tuple(out)


def _prompts(prompt, tokenizer, vocab_size: int, add_special: bool = True) -> list[list[int]]:
    def one(p):
        if isinstance(p, str):
            if tokenizer is None:
                raise BadRequest("prompt", "this model has no tokenizer: send token ids as the "
                                 "prompt")
            ids = tokenizer.encode_prompt(p) if add_special else tokenizer.encode(p)
            ids = [int(t) for t in ids]
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in p):
            ids = p
            if any(not 0 <= t < vocab_size for t in ids):
                raise BadRequest("prompt", f"prompt token ids must be in [0, {vocab_size})")
        else:
            raise BadRequest("prompt", "prompt must be a string, a list of token ids, or a list "
                             "of either")
        if not ids:
            raise BadRequest("prompt", "prompt is empty")
        return ids
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [one(p) for p in prompt]
    return [one(prompt)]


# Chat


def parse_chat(body, template, tokenizer, vocab_size: int, max_len: int, max_n: int,
               eod_ids: tuple[int, ...] = ()) -> tuple[Completion, str]:
    """A /v1/chat/completions body: (the Completion of its rendered prompt, the prompt text).
    `template`: an `lm.chat.ChatTemplate`."""
    from lm.chat import ChatError, encode_chat, validate_messages
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    if tokenizer is None:
        raise BadRequest(None, "chat needs a tokenizer; this model has none")
    _unknown_fields(body, CHAT_FIELDS)
    if "messages" not in body:
        raise BadRequest("messages", "messages is required (a list of {role, content})")
    add_prompt = flag(body, "add_generation_prompt", True)
    try:
        text = template.render(validate_messages(body["messages"]),
                               add_generation_prompt=add_prompt)
    except ChatError as e:
        raise BadRequest(e.param, str(e)) from None
    ids = encode_chat(tokenizer, text)
    if not ids:
        raise BadRequest("messages", "the rendered conversation is empty")
    want = body.get("logprobs", False)
    if not isinstance(want, bool):
        raise BadRequest("logprobs", "logprobs must be true or false (top_logprobs: how many "
                         "alternatives)")
    top = number(body, "top_logprobs", None, 0, TOP_LOGPROBS, integer=True)
    if top is not None and not want:
        raise BadRequest("top_logprobs", "top_logprobs needs logprobs: true")
    turn_end = template.eos_id(tokenizer)  # a chat model's end of turn (Llama 3: <|eot_id|>)
    eod_ids = tuple(eod_ids) + ((turn_end,) if turn_end is not None else ())
    req = _sampling(body, [ids], tokenizer, vocab_size, max_len, max_n, eod_ids,
                    (top or 0) if want else None, False, "max_completion_tokens")
    if req.stop_ids is None:
        req.stop_ids = eod_ids
    if template.stop:
        req.sampling = [dataclasses.replace(s, stop=s.stop + template.stop)
                        for s in req.sampling]
    return req, text


# Responses


def token_text(tokenizer, token: int) -> str:
    """One token's text ("token_id:N" without a tokenizer, as vLLM writes ids)."""
    if tokenizer is None:
        return f"token_id:{token}"
    return tokenizer.decode(np.asarray([token], np.int32))


def completion_logprobs(tokenizer, entries, offset: int = 0) -> dict:
    """The legacy completions `logprobs` of TokenLogprob `entries` (prompt entries may be None
    for the first token): tokens, token_logprobs, top_logprobs ({token: logprob}, the chosen
    token included, as vLLM), text_offset (`offset` + each entry's)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(token_text(tokenizer, e.token))
        out["token_logprobs"].append(e.logprob)
        out["text_offset"].append(offset + e.offset)
        if e.logprob is None:
            out["top_logprobs"].append(None)
            continue
        top = {token_text(tokenizer, t): lp for t, lp in e.top}
        top.setdefault(token_text(tokenizer, e.token), e.logprob)
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokenizer, entries) -> dict:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def item(token, lp):
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {"content": [item(e.token, e.logprob) | {
        "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# vLLM's /tokenize and /detokenize


def parse_tokenize(body, tokenizer, template=None) -> tuple[list[int], str | None]:
    """vLLM's /tokenize: {"prompt": text, "add_special_tokens"?} or {"messages": [...],
    "add_generation_prompt"?} -> (the token ids, the rendered text for messages)."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    if tokenizer is None:
        raise BadRequest(None, "this model has no tokenizer")
    known = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
             "return_token_strs"}
    for name in sorted(set(body) - known):
        raise BadRequest(name, f"unknown field {name!r}; known: {', '.join(sorted(known))}")
    _string(body, "model")
    if ("prompt" in body) == ("messages" in body):
        raise BadRequest("prompt", "send prompt (a string) or messages (a chat), one of them")
    if "messages" in body:
        from lm.chat import ChatError, encode_chat, validate_messages
        try:
            text = template.render(validate_messages(body["messages"]),
                                   add_generation_prompt=body.get("add_generation_prompt",
                                                                  True) is True)
        except ChatError as e:
            raise BadRequest(e.param, str(e)) from None
        return encode_chat(tokenizer, text), text
    if not isinstance(body["prompt"], str):
        raise BadRequest("prompt", "prompt must be a string")
    add = body.get("add_special_tokens", True)
    ids = tokenizer.encode_prompt(body["prompt"]) if add else tokenizer.encode(body["prompt"])
    return [int(t) for t in ids], None


def parse_detokenize(body, vocab_size: int) -> list[int]:
    """vLLM's /detokenize: {"tokens": [ids]}."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    for name in sorted(set(body) - {"model", "tokens"}):
        raise BadRequest(name, f"unknown field {name!r}; known: model, tokens")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
            for t in tokens):
        raise BadRequest("tokens", f"tokens must be a list of token ids in [0, {vocab_size})")
    return tokens


# Encoder requests: /v1/embeddings and /classify

EMBEDDING_FIELDS = {"input", "model", "encoding_format", "dimensions", "user"}
CLASSIFY_FIELDS = {"inputs", "model"}
ROW_FIELDS = {"classify": ("text", "text_pair"), "span": ("question", "context")}


def _fields(body, known: set[str]) -> None:
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    for name in sorted(set(body) - known):
        raise BadRequest(name, f"unknown field {name!r}; known: {', '.join(sorted(known))}")
    for name in ("model", "user"):
        _string(body, name)


def parse_embeddings(body, dim: int, max_rows: int) -> tuple[list[str], str]:
    """(the input texts, the encoding format) of an /v1/embeddings body (OpenAI's); BadRequest
    naming the field otherwise."""
    _fields(body, EMBEDDING_FIELDS)
    if "input" not in body:
        raise BadRequest("input", "input is required (a string or a list of strings)")
    texts = body["input"]
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts:
        raise BadRequest("input", "input must be a string or a non-empty list of strings")
    for i, t in enumerate(texts):
        if isinstance(t, int) or (isinstance(t, list) and t and isinstance(t[0], int)):
            raise BadRequest("input", "input as token ids is not supported by this server: "
                             "send text")
        if not isinstance(t, str):
            raise BadRequest("input", f"input[{i}] must be a string, got {json.dumps(t)}")
        if not t:
            raise BadRequest("input", f"input[{i}] is an empty string")
    if len(texts) > max_rows:
        raise BadRequest("input", f"{len(texts)} inputs exceed what the server queues at once "
                         f"({max_rows} rows)")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise BadRequest("encoding_format", f"encoding_format must be 'float' or 'base64', got "
                         f"{json.dumps(fmt)}")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or dims != dim):
        raise BadRequest("dimensions", f"dimensions: this model's embeddings have {dim} "
                         f"dimensions and cannot be shortened, got {json.dumps(dims)}")
    return texts, fmt


def parse_classify(body, task: str, max_rows: int) -> list[dict]:
    """The rows of a /classify body: {"text", "text_pair"?} for a classify model (a bare
    string is {"text": it}), {"question", "context"} for a span model; BadRequest naming the
    field otherwise."""
    _fields(body, CLASSIFY_FIELDS)
    if "inputs" not in body:
        raise BadRequest("inputs", "inputs is required (a list of objects, or of strings)")
    inputs = body["inputs"]
    inputs = [inputs] if isinstance(inputs, (str, dict)) else inputs
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("inputs", "inputs must be a non-empty list")
    if len(inputs) > max_rows:
        raise BadRequest("inputs", f"{len(inputs)} inputs exceed what the server queues at "
                         f"once ({max_rows} rows)")
    keys = ROW_FIELDS[task]
    rows = []
    for i, row in enumerate(inputs):
        where = f"inputs[{i}]"
        if isinstance(row, str) and task == "classify":
            row = {"text": row}
        if not isinstance(row, dict):
            form = ('{"text": ..., "text_pair": ... (optional)} or a string' if task == "classify"
                    else '{"question": ..., "context": ...}')
            raise BadRequest(where, f"{where} must be {form}, got {json.dumps(row)[:80]}")
        for name in sorted(set(row) - set(keys)):
            raise BadRequest(f"{where}.{name}", f"{where}.{name}: unknown field; a {task} model "
                             f"reads {', '.join(keys)}")
        for name in keys:
            x = row.get(name)
            if name == "text_pair" and x is None:
                continue
            if name not in row:
                raise BadRequest(f"{where}.{name}", f"{where}.{name} is required")
            if not isinstance(x, str) or not x.strip():
                raise BadRequest(f"{where}.{name}", f"{where}.{name} must be a non-empty "
                                 f"string, got {json.dumps(x)[:80]}")
        rows.append({k: row[k] for k in keys if row.get(k) is not None})
    return rows
