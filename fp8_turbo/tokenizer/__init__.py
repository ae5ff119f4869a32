"""Tokenizer loading (tokenizer.json or GGUF), incremental detokenization, chat templates, tool calls.

    tok = load_tokenizer(path)                      # HF checkpoint dir or .gguf file
    ids = tok.apply_chat_template(messages, tools)  # the model's own Jinja template
    det = IncrementalDetokenizer(tok, ids)
    for t in generated: print(det.add(t), end="")
    print(det.flush())
    calls = parse_tool_calls(det.text)              # list[ToolCall] or None (plain content)
"""
from fp8_turbo.tokenizer.detokenizer import IncrementalDetokenizer
from fp8_turbo.tokenizer.loader import load_tokenizer
from fp8_turbo.tokenizer.tokenizer import Tokenizer
from fp8_turbo.tokenizer.tool_calls import ToolCall, parse_tool_calls

__all__ = ["IncrementalDetokenizer", "Tokenizer", "ToolCall", "load_tokenizer", "parse_tool_calls"]
