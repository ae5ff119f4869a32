"""Tokenizer loading (tokenizer.json or GGUF), incremental detokenization, chat templates, tool calls.

    tok = load_tokenizer(path)                      # HF checkpoint dir or .gguf file
    ids = tok.apply_chat_template(messages, tools)  # the model's own Jinja template
    det = IncrementalDetokenizer(tok, ids)
    for t in generated: print(det.add(t), end="")
    print(det.flush())
    calls = parse_tool_calls(det.text)              # list[ToolCall] or None (plain content)
"""
from tokenizer.detokenizer import IncrementalDetokenizer
from tokenizer.loader import load_tokenizer
from tokenizer.tokenizer import Tokenizer
from tokenizer.tool_calls import ToolCall, parse_tool_calls

__all__ = ["IncrementalDetokenizer", "Tokenizer", "ToolCall", "load_tokenizer", "parse_tool_calls"]
