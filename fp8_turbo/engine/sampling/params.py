"""Per-request sampling options, with vLLM's names and the ranges of the served API (seed-api.txt)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_SEED_LIMIT = 2**63
_GREEDY_BELOW = 1e-5  # temperatures this small sample the argmax anyway (vLLM's _SAMPLING_EPS)


def _check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in {left}{lo}, {hi}{right}, got {value!r}")
    above_lo = value > lo if lo_open else value >= lo
    below_hi = value < hi if hi_open else value <= hi
    if not (above_lo and below_hi):  # written so that NaN fails too
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(slots=True)
class StructuredOutputsParams:
    """A constraint on what a request may generate (vLLM's names); set exactly one field.

    json: a JSON Schema (dict, or its text); json_object: any JSON object; regex: the whole output
    matches it; choice: the output is one of these strings; grammar: a context-free grammar in Lark
    or GBNF (llama.cpp's EBNF) syntax. JSON is written in one line with ", " and ": " separators.
    Enforced by fp8_turbo/engine/sampling/structured.py (llguidance), which is imported on first use.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # Derived in __post_init__: (kind, text), what a compiled grammar is cached under.
    key: tuple[str, str] = field(init=False, repr=False, compare=False)
    # Set by StructuredOutputs.compile: the compiled grammar, so a request holding these params never
    # compiles twice (its grammar may have left the cache between the server's check and the engine).
    compiled: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kinds = [k for k in _STRUCTURE_KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(_STRUCTURE_KINDS)}; "
                             f"got {', '.join(kinds) or 'none'}")
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise ValueError(f"structured_outputs.json must be a JSON Schema object, got {self.json!r:.80}")
        elif self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs.json must be a JSON Schema (dict or str), got {self.json!r:.80}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r:.80}")
        if self.choice is not None:
            if (isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r:.80}")
            self.choice = list(self.choice)
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")
        self.key = (kinds[0], _spec_text(kinds[0], getattr(self, kinds[0])))

    @property
    def kind(self) -> str:
        """Which field is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return self.key[0]


def _spec_text(kind: str, value: Any) -> str:
    if kind == "json":
        schema = json.loads(value) if isinstance(value, str) else value
        try:
            return json.dumps(schema, ensure_ascii=False)  # key order kept: it is the output's order
        except (TypeError, ValueError) as e:
            raise ValueError(f"structured_outputs.json is not JSON-serializable: {e}") from None
    if kind == "choice":
        return json.dumps(value, ensure_ascii=False)
    return "" if kind == "json_object" else value


_STRUCTURE_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(slots=True)
class SamplingParams:
    """How to pick the next tokens of one request.

    The order in which the sampler applies these is written down in `fp8_turbo/engine/sampling/sampler.py`.
    `logprobs` are computed from the model's raw logits (before penalties, temperature and
    truncation), the same convention as vLLM.
    """

    n: int = 1
    temperature: float = 1.0  # 0 (anything below 1e-5) = greedy
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0  # 0 (or -1, vLLM's spelling) = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # number of alternatives besides the sampled token, 0-20
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output must follow
    # Derived in __post_init__.
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        if self.top_k == -1:
            self.top_k = 0
        if not _is_int(self.top_k) or not 0 <= self.top_k < 1000:
            raise ValueError(f"top_k must be an integer in [0, 1000) (0 = off), got {self.top_k!r}")
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("repetition_penalty", self.repetition_penalty, 0.01, 5.0)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < _SEED_LIMIT):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or not 0 <= self.max_tokens <= 1_000_000):
            raise ValueError(f"max_tokens must be an integer in [0, 1000000], got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= 20):
                raise ValueError(f"{name} must be an integer in [0, 20], got {value!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_strings = [s for s in (self.stop or []) if s]
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        for token in self.stop_token_ids:
            if not _is_int(token) or token < 0:
                raise ValueError(f"stop_token_ids must hold token ids >= 0, got {token!r}")
        if self.logit_bias:
            for token, bias in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
                _check_range(f"logit_bias[{token}]", bias, -100.0, 100.0)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, "
                             f"got {type(self.structured_outputs).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_BELOW
