"""One sequence being generated: its tokens, its place in the KV cache and its progress."""
from __future__ import annotations

import enum
import itertools
from typing import Any

from fp8_turbo.engine.sampling.params import SamplingParams
from fp8_turbo.engine.sampling.structured import GrammarMatcher

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token state of one completion. A request with n > 1 owns n sequences.

    The cache holds the first `num_computed_tokens` of `all_token_ids`; the scheduler computes the
    rest. That single counter covers prefill, chunked prefill, decode (one uncomputed token: the one
    just sampled), prefix-cache hits and recomputation after preemption.
    """

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        # A seeded request's sequence i draws with key seed + i (fp8_turbo/engine/sampling/philox.py).
        self.seed = params.seed + index if params.seed is not None else None
        self.grammar: GrammarMatcher | None = None  # structured outputs: advanced by every kept token
        self.draft_state: Any = None  # speculative decoding's per-sequence DraftState (core/spec_decode.py)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache on first schedule
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None  # why it ended, when finish_reason is "error"
        self.logprobs: list[dict] = []  # one dict per output token, when params.logprobs is set
        self.prompt_logprobs: list[dict | None] = []  # one entry per prompt token, first is None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (the decode step reads one token)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, status={self.status.value})")
