"""`lm.chat`: chat templates rendered as `transformers`' apply_chat_template renders them,
OpenAI-style message validation, and templates carried through `lm.convert` (tokenizers and a
tiny random Llama built and saved locally: no downloads)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from lm.chat import (DEFAULT_STOP, ChatError, ChatTemplate, default_template, encode_chat,
                     validate_messages)
from lm.data import tokenizer as lm_tokenizer

transformers = pytest.importorskip("transformers")

# Three templates in the styles of the Hub's: Llama 3 (bos, header tokens, trimmed content),
# ChatML as Qwen writes it (a default system message, tools through tojson) and Mistral
# (the system message folded into the first [INST], raise_exception on alternation errors).
LLAMA3 = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {{- message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n")
CHATML = (
    "{%- if tools is not none %}\n"
    "<|im_start|>system\n"
    "Tools:\n"
    "{% for tool in tools %}\n"
    "{{ tool | tojson }}\n"
    "{% endfor %}\n"
    "<|im_end|>\n"
    "{% elif messages[0]['role'] != 'system' %}\n"
    "<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n"
    "{% endif %}\n"
    "{% set ns = namespace(turns=0) %}\n"
    "{% for message in messages %}\n"
    "    {% if message['role'] == 'user' %}{% set ns.turns = ns.turns + 1 %}{% endif %}\n"
    "<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "<|im_start|>assistant\n"
    "{% endif %}")
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n")

# style -> (template, special tokens of the vocabulary, tokenizer_config.json's token keys)
STYLES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "chatml": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "mistral": (MISTRAL, ["<unk>", "<s>", "</s>"],
                {"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False,
                               "normalized": False, "rstrip": False, "single_word": False},
                 "eos_token": "</s>", "unk_token": "<unk>"}),
}

CONVERSATIONS = {
    "one-user": [{"role": "user", "content": "Hello there"}],
    "system-multi-turn": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "  What is 2+2? "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nThanks — ünïcødé 東京"}],
    "text-parts": [
        {"role": "user", "content": [{"type": "text", "text": "First part."},
                                     {"type": "text", "text": "Second part."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Got both."}]},
        {"role": "user", "content": "Good."}],
}


def chat_tokenizer(specials: list[str], bos: str | None = None):
    """A byte-level BPE without merges (every text encodes) plus `specials` as added special
    tokens; with `bos`, a post-processor that prepends it, as Llama tokenizers do."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {c: i for i, c in enumerate(sorted(byte_level.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = byte_level, decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def save_chat_tokenizer(directory, style: str, form: str = "key") -> str:
    """DIRECTORY as a Hugging Face tokenizer of `style` (STYLES), its template stored as
    tokenizer_config.json's chat_template string (form "key"), as a list of named templates
    ("list"), or as chat_template.jinja ("jinja")."""
    template, specials, tokens = STYLES[style]
    os.makedirs(directory, exist_ok=True)
    bos = tokens["bos_token"] if style == "llama3" else None
    chat_tokenizer(specials, bos).save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64, **tokens}
    if form == "key":
        config["chat_template"] = template
    elif form == "list":
        config["chat_template"] = [{"name": "tool_use", "template": "{{ 'unused' }}"},
                                   {"name": "default", "template": template}]
    else:
        with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return str(directory)


def make_chat_llama(directory) -> str:
    """A tiny random LlamaForCausalLM with a Llama-3-style tokenizer and chat template, saved
    in DIRECTORY as Hugging Face saves a model (config.json, model.safetensors,
    generation_config.json, tokenizer.json, tokenizer_config.json with chat_template, bos_token
    <|begin_of_text|> and eos_token <|eot_id|>); returns DIRECTORY. lm's tokenizer of its
    conversion has eod <|end_of_text|>; a chat turn ends with <|eot_id|> (config.json's
    eos_token_id)."""
    import torch
    save_chat_tokenizer(directory, "llama3")
    tok = lm_tokenizer.BPETokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    inner = tok.tokenizer
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=160, vocab_size=tok.vocab_size, max_position_embeddings=256,
        rope_theta=5000.0, rms_norm_eps=1e-5, bos_token_id=inner.token_to_id("<|begin_of_text|>"),
        eos_token_id=inner.token_to_id("<|eot_id|>"), pad_token_id=tok.eod_id)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """style -> a Hugging Face tokenizer directory of that style."""
    root = tmp_path_factory.mktemp("chat")
    return {style: save_chat_tokenizer(root / style, style) for style in STYLES}


def hf_tokenizer(directory):
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def hf_text(directory, messages, add_generation_prompt=True, **extra) -> str:
    return hf_tokenizer(directory).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)


def hf_ids(directory, messages, add_generation_prompt=True) -> list[int]:
    return list(hf_tokenizer(directory).apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt))


# ---------------------------------------------------------------------------------------------
# Rendering as transformers does


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["prompt", "no-prompt"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("style", list(STYLES))
def test_render_matches_apply_chat_template(hf_dirs, style, conversation,
                                            add_generation_prompt):
    messages = validate_messages(CONVERSATIONS[conversation])
    template = ChatTemplate.from_directory(hf_dirs[style])
    assert template.source == "checkpoint" and template.stop == ()
    ours = template.render(messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf_text(hf_dirs[style], messages, add_generation_prompt)
    # The encoding contract: lm's tokenizer encodes it to apply_chat_template(tokenize=True)'s
    # ids (the template's bos once: the post-processor's is not added).
    tok = lm_tokenizer.BPETokenizer.from_file(os.path.join(hf_dirs[style], "tokenizer.json"))
    ids = encode_chat(tok, ours)
    assert ids == hf_ids(hf_dirs[style], messages, add_generation_prompt)
    if style == "llama3":
        assert ids.count(tok.tokenizer.token_to_id("<|begin_of_text|>")) == 1


def test_special_tokens_and_eos_id(hf_dirs):
    llama, chatml, mistral = (ChatTemplate.from_directory(hf_dirs[s]) for s in STYLES)
    assert (llama.bos_token, llama.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert chatml.bos_token is None and chatml.extra_tokens == {"pad_token": "<|endoftext|>"}
    assert mistral.special_tokens == {"unk_token": "<unk>", "bos_token": "<s>",
                                      "eos_token": "</s>"}
    for style, template in zip(STYLES, (llama, chatml, mistral)):
        assert template.special_tokens == hf_tokenizer(hf_dirs[style]).special_tokens_map
    tok = lm_tokenizer.BPETokenizer.from_file(os.path.join(hf_dirs["llama3"], "tokenizer.json"))
    assert llama.eos_id(tok) == tok.tokenizer.token_to_id("<|eot_id|>") != tok.eod_id
    assert default_template().eos_id(tok) is None
    assert llama.eos_id(lm_tokenizer.ByteTokenizer()) is None


def test_raise_exception_becomes_a_chat_error(hf_dirs):
    bad = validate_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    template = ChatTemplate.from_directory(hf_dirs["mistral"])
    with pytest.raises(ChatError, match="roles must alternate") as caught:
        template.render(bad)
    assert caught.value.param == "messages" and isinstance(caught.value, ValueError)
    with pytest.raises(Exception, match="roles must alternate"):  # transformers refuses too
        hf_text(hf_dirs["mistral"], bad)
    with pytest.raises(ChatError, match="Only user and assistant"):
        template.render(validate_messages([{"role": "user", "content": "a"},
                                           {"role": "tool", "content": "x",
                                            "tool_call_id": "c1"}]))


def test_tools_tojson_and_extra_names_match(hf_dirs):
    tools = [{"type": "function", "function": {"name": "f", "description": "héllo <b>&",
                                               "parameters": {"type": "object"}}}]
    messages = validate_messages(CONVERSATIONS["one-user"])
    template = ChatTemplate.from_directory(hf_dirs["chatml"])
    ours = template.render(messages, tools=tools)
    assert ours == hf_text(hf_dirs["chatml"], messages, tools=tools)
    assert '"description": "héllo <b>&"' in ours  # json.dumps: no HTML escaping, no \\u


@pytest.mark.parametrize("source", [
    "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}"
    "{% if loop.index == 2 %}{% break %}{% endif %}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "{{ ns.n }} {{ dict(a=1) | tojson }} {{ messages | tojson(indent=1) }} {{ strftime_now('%Y') }}"
    " {{ messages[0] | tojson(sort_keys=True, separators=(',', ':')) }}",
    "{% for m in messages %}{{ m.role }}:{{ m.reasoning_content }}|{{ m.thinking }}"
    "|{{ m.missing }}{% endfor %}",
], ids=["generation-break", "namespace-dict-tojson", "reasoning-and-undefined"])
def test_the_environment_matches_transformers(hf_dirs, source):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                                   "reasoning": "r", "name": None},
                {"role": "user", "content": "c"}]
    ours = ChatTemplate("checkpoint", source).render(messages, add_generation_prompt=False)
    assert ours == hf_text(hf_dirs["chatml"], messages, False, chat_template=source)


def test_a_namespace_refuses_underscore_names():
    template = ChatTemplate("checkpoint", "{% set ns = namespace(_x=1) %}{{ ns._x }}")
    with pytest.raises(ChatError, match="underscore"):
        template.render([{"role": "user", "content": "a"}])


def test_a_broken_template_is_an_error_when_loaded():
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("checkpoint", "{% for m in messages %}")
    with pytest.raises(ValueError, match="source"):
        ChatTemplate("hub", "{{ 1 }}")


@pytest.mark.parametrize("form", ["list", "jinja"])
def test_the_other_storage_forms(tmp_path, form):
    directory = save_chat_tokenizer(tmp_path / "hf", "llama3", form)
    messages = validate_messages(CONVERSATIONS["system-multi-turn"])
    assert ChatTemplate.from_directory(directory).render(messages) == hf_text(directory,
                                                                              messages)


def test_chat_template_jinja_wins_and_special_tokens_map_fills_in(tmp_path):
    directory = save_chat_tokenizer(tmp_path / "hf", "mistral", "key")
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write("{{ bos_token }}|{{ eos_token }}|{{ messages[0].content }}")
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = json.load(open(config_path))
    del config["bos_token"]
    json.dump(config, open(config_path, "w"))
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": {"content": "<s>", "lstrip": False, "normalized": False,
                                 "rstrip": False, "single_word": False}}, f)
    messages = validate_messages(CONVERSATIONS["one-user"])
    ours = ChatTemplate.from_directory(directory).render(messages)
    assert ours == "<s>|</s>|Hello there" == hf_text(directory, messages)


def test_malformed_stored_templates_are_errors(tmp_path):
    tmp_path.joinpath("tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"}]}))
    with pytest.raises(ValueError, match="named 'default'"):
        ChatTemplate.from_directory(str(tmp_path))
    tmp_path.joinpath("tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ValueError, match="must be a string"):
        ChatTemplate.from_directory(str(tmp_path))
    tmp_path.joinpath("tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        ChatTemplate.from_directory(str(tmp_path))
    tmp_path.joinpath("tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert ChatTemplate.from_directory(str(tmp_path)) is None


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("messages, param, match", [
    ("hello", "messages", "must be a list"),
    ({"role": "user", "content": "x"}, "messages", "must be a list"),
    ([], "messages", "at least one"),
    (["hello"], "messages[0]", "must be an object"),
    ([{"content": "x"}], "messages[0].role", "has no role.*'system', 'user'"),
    ([{"role": "user", "content": "x"}, {"role": "robot", "content": "x"}], "messages[1].role",
     "must be one of 'system', 'user', 'assistant', 'tool', 'developer', got 'robot'"),
    ([{"role": "user"}], "messages[0].content", "must be a string or a non-empty list"),
    ([{"role": "user", "content": 5}], "messages[0].content", "got a number"),
    ([{"role": "user", "content": []}], "messages[0].content", "non-empty list"),
    ([{"role": "user", "content": {"type": "text", "text": "x"}}], "messages[0].content",
     "got an object"),
    ([{"role": "user", "content": ["x"]}], "messages[0].content[0]", "got a string"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"},
                                   {"type": "image_url", "image_url": {"url": "u"}}]}],
     "messages[0].content[1].type", "must be 'text'.*got 'image_url'"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text",
     "must be a string, got null"),
    ([{"role": "user", "content": "x", "name": 3}], "messages[0].name", "must be a string"),
    ([{"role": "tool", "content": "42"}], "messages[0].tool_call_id", "needs the tool_call_id"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls",
     "only an assistant message has one"),
    ([{"role": "assistant", "content": None}], "messages[0].content", "got null"),
], ids=["string", "object", "empty", "non-object", "no-role", "unknown-role", "no-content",
        "number-content", "empty-parts", "object-content", "string-part", "image-part",
        "part-without-text", "bad-name", "tool-without-id", "tool-calls-of-user",
        "null-content"])
def test_validate_messages_rejects(messages, param, match):
    with pytest.raises(ChatError, match=match) as caught:
        validate_messages(messages)
    assert caught.value.param == param


def test_validate_messages_normalizes():
    call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert validate_messages([
        {"role": "developer", "content": "Be brief.", "extra": 1},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
         "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": call},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]) == [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": "a\nb", "name": "ann"},
           {"role": "assistant", "tool_calls": call},
           {"role": "tool", "content": "42", "tool_call_id": "c1"}]


# ---------------------------------------------------------------------------------------------
# The default template and checkpoints


def test_the_default_template_is_the_documented_text():
    template = default_template()
    assert template.source == "default" and template.stop == DEFAULT_STOP
    assert template.bos_token is None and template.eos_token is None
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]
    assert template.render(messages) == ("<|im_start|>user\nHello<|im_end|>\n"
                                         "<|im_start|>assistant\nHi!<|im_end|>\n"
                                         "<|im_start|>assistant\n")
    assert template.render(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n")
    assert DEFAULT_STOP == ("<|im_end|>", "<|im_start|>")
    text = template.render(messages)  # plain text: the byte tokenizer encodes it as bytes
    assert encode_chat(lm_tokenizer.ByteTokenizer(), text) == list(text.encode())


def test_a_checkpoint_without_a_template_gets_the_default(tmp_path):
    os.makedirs(tmp_path / "run" / "checkpoints" / "3" / "state")
    for path in ("run", "run/checkpoints", "run/checkpoints/3"):
        assert ChatTemplate.for_checkpoint(str(tmp_path / path)) == default_template()
    # A directory that holds no checkpoint (an lm.export output) is read itself.
    os.makedirs(tmp_path / "export")
    assert ChatTemplate.for_checkpoint(str(tmp_path / "export")) == default_template()
    saved = ChatTemplate("checkpoint", "{{ messages[0].content }}{{ eos_token }}",
                         eos_token="</s>", extra_tokens={"pad_token": "<pad>"})
    saved.save(str(tmp_path / "export"))
    assert ChatTemplate.for_checkpoint(str(tmp_path / "export")) == saved


def test_from_hf_carries_the_template_and_to_hf_writes_it_back(tmp_path):
    hf_dir = make_chat_llama(tmp_path / "hf")
    out = tmp_path / "lm"
    proc = subprocess.run([sys.executable, "-m", "lm.convert", "from-hf", hf_dir, str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "with its chat template" in proc.stdout
    assert (out / "chat_template.jinja").read_text() == LLAMA3
    assert json.loads((out / "tokenizer_config.json").read_text()) == {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    tok = lm_tokenizer.from_workdir(str(out))
    for conversation in CONVERSATIONS.values():
        messages = validate_messages(conversation)
        for path in (out, out / "checkpoints", out / "checkpoints" / "0"):
            template = ChatTemplate.for_checkpoint(str(path))
            assert template.render(messages) == hf_text(hf_dir, messages)
        assert encode_chat(tok, template.render(messages)) == hf_ids(hf_dir, messages)

    from lm.convert import to_hf
    back = tmp_path / "back"
    to_hf(str(out), str(back))
    assert (back / "chat_template.jinja").read_text() == LLAMA3
    assert json.loads((back / "tokenizer_config.json").read_text())["chat_template"] == LLAMA3
    for conversation in CONVERSATIONS.values():
        messages = validate_messages(conversation)
        for prompt in (True, False):
            assert hf_text(back, messages, prompt) == hf_text(hf_dir, messages, prompt)
            assert hf_ids(back, messages, prompt) == hf_ids(hf_dir, messages, prompt)
    exported = hf_tokenizer(back)
    assert (exported.bos_token, exported.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
