"""`Tokenizer`: a transformers tokenizer plus what the engine needs around it.

Special-token ids, stop tokens, one-token text for logprobs, and chat rendering that validates
messages and makes tools and tool calls reach the model even through a template that ignores them.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from fp8_turbo.tokenizer.chat_template import (
    LLAMA3_CHAT_TEMPLATE,
    add_tools_system_prompt,
    inline_tool_calls,
    normalize_messages,
    normalize_tools,
)

# Llama 3's end-of-turn and end-of-message (after a tool call) tokens: generation stops at both.
LLAMA3_STOP_TOKENS = ("<|eot_id|>", "<|eom_id|>")

# A name no template would print unless it renders the tools / tool calls it is given.
_PROBE = "fp8_turbo_probe_7f3a"


class Tokenizer:
    """Wraps a transformers tokenizer (`.hf`) loaded by `load_tokenizer`.

    The chat template is the model's own (`hf.chat_template`); when it ships none, the built-in
    Llama 3.x template is used. `extra_eos_ids` / `extra_stop_ids` come from generation_config.json
    or GGUF metadata.
    """

    def __init__(
        self,
        hf: PreTrainedTokenizerBase,
        extra_eos_ids: Sequence[int] = (),
        extra_stop_ids: Sequence[int] = (),
    ):
        self.hf = hf
        self.bos_token_id: int | None = hf.bos_token_id
        eos = [hf.eos_token_id] if hf.eos_token_id is not None else []
        self.eos_token_ids: list[int] = list(dict.fromkeys([*eos, *extra_eos_ids]))
        vocab = hf.get_vocab()
        llama3_stops = [vocab[t] for t in LLAMA3_STOP_TOKENS if t in vocab]
        self.stop_token_ids: set[int] = {*self.eos_token_ids, *extra_stop_ids, *llama3_stops}
        self.vocab_size: int = len(hf)
        self._token_text: dict[int, str] = {}

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_ids={self.eos_token_ids}, stop_token_ids={sorted(self.stop_token_ids)})")

    # ---- text <-> ids ----
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS is added exactly when the model's tokenizer adds it."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, exactly as the tokenizer spells it (no clean-up of spaces before punctuation)."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        """The decoded text of one token, special tokens included (U+FFFD for a lone piece of a character).

        Ids past the vocabulary (padding rows of a model's embedding) have no text: "".
        """
        text = self._token_text.get(token_id)
        if text is None:
            if token_id < 0:
                raise ValueError(f"token_id must be >= 0, got {token_id}")
            text = self.decode([token_id], skip_special_tokens=False) if token_id < self.vocab_size else ""
            self._token_text[token_id] = text
        return text

    # ---- chat ----
    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text the model's chat template makes of `messages` (OpenAI form) and `tools`.

        Raises ValueError for malformed messages or tools (naming the index and field), and for
        conversations the template itself rejects (its `raise_exception`, or a rendering error).
        """
        normalized = normalize_messages(messages)
        tool_defs = normalize_tools(tools) or None
        if any(m.get("tool_calls") for m in normalized) and not self._template_renders_tool_calls:
            normalized = inline_tool_calls(normalized)
        if tool_defs and not self._template_renders_tools:
            normalized = add_tools_system_prompt(normalized, tool_defs)
            tool_defs = None
        try:
            return self._render(normalized, tool_defs, add_generation_prompt, **template_kwargs)
        except TemplateError as e:
            raise ValueError(f"the chat template cannot render these messages: {e}") from e

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered prompt. The template writes BOS itself, so none is added here."""
        text = self.render_chat(messages, tools, add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                add_generation_prompt: bool, **template_kwargs: Any) -> str:
        return self.hf.apply_chat_template(
            messages,
            tools=tools,
            chat_template=None if self.hf.chat_template else LLAMA3_CHAT_TEMPLATE,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **template_kwargs,
        )

    @cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of sentencepiece byte-fallback tokens (<0x00>..<0xFF>); empty for byte-level BPE."""
        model = self.hf.backend_tokenizer.model
        if not getattr(model, "byte_fallback", False):
            return frozenset()
        vocab = self.hf.get_vocab()
        return frozenset(vocab[t] for t in (f"<0x{b:02X}>" for b in range(256)) if t in vocab)

    @cached_property
    def _template_renders_tools(self) -> bool:
        tool = {"type": "function", "function": {"name": _PROBE, "description": "", "parameters": {}}}
        return self._probe([{"role": "user", "content": "hi"}], [tool])

    @cached_property
    def _template_renders_tool_calls(self) -> bool:
        call = {"id": "call_0", "type": "function", "function": {"name": _PROBE, "arguments": {}}}
        messages = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": json.dumps({"ok": True})},
        ]
        return self._probe(messages, None)

    def _probe(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
        """Whether the template prints the probe name; a template that fails here is left to itself."""
        try:
            return _PROBE in self._render(messages, tools, add_generation_prompt=True)
        except (TemplateError, TypeError, ValueError):
            return True
