"""Structured outputs: a grammar per request that decides which tokens may come next (llguidance).

llguidance, not xgrammar (bench/grammar_libraries.py, SmolLM2's vocabulary): its masks cost more
(~30-70 us per row against ~3-10 us), well inside the budget of a decode step, but it compiles a
schema to its first mask in 1-6 ms (xgrammar 2-35 ms), imports in milliseconds with no dependencies,
and refuses the JSON Schema keywords it cannot enforce ("Unimplemented keys: [\"not\"]") where
xgrammar ignores them, so an accepted schema is one every finished output satisfies.

- `StructuredOutputs`, one per engine: the llguidance tokenizer over the model's vocabulary (built on
  first use, ~1 s), and `compile(params)` -> `Grammar`, cached by the spec text (grammar_cache.py:
  LRU, bounded in entries and in bytes, built on a thread with a deep stack). `compile` also
  computes the grammar's first mask, so a grammar past the engine's limits there (a 2,500-item
  `choice`, `a{1000000}`) is refused at once. An invalid, unsupported or too long spec raises
  `GrammarError` naming the field and the problem; the params keep the compiled grammar, so a
  request never compiles twice.
- `Grammar.matcher()` -> `GrammarMatcher`, one per sequence: `accept(token)` on every token the
  sequence keeps (False once the grammar fails: a limit reached later, at a step; the engine then
  ends that sequence with finish_reason "error" and `error`); `finished` once nothing but EOS may
  follow; `close()` when the sequence ends.
  For speculative decoding: `forced_tokens()` (jump-forward drafts), `valid_prefix(drafts)`, and
  `fork(token)`, a copy one draft ahead whose mask verifies the next position.
- `fill_bitmask(matchers)` then `apply_bitmask(logits, positions, bitmask)` in the sampler: one
  bitmask row per constrained row (llguidance's executor fills them in parallel), added to those
  rows only as 0 / -inf.

Errors carry llguidance's message without its state dump and grammar (`verbose_errors` off; a log
line holds the message and at most `EXCERPT_CHARS` of the grammar). The lexer states a grammar
builds while generating (shared by its matchers, ~560 bytes each on SmolLM2's vocabulary) are
capped at MAX_LEXER_STATES per grammar (realistic schemas, Lark and regexes use well under 1,000
over thousands of random steps); a grammar that reaches the cap fails that sequence and leaves the
cache, so a rebuilt copy starts small.

The engine's stop tokens are llguidance's EOS: the mask allows them only where the grammar may end.
llguidance is imported on the first request that asks for structure, so the engine runs without it.
"""
from __future__ import annotations

import json
import threading
from typing import Any

import torch

from fp8_turbo.engine.sampling.grammar_cache import GrammarCache, GrammarThread, allocated_bytes, grammar_bytes
from fp8_turbo.engine.sampling.params import StructuredOutputsParams

# JSON in one line, with the separators models write (and json.dumps): no free whitespace, which
# small models can fill forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
DEFAULT_CACHE_BYTES = 64 << 20  # compiled grammars kept, by their measured size (grammar_cache.py) ...
DEFAULT_CACHE_ENTRIES = 256  # ... and by count
DEFAULT_MAX_GRAMMAR_CHARS = 256 << 10  # longest grammar text (a schema as JSON, a regex, Lark, choices as JSON)
MAX_LEXER_STATES = 20_000  # per grammar: ~11 MB at most (llguidance's default, 250,000, is ~140 MB)
ERROR_LINES, ERROR_LINE_CHARS = 5, 110  # of an llguidance error message (a regex error quotes the regex)
EXCERPT_CHARS = 120  # of a grammar, in a log line
_PROBE_FORCED_TOKENS = 256  # forced tokens the compile-time probe follows


def short_error(message: str) -> str:
    """llguidance's message without a state dump: at most ERROR_LINES lines (the first one and those that
    say "error" first: a regex error quotes the regex and the grammar line) of at most ERROR_LINE_CHARS."""
    lines = [line.rstrip() for line in message.split("<state>", 1)[0].strip().splitlines()
             if line.strip() and line.strip() != "<non-verbose/>"]  # (llguidance's mark of verbose_errors off)
    order = sorted(range(len(lines)), key=lambda i: (i > 0, "error" not in lines[i].lower(), i))
    keep = sorted(order[:ERROR_LINES])
    return "\n".join(line if len(line) <= ERROR_LINE_CHARS else line[:ERROR_LINE_CHARS - 3] + "..."
                     for line in (lines[i] for i in keep))


def _matcher_error(m: Any) -> str:
    """Why an llguidance matcher failed or stopped short, or "" while it is fine."""
    if m.is_error():
        error = short_error(m.get_error()) or str(m.stop_reason())
        if error.startswith("NoExtension"):  # llguidance's word for a dead end
            error += ": no token can continue the output, and it is incomplete"
        return error
    if m.is_stopped() and not m.is_accepting():
        return f"nothing may follow, and the output is incomplete ({m.stop_reason()})"
    return ""


def excerpt(text: str) -> str:
    """A grammar's text for a log line: its start, and its length when cut."""
    if len(text) <= EXCERPT_CHARS:
        return repr(text)
    return f"{text[:EXCERPT_CHARS]!r}... ({len(text)} characters)"


class GrammarError(ValueError):
    """A structured-output spec that cannot be compiled; `detail` is the library's message."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field, self.detail = field, detail


class GrammarMatcher:
    """Where one sequence stands in its grammar."""

    __slots__ = ("_matcher", "_owner", "grammar")

    def __init__(self, matcher: Any, owner: "StructuredOutputs", grammar: "Grammar | None" = None):
        self._matcher, self._owner, self.grammar = matcher, owner, grammar
        owner.num_matchers += 1

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False if the grammar does not allow it or failed (a limit reached at this
        step or when its mask was computed, or a dead end: nothing may follow and the output is incomplete,
        where llguidance's mask allowed only EOS): the matcher is then dead, and `error` says why."""
        m = self._matcher
        if not m.is_error() and m.consume_token(token_id) and not m.is_error() \
                and not (m.is_stopped() and not m.is_accepting()):
            return True
        if self.grammar is not None:  # its shared lexer may be at a limit: the next request builds afresh
            self._owner.forget(self.grammar)
        return False

    def forced_tokens(self) -> list[int]:
        """The tokens the grammar forces next (llguidance's fast-forward tokens: a tokenization of the
        bytes every continuation starts with); [] when the next token is free. Changes nothing."""
        return self._matcher.compute_ff_tokens()

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many of `token_ids`, in order, the grammar allows from here. Changes nothing."""
        return self._matcher.validate_tokens(token_ids)

    def fork(self, token_id: int) -> "GrammarMatcher | None":
        """A copy advanced by one token (speculative decoding's state after a draft); this matcher does
        not move. None when the grammar refuses the token or fails on it (as `accept` would: a sequence
        that keeps that token ends there). Close the copy when done."""
        copy = GrammarMatcher(self._matcher.deep_copy(), self._owner, self.grammar)
        if not copy.accept(token_id):
            copy.close()
            return None
        return copy

    @property
    def finished(self) -> bool:
        """Nothing but EOS may follow (the output is complete), or the matcher failed."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        """Why the matcher failed (short_error), or ""."""
        return _matcher_error(self._matcher)

    def close(self) -> None:
        if self._matcher is not None:
            self._matcher = None
            self._owner.num_matchers -= 1


class Grammar:
    """A compiled spec: a template matcher in the start state, copied for each sequence; `nbytes` is
    what it counts for in the cache."""

    def __init__(self, key: tuple[str, str], template: Any, owner: "StructuredOutputs", nbytes: int = 0):
        self.key, self._template, self._owner, self.nbytes = key, template, owner, nbytes

    @property
    def excerpt(self) -> str:
        return f"{self.key[0]} {excerpt(self.key[1])}"

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy(), self._owner, self)


class StructuredOutputs:
    """Grammars for one model's vocabulary: compile (cached), then one matcher per sequence.

    hf_tokenizer: a transformers fast tokenizer; vocab_size: the width of the model's logits (may
    exceed the tokenizer's); stop_token_ids: the tokens that end a sequence (EOS, end of turn).
    cache_bytes / cache_entries bound the compiled grammars kept; max_grammar_chars the text of one;
    max_lexer_states the lexer states one grammar may build.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int], *,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, cache_entries: int = DEFAULT_CACHE_ENTRIES,
                 max_grammar_chars: int = DEFAULT_MAX_GRAMMAR_CHARS, max_lexer_states: int = MAX_LEXER_STATES):
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._llg: Any = None
        self._tokenizer: Any = None
        self._limits: Any = None
        self.executor: Any = None
        self.cache = GrammarCache(cache_bytes, cache_entries)
        self.max_grammar_chars = max_grammar_chars
        self.max_lexer_states = max_lexer_states
        self._lock = threading.Lock()
        self._thread = GrammarThread()
        self.num_matchers = 0  # live GrammarMatchers: every sequence's is closed when it ends
        self.num_compiled = 0  # grammars compiled (cache misses)
        self.compiled_bytes = 0  # what they measured, together (GrammarCache.nbytes is what is kept)

    def set_limits(self, *, cache_bytes: int | None = None, cache_entries: int | None = None,
                   max_grammar_chars: int | None = None) -> None:
        """Change the bounds (a server's flags); the cache shrinks at once if it must."""
        with self._lock:
            if cache_bytes is not None:
                self.cache.max_bytes = cache_bytes
            if cache_entries is not None:
                self.cache.max_entries = cache_entries
            if max_grammar_chars is not None:
                self.max_grammar_chars = max_grammar_chars
            self.cache.shrink()

    def compile(self, params: StructuredOutputsParams) -> Grammar:
        """The compiled grammar of `params` (kept on them, and in the cache), or GrammarError."""
        grammar = params.compiled
        if isinstance(grammar, Grammar) and grammar._owner is self:
            return grammar
        with self._lock:
            grammar = self.cache.get(params.key)
        if grammar is None:
            kind, text = params.key
            if len(text) > self.max_grammar_chars:
                raise GrammarError(f"structured_outputs.{kind}", f"the grammar's text has {len(text)} characters; "
                                                                 f"the limit is {self.max_grammar_chars}")
            self._load()
            grammar = self._thread.run(self._build, params)
        params.compiled = grammar
        return grammar

    def forget(self, grammar: Grammar) -> None:
        """Drop `grammar` from the cache (live matchers keep working)."""
        with self._lock:
            if self.cache.get(grammar.key) is grammar:
                self.cache.discard(grammar.key)

    def _build(self, params: StructuredOutputsParams) -> Grammar:
        """On the grammar thread, one build at a time: compile, compute the first mask, measure, cache."""
        with self._lock:
            grammar = self.cache.get(params.key)  # built meanwhile, for another request
        if grammar is not None:
            return grammar
        before = allocated_bytes() if allocated_bytes is not None else None
        template = self._template(params)
        measured = allocated_bytes() - before if before is not None else None
        grammar = Grammar(params.key, template, self, grammar_bytes(measured, len(params.key[1])))
        with self._lock:
            self.num_compiled += 1
            self.compiled_bytes += grammar.nbytes
            self.cache.put(params.key, grammar, grammar.nbytes)  # (not kept when larger than the whole cache)
        return grammar

    def _load(self) -> None:
        with self._lock:
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
            self._limits = llguidance.LLParserLimits(max_lexer_states=self.max_lexer_states, verbose_errors=False)
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
            raise GrammarError(field, short_error(str(e))) from None
        failed, messages = M.validate_grammar_with_warnings(spec, self._tokenizer, limits=self._limits)
        if failed:
            raise GrammarError(field, short_error(messages[0]))
        template = M(self._tokenizer, spec, log_level=0, limits=self._limits)
        if template.is_error():
            raise GrammarError(field, short_error(template.get_error()))
        self._probe(template, field)
        return template

    def _probe(self, template: Any, field: str) -> None:
        """On a copy: compute the first mask, take one token it allows and the tokens then forced, and
        compute the next mask. That start is the same for every sequence, so a grammar that fails there
        (past llguidance's limits: a 2,500-item choice, a 3,000-way Lark rule, `a{1000000}`; or a dead
        end: a `$ref` to itself with nothing else) is a GrammarError now, not a failed sequence later."""
        probe = template.deep_copy()
        mask = probe.compute_bitmask()
        token = None if probe.is_error() else _first_allowed(mask, set(self.stop_token_ids))
        if token is not None and probe.consume_token(token):
            forced = probe.compute_ff_tokens()[:_PROBE_FORCED_TOKENS]
            if forced and probe.consume_tokens(forced):
                probe.compute_bitmask()
        error = _matcher_error(probe)
        if error:
            raise GrammarError(field, f"the grammar engine fails at the first token: {error}")


def _first_allowed(mask: bytes, skip: set[int]) -> int | None:
    """The smallest token id a bitmask allows (bit j of byte i is token 8 i + j) that is not in `skip`."""
    for i, byte in enumerate(mask):
        while byte:
            low = byte & -byte
            token = 8 * i + low.bit_length() - 1
            if token not in skip:
                return token
            byte ^= low
    return None


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
