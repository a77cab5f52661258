"""Chat templates: OpenAI-style `messages` rendered into the prompt text a chat model was
trained on, exactly as Hugging Face's `apply_chat_template(..., tokenize=False)` renders them,
for `/v1/chat/completions` of lm.serve.

    template = ChatTemplate.for_checkpoint(path)   # the checkpoint's own, else default_template()
    messages = validate_messages(request["messages"])   # ChatError(param, message) if malformed
    text = template.render(messages)                    # add_generation_prompt=True
    ids = encode_chat(tokenizer, text)                  # no special tokens added
    # stop on template.stop (strings) and template.eos_id(tokenizer), besides the eod id

Where a template lives (an lm workdir; a Hugging Face directory is read the same way):
    WORKDIR/chat_template.jinja    the Jinja source, verbatim (Hugging Face's file name)
    WORKDIR/tokenizer_config.json  the special-token strings it renders with, Hugging Face's
                                   keys: {"bos_token": "<s>", "eos_token": "</s>", ...}
`chat_template.jinja` wins over a `chat_template` key of tokenizer_config.json (a string, or a
list of {"name", "template"} of which "default" is used), as in transformers. In a Hugging Face
directory, special_tokens_map.json fills the token strings too where tokenizer_config.json has
no `added_tokens_decoder` (transformers' legacy rule). `lm.convert from-hf` writes these two
files into its output when the Hugging Face directory has a template; `to-hf` writes them back
(and the template under tokenizer_config.json's `chat_template` too, which older transformers
read). A workdir with neither `chat_template.jinja` nor a `chat_template` key gets
`default_template()`.

Rendering matches transformers 5's: Jinja2's immutable sandbox with `trim_blocks` and
`lstrip_blocks`, the loop-controls extension and a `{% generation %}` block (rendered as is),
the globals `raise_exception(message)`, `strftime_now(format)`, a `namespace` refusing
underscore names and a `dict`, a `tojson` filter that is `json.dumps` (no HTML escaping,
`ensure_ascii=False`, `indent`, `separators`, `sort_keys`); the template sees `messages` (keys
whose value is None dropped; a `reasoning_content` / `thinking` / `reasoning` copied under the
first two names), `add_generation_prompt`, `tools` and `documents` (None unless given), every
special-token string (`bos_token`, `eos_token`, `unk_token`, ...) and the keyword arguments of
`render`, which override the tokens.

Encoding contract: the rendered text is encoded WITHOUT the special tokens a tokenizer's
post-processor adds (a Llama's `<s>`): the template writes them itself, as transformers'
`apply_chat_template(tokenize=True)` encodes with add_special_tokens=False. `encode_chat` does
this with lm's tokenizers (their `encode` adds none; special tokens written in the text, such as
`<|eot_id|>`, still become their ids: `tokenizers` matches added tokens in the text).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ROLES = ("system", "user", "assistant", "tool", "developer")
SOURCES = ("checkpoint", "default")
PART_SEPARATOR = "\n"  # between the text parts of one message's content, as vLLM joins them
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # the first two are read

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DEFAULT_STOP = ("<|im_end|>", "<|im_start|>")


class ChatError(ValueError):
    """A chat request the server must refuse (HTTP 400): `param` names the field, as OpenAI's
    error object does ("messages", "messages[2].content"), the message what would be valid."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


# ---------------------------------------------------------------------------------------------
# Requests


def validate_messages(messages) -> list[dict]:
    """A chat request's `messages` checked as OpenAI checks them, as the plain dicts a template
    reads: a non-empty list of objects, each with a `role` of ROLES and a `content` that is a
    string or a non-empty list of {"type": "text", "text": str} parts (joined with a newline
    into one string). An assistant message may instead carry `tool_calls` (a list) and no
    content; a tool message needs its `tool_call_id`. `name`, `tool_calls` and `tool_call_id`
    are kept, other keys dropped; role "developer" (OpenAI's newer name for the system message)
    becomes "system", the role chat templates know. A bad field is a ChatError naming it."""
    if not isinstance(messages, list):
        raise ChatError("messages", f"messages must be a list of message objects, got "
                        f"{_kind(messages)}")
    if not messages:
        raise ChatError("messages", "messages must hold at least one message")
    return [_validate_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def _validate_message(message, where: str) -> dict:
    if not isinstance(message, dict):
        raise ChatError(where, f"{where} must be an object with a role and a content, got "
                        f"{_kind(message)}")
    if "role" not in message:
        raise ChatError(f"{where}.role", f"{where} has no role; expected one of "
                        f"{_listing(ROLES)}")
    role = message["role"]
    if role not in ROLES:
        raise ChatError(f"{where}.role", f"{where}.role must be one of {_listing(ROLES)}, got "
                        f"{role!r}")
    out = {"role": "system" if role == "developer" else role}
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant" or not isinstance(tool_calls, list):
            raise ChatError(f"{where}.tool_calls", f"{where}.tool_calls must be a list, and "
                            f"only an assistant message has one; got {_kind(tool_calls)} in a "
                            f"{role!r} message")
    if message.get("content") is not None or not tool_calls:
        out["content"] = _content_text(message.get("content"), f"{where}.content")
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None and not isinstance(message[key], str):
            raise ChatError(f"{where}.{key}", f"{where}.{key} must be a string, got "
                            f"{_kind(message[key])}")
        if message.get(key) is not None:
            out[key] = message[key]
    if role == "tool" and "tool_call_id" not in out:
        raise ChatError(f"{where}.tool_call_id", f"{where} is a tool message: it needs the "
                        "tool_call_id (a string) of the call it answers")
    if tool_calls:
        out["tool_calls"] = tool_calls
    return out


def _content_text(content, where: str) -> str:
    """A message's content as one string: a string as it is, text parts joined."""
    if isinstance(content, str):
        return content
    valid = "a string or a non-empty list of {\"type\": \"text\", \"text\": ...} parts"
    if not isinstance(content, list) or not content:
        raise ChatError(where, f"{where} must be {valid}, got {_kind(content)}")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise ChatError(at, f"{at} must be a {{\"type\": \"text\", \"text\": ...}} object, "
                            f"got {_kind(part)}")
        if part.get("type") != "text":
            raise ChatError(f"{at}.type", f"{at}.type must be 'text' (only text parts are "
                            f"supported), got {part.get('type')!r}")
        if not isinstance(part.get("text"), str):
            raise ChatError(f"{at}.text", f"{at}.text must be a string, got "
                            f"{_kind(part.get('text'))}")
        texts.append(part["text"])
    return PART_SEPARATOR.join(texts)


def _kind(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             type(None): "null", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _listing(names) -> str:
    return ", ".join(repr(n) for n in names)


# ---------------------------------------------------------------------------------------------
# The Jinja environment (transformers' choices, see the module docstring)


class _Raised(jinja2.exceptions.TemplateError):
    """What a template's raise_exception(message) raises: a refusal of the messages."""


def _raise_exception(message):
    raise _Raised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """json.dumps: unlike Jinja's own tojson, no HTML escaping (templates write JSON prompts)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace(), refusing underscore-prefixed names (a way out of the sandbox)."""

    def __init__(*args, **kwargs):  # jinja's signature: `self` may be a namespace key
        self, values = args[0], dict(*args[1:], **kwargs)
        for name in values:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, values)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template may not store the underscore-prefixed name {name!r} on a "
                "namespace")


class _Dict:
    """The template's dict(): builds plain dicts, without the dict type's attributes."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks the assistant's tokens for training
    masks in transformers): its body is rendered unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_Namespace, dict=_Dict())
    return env


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse (line {e.lineno}): {e.message}"
                         ) from None


def _template_messages(messages: list[dict]) -> list[dict]:
    """The messages as transformers hands them to a template: fresh dicts without None values,
    a reasoning text under `thinking` and `reasoning_content` too."""
    out = []
    for message in messages:
        message = {k: v for k, v in dict(message).items() if v is not None}
        reasoning = next((message[k] for k in REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# ---------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special-token strings it renders with. `source`: "checkpoint"
    (stored with the model) or "default" (`default_template()`). `stop`: stop strings a server
    applies to chat generations besides the token ids (empty for a model's own template, which
    ends a turn with its eos token: `eos_id`). `extra_tokens`: the other special-token strings
    by Hugging Face name (unk_token, pad_token, ...). The template is parsed here: a broken
    one is a ValueError when it is loaded, not at the first request."""

    source: str
    template: str
    bos_token: str | None = None
    eos_token: str | None = None
    stop: tuple[str, ...] = ()
    extra_tokens: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"ChatTemplate source must be one of {_listing(SOURCES)}, got "
                             f"{self.source!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        _compiled(self.template)

    @property
    def special_tokens(self) -> dict[str, str]:
        """Every special-token string by name, bos_token and eos_token included (those set)."""
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        return {**self.extra_tokens, **{k: v for k, v in named.items() if v is not None}}

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text of `messages` (validated ones: `validate_messages`); with
        `add_generation_prompt`, ending where the assistant's reply begins. `extra`: more
        names for the template (tools=[...], or a template's own switches). A template's
        raise_exception(message), or a failure on these messages, is a ChatError."""
        names = {**self.special_tokens, "tools": None, "documents": None, **extra}
        try:
            return _compiled(self.template).render(
                messages=_template_messages(messages),
                add_generation_prompt=add_generation_prompt, **names)
        except _Raised as e:
            raise ChatError("messages", e.message) from None
        except (jinja2.exceptions.TemplateError, TypeError) as e:
            raise ChatError("messages", f"the model's chat template cannot render these "
                            f"messages: {e}") from None

    def eos_id(self, tokenizer) -> int | None:
        """The id of `eos_token` in lm's `tokenizer` (a chat model's end of turn, such as
        Llama 3's <|eot_id|>, which may differ from the tokenizer's end-of-document id), None
        where it is unset or not one token there (the byte tokenizer has no such tokens)."""
        inner = getattr(tokenizer, "tokenizer", None)
        if self.eos_token is None or not hasattr(inner, "token_to_id"):
            return None
        return inner.token_to_id(self.eos_token)

    def hf_tokenizer_config(self) -> dict:
        """The keys of a Hugging Face tokenizer_config.json that carry this template."""
        return {"chat_template": self.template, **self.special_tokens}

    def save(self, directory: str) -> None:
        """Writes DIRECTORY/chat_template.jinja and the special-token strings into
        DIRECTORY/tokenizer_config.json (merged into one that is there: its other keys kept)."""
        os.makedirs(directory, exist_ok=True)
        _write(os.path.join(directory, CHAT_TEMPLATE_FILE), self.template)
        config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        config = _read_json(config_path) if os.path.exists(config_path) else {}
        config = {k: v for k, v in config.items() if k != "chat_template"}
        _write(config_path, json.dumps(config | self.special_tokens, indent=1,
                                       ensure_ascii=False))

    @classmethod
    def from_directory(cls, directory: str) -> ChatTemplate | None:
        """The template stored in DIRECTORY (an lm workdir or a Hugging Face model directory,
        layout in the module docstring), or None where it holds none. A malformed file is a
        ValueError saying which."""
        config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        config = _read_json(config_path) if os.path.exists(config_path) else {}
        template = _stored_template(directory, config)
        if template is None:
            return None
        tokens = _token_strings(config)
        legacy = os.path.join(directory, SPECIAL_TOKENS_MAP_FILE)
        if "added_tokens_decoder" not in config and os.path.exists(legacy):
            tokens |= _token_strings(_read_json(legacy))
        bos, eos = tokens.pop("bos_token", None), tokens.pop("eos_token", None)
        return cls("checkpoint", template, bos, eos, (), tokens)

    @classmethod
    def for_checkpoint(cls, path: str) -> ChatTemplate:
        """The template stored with the checkpoint PATH names (a workdir, its checkpoints/
        directory, one step directory, an `lm.convert from-hf` output; another directory, such
        as an lm.export output, is read itself), else `default_template()`."""
        return cls.from_directory(template_directory(path)) or default_template()


def default_template() -> ChatTemplate:
    """lm's chat layout, for checkpoints without a template of their own (lm's tokenizers have
    no chat special tokens): plain text in ChatML's layout. Each message is written as

        <|im_start|>ROLE\\nCONTENT<|im_end|>\\n

    (ROLE is system, user, assistant or tool; the markers are ordinary text, encoded as lm's
    tokenizer encodes any text), and the generation prompt `<|im_start|>assistant\\n` follows.
    No bos or eos token is written. [{"role": "user", "content": "Hello"}, {"role":
    "assistant", "content": "Hi!"}] renders, with the generation prompt, as

        <|im_start|>user\\nHello<|im_end|>\\n<|im_start|>assistant\\nHi!<|im_end|>\\n
        <|im_start|>assistant\\n

    (one string, no line break between the two lines shown). Its `stop` is ("<|im_end|>",
    "<|im_start|>"): the reply ends where the model closes its turn or opens the next one (the
    stop string itself is not returned)."""
    return ChatTemplate("default", DEFAULT_TEMPLATE, stop=DEFAULT_STOP)


def template_directory(path: str) -> str:
    """Where the template of PATH's model is stored: the workdir of the checkpoint PATH names,
    as lm.checkpoint resolves it; PATH itself where it holds no checkpoint."""
    from lm.checkpoint import step_dirs  # orbax is slow to import
    from lm.config import ConfigError

    try:
        dirs, _ = step_dirs(path)
    except ConfigError:
        return os.path.abspath(path)
    return os.path.dirname(os.path.dirname(dirs[0]))


def encode_chat(tokenizer, text: str) -> list[int]:
    """The ids of rendered chat text: lm's `tokenizer.encode`, which adds no special tokens (the
    template wrote them; transformers' apply_chat_template(tokenize=True) encodes the same)."""
    return [int(i) for i in np.asarray(tokenizer.encode(text)).reshape(-1)]


# ---------------------------------------------------------------------------------------------
# Files


def _stored_template(directory: str, config: dict) -> str | None:
    """DIRECTORY/chat_template.jinja, else tokenizer_config.json's chat_template (a string, or
    a list of {"name", "template"}: the one named "default"), else None."""
    path = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    stored = config.get("chat_template")
    if stored is None or isinstance(stored, str):
        return stored
    if isinstance(stored, list):
        with contextlib.suppress(AttributeError, KeyError, TypeError):
            named = {t["name"]: t["template"] for t in stored}
            if "default" not in named:
                raise ValueError(f"{os.path.join(directory, TOKENIZER_CONFIG_FILE)}: none of "
                                 f"its chat templates {sorted(named)} is named 'default'")
            return named["default"]
    raise ValueError(f"{os.path.join(directory, TOKENIZER_CONFIG_FILE)}: chat_template must be "
                     "a string or a list of {\"name\": ..., \"template\": ...}")


def _token_strings(config: dict) -> dict[str, str]:
    """The special-token strings of a tokenizer_config.json / special_tokens_map.json: every
    `*_token` key (and the names of an `extra_special_tokens` object) whose value is a string
    or an AddedToken object ({"content": ...}), as transformers' special_tokens_map holds."""
    entries = {k: v for k, v in config.items() if k.endswith("_token")}
    if isinstance(config.get("extra_special_tokens"), dict):
        entries |= config["extra_special_tokens"]
    out = {}
    for name, value in entries.items():
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _write(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file: never a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
