"""Structured outputs: a grammar per request that decides which tokens may come next (llguidance).

llguidance, not xgrammar (bench/grammar_libraries.py, SmolLM2's vocabulary): its masks cost more
(~30-70 us per row against ~3-10 us), well inside the budget of a decode step, but it compiles a
schema to its first mask in 1-6 ms (xgrammar 2-35 ms), imports in milliseconds with no dependencies,
and refuses the JSON Schema keywords it cannot enforce ("Unimplemented keys: [\"not\"]") where
xgrammar ignores them, so an accepted schema is one every finished output satisfies.

- `StructuredOutputs`, one per engine: the llguidance tokenizer over the model's vocabulary (built on
  first use, ~1 s), and `compile(params)` -> `Grammar`, cached by the spec text (LRU). An invalid or
  unsupported spec raises `GrammarError` naming the field and the problem.
- `Grammar.matcher()` -> `GrammarMatcher`, one per sequence: `accept(token)` on every token the
  sequence keeps; `finished` once nothing but EOS may follow; `close()` when the sequence ends.
  For speculative decoding: `forced_tokens()` (jump-forward drafts), `valid_prefix(drafts)`, and
  `fork(token)`, a copy one draft ahead whose mask verifies the next position.
- `fill_bitmask(matchers)` then `apply_bitmask(logits, positions, bitmask)` in the sampler: one
  bitmask row per constrained row (llguidance's executor fills them in parallel), added to those
  rows only as 0 / -inf.

The engine's stop tokens are llguidance's EOS: the mask allows them only where the grammar may end.
llguidance is imported on the first request that asks for structure, so the engine runs without it.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch

from fp8_turbo.engine.sampling.params import StructuredOutputsParams

# JSON in one line, with the separators models write (and json.dumps): no free whitespace, which
# small models can fill forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 256  # compiled grammars kept (each holds a template matcher)


class GrammarError(ValueError):
    """A structured-output spec that cannot be compiled; `detail` is the library's message."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field, self.detail = field, detail


class GrammarMatcher:
    """Where one sequence stands in its grammar."""

    __slots__ = ("_matcher", "_owner")

    def __init__(self, matcher: Any, owner: "StructuredOutputs"):
        self._matcher, self._owner = matcher, owner
        owner.num_matchers += 1

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False if the grammar does not allow it (the matcher is then dead)."""
        return self._matcher.consume_token(token_id)

    def forced_tokens(self) -> list[int]:
        """The tokens the grammar forces next (llguidance's fast-forward tokens: a tokenization of the
        bytes every continuation starts with); [] when the next token is free. Changes nothing."""
        return self._matcher.compute_ff_tokens()

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many of `token_ids`, in order, the grammar allows from here. Changes nothing."""
        return self._matcher.validate_tokens(token_ids)

    def fork(self, token_id: int) -> "GrammarMatcher":
        """A copy advanced by one token the grammar allows (speculative decoding's state after a
        draft); this matcher does not move. Close the copy when done."""
        copy = GrammarMatcher(self._matcher.deep_copy(), self._owner)
        if not copy.accept(token_id):
            error = copy.error
            copy.close()
            raise ValueError(f"the grammar does not allow token {token_id} here: {error}")
        return copy

    @property
    def finished(self) -> bool:
        """Nothing but EOS may follow (the output is complete), or the matcher failed."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    def close(self) -> None:
        if self._matcher is not None:
            self._matcher = None
            self._owner.num_matchers -= 1


class Grammar:
    """A compiled spec: a template matcher in the start state, copied for each sequence."""

    def __init__(self, key: tuple[str, str], template: Any, owner: "StructuredOutputs"):
        self.key, self._template, self._owner = key, template, owner

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy(), self._owner)


class StructuredOutputs:
    """Grammars for one model's vocabulary: compile (cached), then one matcher per sequence.

    hf_tokenizer: a transformers fast tokenizer; vocab_size: the width of the model's logits (may
    exceed the tokenizer's); stop_token_ids: the tokens that end a sequence (EOS, end of turn).
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._llg: Any = None
        self._tokenizer: Any = None
        self.executor: Any = None
        self._cache: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.num_matchers = 0  # live GrammarMatchers: every sequence's is closed when it ends
        self.num_compiled = 0  # grammars compiled (cache misses)

    def compile(self, params: StructuredOutputsParams) -> Grammar:
        with self._lock:
            grammar = self._cache.get(params.key)
            if grammar is not None:
                self._cache.move_to_end(params.key)
                return grammar
            self._load()
            grammar = Grammar(params.key, self._template(params), self)
            self.num_compiled += 1
            self._cache[params.key] = grammar
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return grammar

    def _load(self) -> None:
        if self._tokenizer is not None:
            return
        try:
            import llguidance
            import llguidance.hf
        except ImportError:
            raise GrammarError("structured_outputs", "structured outputs need the llguidance package "
                                          "(pip install llguidance)") from None
        try:
            tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                     eos_token=self.stop_token_ids)
        except (ValueError, TypeError) as e:
            raise GrammarError("structured_outputs", f"this model's tokenizer cannot drive a grammar: {e}") from None
        self._llg, self._tokenizer, self.executor = llguidance, tokenizer, llguidance.LLExecutor()

    def _template(self, params: StructuredOutputsParams) -> Any:
        llg, (kind, text) = self._llg, params.key
        field, M = f"structured_outputs.{kind}", llg.LLMatcher
        try:
            if kind == "json":
                spec = M.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
            elif kind == "json_object":
                spec = M.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
            elif kind == "regex":
                spec = M.grammar_from_regex(text)
            else:  # choice (a JSON list) or grammar (Lark, or GBNF converted to Lark)
                spec = llg.grammar_from(kind, text)
        except ValueError as e:
            raise GrammarError(field, str(e)) from None
        failed, messages = M.validate_grammar_with_warnings(spec, self._tokenizer)
        if failed:
            raise GrammarError(field, messages[0].strip())
        template = M(self._tokenizer, spec, log_level=0)
        if template.is_error():
            raise GrammarError(field, template.get_error())
        return template


def json_sequence_grammar(item_schema: dict, separator: str) -> str:
    """A grammar (Lark) for one or more JSON values of `item_schema` separated by `separator`,
    written like JSON_OPTIONS; for StructuredOutputsParams(grammar=...)."""
    schema = {**item_schema, "x-guidance": JSON_OPTIONS}
    return f"start: item ({json.dumps(separator)} item)*\nitem: %json {json.dumps(schema)}\n"


# ----------------------------------------------------------------------------- the mask in the sampler
_BYTE_MASKS: dict[torch.device, torch.Tensor] = {}


def _byte_masks(device: torch.device) -> torch.Tensor:
    """[256, 8] float32: for each byte of a bitmask, 0 for its set bits and -inf for the others
    (bit j of byte b of row word w is token 32 w + 8 b + j: little-endian words)."""
    if device not in _BYTE_MASKS:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _BYTE_MASKS[device] = torch.where(bits == 1, 0.0, float("-inf")).to(device)
    return _BYTE_MASKS[device]


def fill_bitmask(matchers: list[GrammarMatcher]) -> torch.Tensor:
    """[C, ceil(V / 32)] int32 on the CPU: row i has bit t set where matchers[i] allows token t."""
    owner = matchers[0]._owner
    words = (owner.vocab_size + 31) // 32
    bitmask = torch.empty((len(matchers), words), dtype=torch.int32)
    owner.executor.unsafe_compute_mask_ptr([(m._matcher, i) for i, m in enumerate(matchers)],
                                           bitmask.data_ptr(), words * 4, len(matchers))
    return bitmask


def apply_bitmask(logits: torch.Tensor, positions: list[int], bitmask: torch.Tensor) -> None:
    """Set the logits of the tokens `bitmask` [C, W] forbids to -inf, in the C rows at `positions` only.

    Written as an addition of a 0 / -inf row (read from a byte table) because on the CPU that is
    several times faster than masked_fill with a bool mask; it changes nothing else in the row.
    """
    rows, vocab = len(positions), logits.shape[1]
    assert bitmask.shape[0] == rows and 32 * bitmask.shape[1] >= vocab, (tuple(bitmask.shape), rows, vocab)
    byte_index = bitmask.view(torch.uint8).to(logits.device).view(-1).int()
    additive = _byte_masks(logits.device).index_select(0, byte_index).view(rows, -1)[:, :vocab]
    if rows == logits.shape[0]:
        logits.add_(additive)
    else:
        logits.index_add_(0, torch.tensor(positions, device=logits.device), additive)
