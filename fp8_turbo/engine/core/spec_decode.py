"""Speculative decoding that never changes an output token: drafts from the sequence itself (prompt
lookup: n-gram matches in the prompt and the text so far) and from its grammar (llguidance's forced
tokens: jump-forward), verified in the same forward as the rest of the step.

Why it is exact. A decoding sequence with drafts d_0..d_{k-1} computes 1 + k tokens in one step (its
last token, then the drafts) as a chunked-prefill row and asks for logits at all 1 + k positions. Our
kernels give a row the same bits whatever the batch and however a sequence is chunked, so row j holds
exactly the logits that sequential decoding would compute after accepting d_0..d_{j-1}. The sampler
then draws at every position with the state sequential decoding would have there (penalties over the
tokens before it, the grammar advanced by them, min_tokens; a seeded draw keyed by (seed, position),
fp8_turbo/engine/sampling/philox.py; an unseeded one fresh from the shared generator). Accepting a
draft is an equality check: token j is kept, and the next position considered, while it equals
d_j; the first token that differs (or the one after the last draft) is kept too and ends the run.
Every kept token is the token sequential decoding draws at its position, logprobs included; an
unseeded sequence gets a fresh draw at each position, so its distribution is unchanged.

The engine (llm_engine.py) asks `Drafter.propose` for drafts while scheduling (scheduler.py), builds
one sampling row per verified position (`verification_rows`), keeps tokens as above and reports how
many drafts matched (`Drafter.observe`); the block manager then gives back the blocks that held only
rejected tokens (`BlockManager.trim`). N-gram drafting adapts per sequence: after a verification
that kept none of its n-gram drafts, it pauses for 2, 4, ... 32 steps; the n-gram draft length grows
by one after a fully accepted run and drops to one more than the accepted count after a partial one.
Grammar-forced drafts (all but certain) are always proposed, as many as the step's budget, the
context and max_tokens leave (not capped by num_speculative_tokens: a JSON key with its quotes and
colon is one verification, however many tokens it has); n-gram drafts may follow them, up to
num_speculative_tokens more.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from fp8_turbo.engine.core.sequence import Sequence
from fp8_turbo.engine.sampling.sampler import SamplingRow
from fp8_turbo.engine.sampling.structured import GrammarMatcher

METHODS = ("ngram",)
_MAX_PAUSE = 32  # longest pause of n-gram drafting after repeated fully rejected drafts (steps)


@dataclass(slots=True)
class SpeculativeConfig:
    """vLLM's names: `{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
    "prompt_lookup_min": 2}`. jump_forward (ours): draft a structured output's grammar-forced tokens."""

    method: str = "ngram"
    num_speculative_tokens: int = 3  # most drafts verified per sequence per step
    prompt_lookup_max: int = 4  # longest n-gram matched against the sequence's earlier tokens
    prompt_lookup_min: int = 2  # shortest
    jump_forward: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {self.method!r}")
        for name, lo in (("num_speculative_tokens", 1), ("prompt_lookup_max", 1), ("prompt_lookup_min", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= 64:
                raise ValueError(f"speculative_config.{name} must be an integer in [{lo}, 64], got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if not isinstance(self.jump_forward, bool):
            raise ValueError(f"speculative_config.jump_forward must be true or false, got {self.jump_forward!r}")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        """A config from a dict, its JSON text (the CLI's --speculative-config) or None (off)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict (or its JSON), got {type(value).__name__}")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**value)


@dataclass(slots=True)
class DraftState:
    """Per sequence: its tokens as a numpy array (appended to, for the n-gram search) and the
    adaptive draft length and pause."""

    tokens: np.ndarray = field(default_factory=lambda: np.empty(256, dtype=np.int64))
    length: int = 0
    max_drafts: int = 1 << 30  # current cap on n-gram drafts (lowered after partial acceptance)
    misses: int = 0  # consecutive verifications that kept no n-gram draft
    pause: int = 0  # steps left without n-gram drafts
    forced: int = 0  # how many of the last proposal's drafts were grammar-forced (they come first)

    def sync(self, seq: Sequence) -> np.ndarray:
        """The sequence's tokens so far, [num_tokens] (a view)."""
        n = seq.num_tokens
        if n > self.length:
            if n > len(self.tokens):
                grown = np.empty(max(n, 2 * len(self.tokens)), dtype=np.int64)
                grown[:self.length] = self.tokens[:self.length]
                self.tokens = grown
            self.tokens[self.length:n] = seq.token_slice(self.length, n)
            self.length = n
        return self.tokens[:n]


def ngram_continuation(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """Prompt lookup: for n from n_max down to n_min, find the latest earlier occurrence of the last n
    tokens; the (up to k) tokens that followed it are the drafts. [] when nothing matches."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n:]
        # starts i < length - n: the occurrence ends before the suffix's last token, so at least one
        # token follows it
        hits = np.flatnonzero(tokens[:length - n] == suffix[0])
        for j in range(1, n):
            if not hits.size:
                break
            hits = hits[tokens[hits + j] == suffix[j]]
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


class Drafter:
    """Proposes drafts for decoding sequences and keeps the acceptance statistics."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.num_drafts = 0  # verifications with at least one draft
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_forced_tokens = 0  # drafts that came from a grammar's forced tokens
        self.accepted_per_position = [0] * config.num_speculative_tokens  # draft j accepted, per j

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def propose(self, seq: Sequence, room: int) -> list[int]:
        """Drafts to verify after `seq`'s last token (which is not computed yet), at most `room`."""
        config, params = self.config, seq.params
        state = seq.draft_state
        if state is None:
            state = seq.draft_state = DraftState(max_drafts=config.num_speculative_tokens)
        limit = min(room, self.max_model_len - 1 - seq.num_tokens)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens - len(seq.output_token_ids) - 1)
        state.forced = 0
        if limit <= 0:
            return []
        drafts: list[int] = []
        grammar = seq.grammar
        if grammar is not None and config.jump_forward:
            drafts = grammar.forced_tokens()[:limit]  # all but certain: not held back by any cap
        forced = len(drafts)
        ngram_limit = min(limit - forced, config.num_speculative_tokens, state.max_drafts)
        if ngram_limit > 0:
            if state.pause > 0:
                state.pause -= 1
            else:
                tokens = state.sync(seq)
                if drafts:
                    tokens = np.concatenate([tokens, np.asarray(drafts, dtype=np.int64)])
                drafts += ngram_continuation(tokens, config.prompt_lookup_min, config.prompt_lookup_max, ngram_limit)
        if grammar is not None and len(drafts) > forced:
            drafts = drafts[:grammar.valid_prefix(drafts)]  # a draft the grammar forbids cannot be accepted
        state.forced = min(forced, len(drafts))
        self.num_forced_tokens += state.forced
        return drafts

    def observe(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """After verifying `drafted` drafts of `seq`, of which the first `accepted` were kept. The
        back-off follows the n-gram drafts only (those after the grammar-forced ones)."""
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        if accepted > len(self.accepted_per_position):  # a run of grammar-forced drafts past the n-gram cap
            self.accepted_per_position += [0] * (accepted - len(self.accepted_per_position))
        for j in range(accepted):
            self.accepted_per_position[j] += 1
        state = seq.draft_state
        if state is None:  # the sequence finished
            return
        forced = min(state.forced, drafted)
        drafted, accepted = drafted - forced, accepted - forced
        if drafted <= 0 or accepted < 0:  # no n-gram draft, or one was never reached
            return
        if accepted == drafted:
            state.max_drafts = min(self.config.num_speculative_tokens, state.max_drafts + 1)
        else:
            state.max_drafts = accepted + 1
        if accepted == 0:
            state.misses += 1
            state.pause = min(1 << state.misses, _MAX_PAUSE)
        else:
            state.misses = 0


def verification_rows(seq: Sequence, drafts: list[int], eos_token_ids: list[int]) -> tuple[list[SamplingRow], list[GrammarMatcher]]:
    """The sampling rows of one sequence's step: row j draws the token at the position after draft
    j - 1 (row 0 after the sequence's last token), with the state sequential decoding would have
    there: the drafts before it count as generated tokens, and a grammar is a copy advanced by them.
    Returns the rows and the grammar copies (close them after sampling). Should the grammar fail on a
    draft (a limit reached), keeping that draft ends the sequence (`accept` fails the same way), so
    the rows after it are never used: they go unconstrained."""
    rows = [SamplingRow(seq.params, seq.prompt_token_ids, seq.output_token_ids, seq.seed, eos_token_ids, seq.grammar)]
    forks: list[GrammarMatcher] = []
    grammar = seq.grammar
    for j, token in enumerate(drafts):
        if grammar is not None:
            grammar = grammar.fork(token)
            if grammar is not None:
                forks.append(grammar)
        rows.append(SamplingRow(seq.params, seq.prompt_token_ids, seq.output_token_ids + drafts[:j + 1], seq.seed,
                                eos_token_ids, grammar))
    return rows, forks
