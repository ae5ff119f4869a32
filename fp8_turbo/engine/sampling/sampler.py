"""The sampler: one step's logits -> one token per sequence, for a batch whose rows all differ.

What happens to a row's logits, in this order (each step acts on the result of the one before):
  0. structured outputs: tokens the row's grammar forbids get -inf (only rows with a grammar pay;
     see fp8_turbo/engine/sampling/structured.py).
  1. logit_bias is added; while fewer than `min_tokens` tokens were generated, the row's stop ids
     (`params.stop_token_ids`, plus its EOS ids unless `ignore_eos`) are masked to -inf.
  2. repetition_penalty, over prompt and generated tokens: a seen token's logit is divided by the
     penalty when positive and multiplied by it when negative (transformers' and vLLM's definition).
  3. frequency and presence penalties, over generated tokens only (OpenAI's definition):
     logit - count * frequency_penalty - (count > 0) * presence_penalty.
  4. Greedy rows (temperature 0) take the argmax here.
  5. temperature: logits / temperature.
  6. top_k keeps the k most likely tokens; then top_p keeps the smallest set of most likely tokens
     whose probability reaches top_p (never empty: the most likely token always stays); then min_p
     drops the tokens less likely than min_p times the most likely one.
  7. The draw: inverse-CDF sampling from uniform numbers (a fixed count per row). A seeded row's
     numbers are a function of (seed, position of the token drawn) only (Philox, see
     fp8_turbo/engine/sampling/philox.py), so a seeded request gets the same tokens whatever else is
     in the batch and however many of its positions are sampled in one step (speculative decoding
     verifies several); rows without a seed share the sampler's generator.

Logprobs are computed from the raw logits (log_softmax of the model's output, before any step
above), the same convention as vLLM.

Batching: rows are grouped by the work they need (greedy; top_k; top_p without top_k; neither) and
each group is handled with tensor operations over its rows; a row never pays for a step it does not
use, and nothing sorts the vocabulary: top_k rows take their best k (torch.topk) and temperature is
applied to those k only; top_p rows use sorting-free rejection sampling (see `sample_vocabulary` in fp8_turbo/engine/sampling/ops.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fp8_turbo.engine.sampling.ops import (
    argmax_of_rows,
    candidate_weights,
    count_above,
    sample_top_k,
    sample_vocabulary,
    top_k_of_rows,
)
from fp8_turbo.engine.sampling.params import SamplingParams
from fp8_turbo.engine.sampling.philox import seeded_uniforms
from fp8_turbo.engine.sampling.structured import GrammarMatcher, apply_bitmask, fill_bitmask

_TOP_K_WIDTHS = (64, 256, 1000)  # top_k rows are grouped by the smallest of these that holds their k
_RANK_WINDOW = 20  # compute_logprobs counts exactly only for tokens outside a row's best 20
_NUCLEUS_TRIES = 16  # rejection tries for a top_p row before the exact sorted path (each succeeds w.p. >= top_p)


@dataclass(slots=True)
class SamplingRow:
    """One sequence that needs a token this step: the token at `position`, after these tokens."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    seed: int | None = None  # the sequence's seed (request seed + sequence index); None: the shared generator
    eos_token_ids: Sequence[int] = ()  # the model's EOS ids, masked with stop_token_ids during min_tokens
    grammar: GrammarMatcher | None = None  # the row's structured-output matcher

    @property
    def position(self) -> int:
        """Where the drawn token goes in the sequence (what a seeded draw is keyed by)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def min_tokens_blocked_ids(self) -> list[int]:
        """Token ids that may not be drawn yet because fewer than min_tokens were generated.

        None once the row's grammar is complete: the grammar decides where a structured output ends.
        """
        if len(self.output_token_ids) >= self.params.min_tokens:
            return []
        if self.grammar is not None and self.grammar.finished:
            return []
        blocked = list(self.params.stop_token_ids or [])
        if not self.params.ignore_eos:
            blocked += self.eos_token_ids
        return blocked


@dataclass(slots=True)
class TokenLogprobs:
    """Logprobs of one sampled token, from the raw logits. rank 1 = the most likely token."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]  # the `params.logprobs` most likely tokens, most likely first
    top_logprobs: list[float]


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, on the logits' device
    logprobs: list[TokenLogprobs | None]  # per row; None where params.logprobs is None


def row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row of fp32 `logits` [B, V] -> [B, 1], a row's value independent of the other
    rows and of the thread count. On the CPU each row is reduced on its own in one order (numpy's
    pairwise sum, one thread): torch's CPU logsumexp splits a row across threads when the batch is
    small, so with 2 threads a row's logprob changed in its last bit between a batch of 1 and of 4
    (and speculative verification, which computes several positions of a sequence at once, then
    differed from decoding them one by one)."""
    if logits.device.type != "cpu":
        return logits.logsumexp(dim=-1, keepdim=True)
    x = logits.detach().contiguous().numpy()
    m = x.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, np.float32(0.0))  # a row of -inf (or +inf) keeps torch's answer below
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        z = np.log(np.exp(x - m).sum(axis=1, keepdims=True)) + m
    out = torch.from_numpy(z)
    bad = ~np.isfinite(x.max(axis=1))  # -inf / +inf / nan rows: torch's conventions
    if bad.any():
        rows = torch.from_numpy(np.nonzero(bad)[0])
        out[rows] = logits[rows].logsumexp(dim=-1, keepdim=True)
    return out


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax facts of `token_ids` under `logits` [B, V] (pass raw logits: vLLM's convention).

    Returns (token_logprob [B], token_rank [B] with 1 = most likely, top_ids [B, num_top],
    top_logprobs [B, num_top]). Also used by the engine for prompt_logprobs.
    """
    logits = logits.float()
    log_z = row_logsumexp(logits)  # [B, 1]
    token_logits = logits.gather(1, token_ids.view(-1, 1))  # [B, 1]
    # The rank is decided on the logits themselves (log_softmax only shifts a row): 1 + the number
    # of larger ones. A token among a row's best _RANK_WINDOW has all of those before it in the list.
    window = min(max(num_top, _RANK_WINDOW), logits.shape[1])
    top_logits, top_ids = top_k_of_rows(logits, window)
    in_window = (top_ids == token_ids.view(-1, 1)).any(dim=-1)
    token_rank = (top_logits > token_logits).sum(dim=-1) + 1
    if not bool(in_window.all()):  # one host sync; the full count only when some token ranks lower
        token_rank = torch.where(in_window, token_rank, count_above(logits, token_logits).long() + 1)
    top_logits, top_ids = top_logits[:, :num_top], top_ids[:, :num_top]
    return (token_logits - log_z).squeeze(1), token_rank, top_ids, top_logits - log_z


# ----------------------------------------------------------------------------- logits processing
# These act in place on rows of `logits` [B, V] and touch only the entries they change.


def apply_logit_bias_and_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    vocab_size = logits.shape[1]
    flat = logits.view(-1)
    bias_at, bias = [], []
    blocked_at = []
    for i, row in enumerate(rows):
        for token, value in (row.params.logit_bias or {}).items():
            _check_token(token, vocab_size, "logit_bias")
            bias_at.append(i * vocab_size + token)
            bias.append(value)
        for token in row.min_tokens_blocked_ids():
            _check_token(token, vocab_size, "stop_token_ids")
            blocked_at.append(i * vocab_size + token)
    if bias_at:
        index = torch.tensor(bias_at, device=logits.device)
        flat.index_add_(0, index, torch.tensor(bias, dtype=logits.dtype, device=logits.device))
    if blocked_at:
        flat.index_fill_(0, torch.tensor(blocked_at, device=logits.device), float("-inf"))


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Repetition penalty (prompt + output), then presence and frequency penalties (output only).

    Token lists are used as they are, repeats included: a repeated index in a write gets the same
    value every time, and frequency counts come from index_add_ adding once per occurrence.
    """
    vocab_size, device = logits.shape[1], logits.device
    flat = logits.view(-1)

    def column(name: str) -> torch.Tensor:  # [B] one parameter of every row
        return torch.tensor([getattr(row.params, name) for row in rows], device=device)

    repeat_rows = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if repeat_rows:
        seen = _flat_token_ids(rows, repeat_rows, vocab_size, with_prompt=True).to(device)
        penalty = column("repetition_penalty")[seen // vocab_size]
        logit = flat[seen]
        flat[seen] = torch.where(logit > 0, logit / penalty, logit * penalty)

    counted_rows = [
        i for i, row in enumerate(rows)
        if (row.params.frequency_penalty != 0.0 or row.params.presence_penalty != 0.0) and row.output_token_ids
    ]
    if counted_rows:
        generated = _flat_token_ids(rows, counted_rows, vocab_size, with_prompt=False).to(device)
        row_of = generated // vocab_size
        flat[generated] = flat[generated] - column("presence_penalty")[row_of]  # once per distinct token
        flat.index_add_(0, generated, -column("frequency_penalty")[row_of])  # once per occurrence


def _flat_token_ids(rows: Sequence[SamplingRow], positions: list[int], vocab_size: int, *,
                    with_prompt: bool) -> torch.Tensor:
    """The generated (and prompt) token ids of the rows at `positions` as row * vocab_size + token.

    Built in numpy: converting Python lists is ~3x faster there than with torch.as_tensor.
    """
    parts = []
    for i in positions:
        lists = (rows[i].prompt_token_ids, rows[i].output_token_ids) if with_prompt else (rows[i].output_token_ids,)
        parts += [np.asarray(ids, dtype=np.int64) + i * vocab_size for ids in lists]
    return torch.from_numpy(np.concatenate(parts))


def _check_token(token: int, vocab_size: int, field: str) -> None:
    if not 0 <= token < vocab_size:
        raise ValueError(f"{field}: token id {token} is outside the vocabulary [0, {vocab_size})")


def processed_probs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The distribution each row's token is drawn from, dense [B, V]; one-hot for greedy rows.

    Steps 1-6 written plainly, with a full sort; the Sampler draws from the same distribution
    without building it. Leaves `logits` unchanged.
    """
    x = logits.float().clone()
    constrained = [i for i, row in enumerate(rows) if row.grammar is not None]
    if constrained:
        apply_bitmask(x, constrained, fill_bitmask([rows[i].grammar for i in constrained]))
    apply_logit_bias_and_min_tokens(x, rows)
    apply_penalties(x, rows)
    device = x.device
    greedy = torch.tensor([row.params.greedy for row in rows], device=device)
    temperature = torch.tensor([1.0 if row.params.greedy else row.params.temperature for row in rows], device=device)
    sorted_x, order = x.sort(dim=-1, descending=True)
    weights = candidate_weights(
        ((sorted_x - sorted_x[:, :1]) / temperature[:, None]).exp(),
        torch.tensor([row.params.top_k for row in rows], device=device),
        torch.tensor([row.params.top_p for row in rows], device=device),
        torch.tensor([row.params.min_p for row in rows], device=device),
    )
    probs = torch.zeros_like(x).scatter_(1, order, weights)
    probs /= probs.sum(dim=-1, keepdim=True)
    one_hot = torch.zeros_like(x).scatter_(1, x.max(dim=-1, keepdim=True).indices, 1.0)
    return torch.where(greedy[:, None], one_hot, probs)


# ----------------------------------------------------------------------------- the sampler


class Sampler:
    """Call once per step with the logits of every sequence that needs a token.

    `logits` [B, V] (float32; other dtypes are upcast) are used as scratch space and overwritten,
    as vLLM's sampler does. Rows without a seed share this sampler's generator, seeded from `seed`
    (None: a random seed).
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def shared_generator(self, device: torch.device) -> torch.Generator:
        """The generator of requests without a seed (one per device)."""
        if device not in self._generators:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._generators[device] = generator
        return self._generators[device]

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        logits = logits.float().contiguous()
        device = logits.device
        # 0, first half: the grammars' masks, filled on the CPU before anything here waits for the
        # device (so on a GPU this overlaps the forward pass); only rows with a grammar pay.
        constrained = [i for i, row in enumerate(rows) if row.grammar is not None]
        bitmask = fill_bitmask([rows[i].grammar for i in constrained]) if constrained else None

        want_logprobs = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        raw_logits = None  # a copy of the rows that want logprobs, before anything changes them
        if want_logprobs:
            raw_logits = logits.clone() if len(want_logprobs) == len(rows) else _rows(logits, want_logprobs)

        # 0, second half: applied after the raw copy (logprobs stay the model's).
        if bitmask is not None:
            apply_bitmask(logits, constrained, bitmask)
        # 1-3: sparse edits, only where some row asks for them.
        if any(row.params.logit_bias or row.min_tokens_blocked_ids() for row in rows):
            apply_logit_bias_and_min_tokens(logits, rows)
        if any(_has_penalty(row.params) for row in rows):
            apply_penalties(logits, rows)

        # 4: greedy.
        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        if len(greedy) == len(rows):
            token_ids = argmax_of_rows(logits)
        else:
            token_ids = torch.empty(len(rows), dtype=torch.long, device=device)
        if greedy and len(greedy) < len(rows):
            token_ids[_index(greedy, device)] = argmax_of_rows(_rows(logits, greedy))
        # 5-7: the rest.
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            self._sample(logits, rows, sampled, token_ids)

        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        if want_logprobs:
            num_top = max(rows[i].params.logprobs for i in want_logprobs)
            chosen = token_ids[_index(want_logprobs, device)]
            facts = compute_logprobs(raw_logits, chosen, num_top)
            chosen_lp, rank, top_ids, top_lp = (t.tolist() for t in facts)  # one sync per batch
            chosen_ids = chosen.tolist()
            for j, i in enumerate(want_logprobs):
                k = rows[i].params.logprobs
                logprobs[i] = TokenLogprobs(
                    chosen_ids[j], chosen_lp[j], rank[j], top_ids[j][:k], top_lp[j][:k]
                )
        return SamplerOutput(token_ids, logprobs)

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow], sampled: list[int],
                token_ids: torch.Tensor) -> None:
        """Temperature, truncation and the draw for the rows at `sampled`; writes their token_ids.

        Each group of rows is gathered straight from `logits` (one copy, none when the group is the
        whole batch) and then used as scratch.
        """
        device = logits.device
        uniforms = self._uniforms(rows, sampled, device)  # [B, tries + 1], rows at `sampled` filled

        def column(name: str, group: list[int]) -> torch.Tensor:
            return torch.tensor([getattr(rows[i].params, name) for i in group], device=device)

        # Rows with top_k, grouped by how many candidates they need (at most 999).
        for low, high in zip((0,) + _TOP_K_WIDTHS, _TOP_K_WIDTHS):
            group = [i for i in sampled if low < rows[i].params.top_k <= high]
            if group:
                index = _index(group, device)
                token_ids[index] = sample_top_k(
                    _rows(logits, group), column("temperature", group), column("top_k", group),
                    column("top_p", group), column("min_p", group), uniforms[index, 0],
                    max(rows[i].params.top_k for i in group),
                )
        # Rows without top_k: with top_p, then plain.
        for with_top_p in (True, False):
            group = [i for i in sampled if rows[i].params.top_k == 0 and (rows[i].params.top_p < 1.0) == with_top_p]
            if group:
                index = _index(group, device)
                any_min_p = any(rows[i].params.min_p > 0.0 for i in group)  # decided here: no device sync
                token_ids[index] = sample_vocabulary(
                    _rows(logits, group), column("temperature", group),
                    column("top_p", group) if with_top_p else None,
                    column("min_p", group) if any_min_p else None, uniforms[index],
                )

    def _uniforms(self, rows: Sequence[SamplingRow], sampled: list[int], device: torch.device) -> torch.Tensor:
        """[B, tries + 1] numbers in (0, 1] for the rows at `sampled`: a seeded row's are keyed by
        (seed, position), the rest come from the shared generator.

        Every sampled row takes the same count, so a seeded row's numbers do not depend on which
        path its draw took, on the other rows, or on what was drawn at other positions.
        """
        count = _NUCLEUS_TRIES + 1
        uniforms = torch.empty(len(rows), count, device=device)
        shared = [i for i in sampled if rows[i].seed is None]
        if shared:
            # rand is in [0, 1); the draw needs u > 0
            uniforms[_index(shared, device)] = 1.0 - torch.rand(
                len(shared), count, device=device, generator=self.shared_generator(device)
            )
        seeded = [i for i in sampled if rows[i].seed is not None]
        if seeded:
            keyed = seeded_uniforms([rows[i].seed for i in seeded], [rows[i].position for i in seeded], count)
            uniforms[_index(seeded, device)] = torch.from_numpy(keyed).to(device)
        return uniforms


def _has_penalty(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
    )


def _index(positions: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(positions, dtype=torch.long, device=device)


def _rows(x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """x[positions]: x itself when that is every row (no copy), else a copy of those rows.

    index_select, not x[index]: on CPU advanced indexing copies rows ~7x slower.
    """
    if len(positions) == x.shape[0]:
        return x
    return x.index_select(0, _index(positions, x.device))
