"""`IncrementalDetokenizer`: streaming text deltas from generated token ids.

Decoding one token at a time is wrong twice over: a character may be split across tokens (byte-level
pieces of an emoji, sentencepiece byte-fallback tokens), and some decoders change a token's text by
its position (a leading space stripped from the first token). So each step decodes a short window of
recent tokens twice -- up to the last emitted token (`prefix`) and up to the new one -- and emits the
difference, holding it back while the text ends in U+FFFD (an incomplete character). A window always
starts where earlier text ended on a complete character, so windows decode like the whole sequence
does, and the deltas concatenate to `tok.decode(output_ids)`.

Byte-fallback tokens need one more rule: tokenizers' ByteFallback decoder turns a whole run of byte
tokens into U+FFFDs when any of it is invalid, so "<0x0A>" (a newline) followed by a stray "<0x80>"
decodes to two U+FFFD. Text is therefore also held while the last token is a byte token.
"""
from __future__ import annotations

from collections.abc import Sequence

from fp8_turbo.tokenizer.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed generated ids with `add`; call `flush` once the sequence ends.

    `prompt_token_ids` is accepted for vLLM-style call sites; deltas cover the output only, so that
    the concatenation of all deltas plus `flush()` equals `tok.decode(output_ids)`.
    """

    def __init__(self, tok: Tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tok = tok
        self.prompt_token_ids = list(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []  # output ids so far
        self.text = ""  # everything emitted so far
        self._prefix_offset = 0  # window start: a position where emitted text ended on a whole character
        self._read_offset = 0  # tokens before this are emitted
        self._byte_ids = tok.byte_fallback_ids

    def add(self, token_id: int) -> str:
        """Append one generated token; return the new text it completes ("" while a character is partial)."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self.token_ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT) or token_id in self._byte_ids:
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The text still held back at the end of the sequence (U+FFFD for an unfinished character)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self.token_ids))
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tok.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)
