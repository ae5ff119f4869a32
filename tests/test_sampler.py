"""The sampler against references nobody here wrote.

References: transformers' logits processors for repetition penalty, temperature, top_k, top_p and
min_p; OpenAI's formula, written out directly, for presence/frequency penalties. How their
conventions map onto ours:
- filter_value=-inf: a filtered token gets probability 0 here (weight 0 in `candidate_weights`).
- min_tokens_to_keep=1 (their default): we always keep the most likely token too (top_k >= 1, top_p's
  first token has nothing before it, min_p's threshold is relative to the most likely token).
- TopKLogitsWarper keeps every token tied with the k-th; we keep exactly k. The two differ only on
  exact ties, which random float logits do not produce. top_k=0 is "off" here, an error there.
- TopPLogitsWarper drops tokens whose ascending cumulative probability is <= 1 - top_p; we keep a
  token while the mass before it (descending) is < top_p: the same set, read from the other end.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import fp8_turbo.engine.sampling.sampler as sampler_module
from fp8_turbo.engine.sampling.sampler import Sampler, SamplingRow, apply_penalties, compute_logprobs, processed_probs
from fp8_turbo.engine.sampling.ops import argmax_of_rows, draw_from_weights, top_k_of_rows
from fp8_turbo.engine.sampling.params import SamplingParams

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)


def random_logits(seed: int, rows: int, vocab: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def reference_probs(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """The distribution of one row [V], built from transformers' processors and OpenAI's formula."""
    p = row.params
    x = logits.clone().double()[None]  # [1, V]
    for token, bias in (p.logit_bias or {}).items():
        x[0, token] += bias
    if len(row.output_token_ids) < p.min_tokens:
        x[0, list(p.stop_token_ids) + ([] if p.ignore_eos else list(row.eos_token_ids))] = float("-inf")
    seen = list(row.prompt_token_ids) + list(row.output_token_ids)
    if p.repetition_penalty != 1.0 and seen:
        x = RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty))(torch.tensor([seen]), x)
    for token, count in Counter(row.output_token_ids).items():
        x[0, token] -= count * p.frequency_penalty + p.presence_penalty
    if p.greedy:
        return torch.nn.functional.one_hot(x[0].argmax(), x.shape[1]).double()
    x = TemperatureLogitsWarper(float(p.temperature))(None, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(None, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(None, x)
    if p.min_p > 0.0:
        x = MinPLogitsWarper(p.min_p)(None, x)
    return x.softmax(dim=-1)[0]


def row(prompt=(), output=(), eos=(), seed=None, **params) -> SamplingRow:
    sampling = SamplingParams(**params)
    return SamplingRow(sampling, list(prompt), list(output), seed, list(eos))


# ----------------------------------------------------------------------------- each transform


def test_repetition_penalty_matches_transformers():
    vocab = 50
    logits = random_logits(0, 4, vocab)
    rows = [
        row(prompt=[1, 2, 3, 3], output=[4, 40], repetition_penalty=1.3),
        row(prompt=[7], output=[], repetition_penalty=0.5),
        row(prompt=[1, 2], output=[2, 9, 9], repetition_penalty=1.0),  # off: untouched
        row(prompt=list(range(0, vocab, 3)), output=[49], repetition_penalty=4.9),
    ]
    ours = logits.clone()
    apply_penalties(ours, rows)
    for i, r in enumerate(rows):
        seen = torch.tensor([r.prompt_token_ids + r.output_token_ids])
        theirs = RepetitionPenaltyLogitsProcessor(float(r.params.repetition_penalty))(seen, logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i], theirs[0], rtol=1e-6, atol=0)


def test_presence_and_frequency_penalties_match_openai_formula():
    vocab = 30
    logits = random_logits(1, 3, vocab)
    rows = [
        row(prompt=[5, 5, 6], output=[1, 1, 1, 2, 29], frequency_penalty=0.7, presence_penalty=-0.4),
        row(prompt=[1], output=[], frequency_penalty=2.0, presence_penalty=2.0),  # nothing generated yet
        row(prompt=[], output=[3, 3, 8], frequency_penalty=-2.0),
    ]
    ours = logits.clone()
    apply_penalties(ours, rows)
    expected = logits.clone()
    for i, r in enumerate(rows):  # OpenAI: logit - count * frequency_penalty - (count > 0) * presence_penalty
        for token in range(vocab):
            count = r.output_token_ids.count(token)
            expected[i, token] -= count * r.params.frequency_penalty + (count > 0) * r.params.presence_penalty
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


WARPER_CASES = [
    ({"temperature": 0.6}, [TemperatureLogitsWarper(0.6)]),
    ({"temperature": 1.7}, [TemperatureLogitsWarper(1.7)]),
    ({"top_k": 1}, [TopKLogitsWarper(1)]),
    ({"top_k": 17}, [TopKLogitsWarper(17)]),
    ({"top_p": 0.9}, [TopPLogitsWarper(0.9)]),
    ({"top_p": 0.3}, [TopPLogitsWarper(0.3)]),
    ({"top_p": 1e-4}, [TopPLogitsWarper(1e-4)]),
    ({"min_p": 0.05}, [MinPLogitsWarper(0.05)]),
    ({"min_p": 1.0}, [MinPLogitsWarper(1.0)]),
    (
        {"temperature": 0.8, "top_k": 40, "top_p": 0.8, "min_p": 0.02},
        [TemperatureLogitsWarper(0.8), TopKLogitsWarper(40), TopPLogitsWarper(0.8), MinPLogitsWarper(0.02)],
    ),
]


@pytest.mark.parametrize(("params", "warpers"), WARPER_CASES, ids=[str(p) for p, _ in WARPER_CASES])
def test_warpers_match_transformers(params, warpers):
    logits = random_logits(2, 8, 500, scale=3.0)
    theirs = logits.clone()
    for warper in warpers:
        theirs = warper(None, theirs)
    theirs = theirs.softmax(dim=-1)
    ours = processed_probs(logits, [row(**params)] * logits.shape[0])
    assert torch.equal(ours > 0, theirs > 0), "different tokens kept"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_processed_probs_matches_reference_for_a_mixed_batch():
    logits = random_logits(3, 5, 200)
    rows = [
        row(prompt=[1, 2], output=[3, 3], temperature=0.7, top_p=0.9, repetition_penalty=1.2),
        row(output=[5, 6, 6], top_k=5, frequency_penalty=0.5, presence_penalty=0.5),
        row(temperature=0.0, logit_bias={9: 50.0}),
        row(output=[1], min_tokens=3, stop_token_ids=[7], eos=[int(logits[3].argmax())], min_p=0.1),
        row(temperature=1.3),
    ]
    ours = processed_probs(logits, rows)
    for i, r in enumerate(rows):
        torch.testing.assert_close(ours[i].double(), reference_probs(logits[i], r), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- the draw


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of `counts` [V] to `probs` [V]; bins hold >= 20 expected draws each."""
    total = int(counts.sum())
    expected = probs.double() * total
    assert int(counts[probs == 0].sum()) == 0, "a token with probability 0 was drawn"
    order = expected.argsort(descending=True)
    order = order[probs[order] > 0]
    bins_observed, bins_expected, obs, exp = [], [], 0.0, 0.0
    for o_token, e_token in zip(counts[order].tolist(), expected[order].tolist()):
        obs, exp = obs + o_token, exp + e_token
        if exp >= 20.0:
            bins_observed.append(obs), bins_expected.append(exp)
            obs, exp = 0.0, 0.0
    if exp > 0:  # the remaining tail joins the last bin
        bins_observed[-1] += obs
        bins_expected[-1] += exp
    if len(bins_expected) < 2:
        return 1.0
    o, e = torch.tensor(bins_observed, dtype=torch.float64), torch.tensor(bins_expected, dtype=torch.float64)
    statistic = ((o - e) ** 2 / e).sum()
    dof = torch.tensor((len(bins_expected) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, statistic / 2))  # P(chi2_dof >= statistic)


MIXES = {
    "temperature": dict(temperature=1.0),
    "temperature+top_p": dict(temperature=0.7, top_p=0.8),
    "top_k": dict(top_k=10, temperature=1.3),
    "min_p": dict(min_p=0.1),
    "top_p+min_p": dict(temperature=1.2, top_p=0.7, min_p=0.15),
    "everything": dict(
        prompt=[0, 1, 2], output=[3, 3, 4], temperature=0.8, top_k=20, top_p=0.9, min_p=0.05,
        repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3, logit_bias={5: 2.0},
    ),
}
DRAWS = 20_000


def draw_counts(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], chunk: int = 4000) -> torch.Tensor:
    counts = torch.zeros(logits.shape[0], dtype=torch.long)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        tokens = sampler(logits.expand(len(part), -1).clone(), part).token_ids
        counts += torch.bincount(tokens, minlength=logits.shape[0])
    return counts


@pytest.mark.parametrize("mix", list(MIXES))
def test_draws_follow_the_processed_distribution(mix):
    logits = random_logits(4, 1, 40, scale=1.5)[0]
    r = row(**MIXES[mix])
    counts = draw_counts(Sampler(seed=11), logits, [r] * DRAWS)
    assert chi_square_p_value(counts, reference_probs(logits, r)) > 1e-3


@pytest.mark.parametrize(
    ("scale", "top_p", "tries"),
    [(3.0, 0.99, 16), (2.2, 0.99, 16), (0.5, 0.95, 16), (0.5, 0.05, 16), (2.2, 0.5, 1), (2.2, 0.99, 0)],
)
def test_top_p_draws_in_a_large_vocabulary(scale, top_p, tries, monkeypatch):
    """Nuclei from 1 to ~1300 of 1500 tokens, drawn by rejection; `tries` 1 and 0 send rows that
    are still drawing (all of them for 0) to the exact sorted path."""
    monkeypatch.setattr(sampler_module, "_NUCLEUS_TRIES", tries)
    logits = random_logits(5, 1, 1500, scale=scale)[0]
    r = row(top_p=top_p, temperature=0.9)
    counts = draw_counts(Sampler(seed=12), logits, [r] * DRAWS)
    assert chi_square_p_value(counts, reference_probs(logits, r)) > 1e-3


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.8, top_p=0.9, min_p=0.01)], ids=str)
def test_draws_over_a_wide_vocabulary(params):
    """4096 tokens: the draw goes through blocks of 256 (draw_from_weights' two levels)."""
    logits = random_logits(13, 1, 4096, scale=2.0)[0]
    r = row(**params)
    counts = draw_counts(Sampler(seed=14), logits, [r] * DRAWS, chunk=2000)
    assert chi_square_p_value(counts, reference_probs(logits, r)) > 1e-3


def test_two_level_draw_never_returns_a_zero_weight():
    g = torch.Generator().manual_seed(15)
    weights = torch.rand(64, 4096, generator=g)
    weights *= torch.rand(64, 4096, generator=g) < 0.02  # mostly zeros, whole blocks empty
    weights[:, 0] = 0.0
    weights[:, -1] = 0.0
    extremes = torch.tensor([1.0, 2.0**-24, 0.5, 1.0 - 2.0**-24])  # the ends of (0, 1]
    uniform = torch.cat([extremes, 1.0 - torch.rand(60, generator=g)])
    positions = draw_from_weights(weights, uniform)
    assert bool((weights.gather(1, positions[:, None]) > 0).all())
    # The same positions as one running sum over the whole row, up to float rounding at the edges.
    cumulative = weights.double().cumsum(dim=-1)
    expected = torch.searchsorted(cumulative, (uniform.double() * cumulative[:, -1])[:, None]).squeeze(1)
    assert (positions == expected).float().mean() > 0.99


@pytest.mark.parametrize("vocab", [40, 4096, 49152, 50257])
@pytest.mark.parametrize("k", [0, 1, 5, 64, 999])
def test_top_k_of_rows_equals_torch_topk(vocab, k):
    if k > vocab:
        return
    x = random_logits(16, 4, vocab)
    x[0] = 0.0  # one value everywhere
    x[1, ::7] = 9.0  # many ties at the top
    values, ids = top_k_of_rows(x, k)
    assert torch.equal(values, x.topk(k, dim=-1).values)
    assert torch.equal(x.gather(1, ids), values)
    assert bool((ids.sort(dim=-1).values.diff(dim=-1) != 0).all())  # k different tokens


@pytest.mark.parametrize("vocab", [40, 4096, 49152, 50257])
def test_argmax_of_rows_equals_torch_argmax(vocab):
    x = random_logits(17, 5, vocab)
    x[0] = 0.0  # one value everywhere: the first index
    x[1, 3::500] = 9.0  # ties in different blocks
    x[2, vocab - 1] = 50.0  # the last token
    assert torch.equal(argmax_of_rows(x), x.argmax(dim=-1))


def test_seeded_draws_follow_the_distribution():
    logits = random_logits(6, 1, 40, scale=1.5)[0]
    rows = [row(seed=seed, temperature=0.9, top_p=0.95) for seed in range(2000)]
    counts = draw_counts(Sampler(seed=0), logits, rows)
    assert chi_square_p_value(counts, reference_probs(logits, rows[0])) > 1e-3


def test_seeded_draws_over_positions_follow_the_distribution():
    """One seed, 2000 consecutive positions (the draws of one long seeded sequence) and a top_k row."""
    logits = random_logits(8, 1, 40, scale=1.5)[0]
    for params in (dict(temperature=0.9, top_p=0.95), dict(temperature=1.2, top_k=5)):
        rows = [row(output=[0] * p, seed=12345, **params) for p in range(2000)]
        counts = draw_counts(Sampler(seed=0), logits, rows)
        assert chi_square_p_value(counts, reference_probs(logits, rows[0])) > 1e-3, params


def test_a_seeded_draw_is_keyed_by_seed_and_position():
    """The same (seed, position) draws the same token, in any sampler and any batch; another
    position (the same seed, one more generated token) draws anew, and so does another seed."""
    logits = random_logits(7, 1, 1000)
    first = [Sampler(seed=s)(logits.clone(), [row(seed=42)]).token_ids.item() for s in range(3)]
    assert len(set(first)) == 1
    stream = [Sampler()(logits.clone(), [row(output=[5] * p, seed=42)]).token_ids.item() for p in range(20)]
    assert stream[0] == first[0] and len(set(stream)) > 1
    seeds = [Sampler()(logits.clone(), [row(seed=s)]).token_ids.item() for s in range(20)]
    assert len(set(seeds)) > 1
    together = Sampler()(logits.expand(20, -1).clone(), [row(output=[5] * p, seed=42) for p in range(20)])
    assert together.token_ids.tolist() == stream  # the 20 positions in one call draw what 20 calls drew


# ----------------------------------------------------------------------------- properties

row_params = st.fixed_dictionaries(
    {
        "temperature": st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.8]),
        "top_k": st.sampled_from([0, 0, 1, 3, 50, 999]),
        "top_p": st.sampled_from([1.0, 1.0, 0.95, 0.5, 0.05]),
        "min_p": st.sampled_from([0.0, 0.0, 0.05, 0.5]),
        "repetition_penalty": st.sampled_from([1.0, 1.5, 0.7]),
        "frequency_penalty": st.sampled_from([0.0, 1.0, -0.5]),
        "presence_penalty": st.sampled_from([0.0, 0.7]),
        "min_tokens": st.sampled_from([0, 0, 4]),
    }
)


def make_row(params: dict, vocab: int, salt: int, seed: int | None = None) -> SamplingRow:
    g = torch.Generator().manual_seed(salt)
    prompt = torch.randint(vocab, (6,), generator=g).tolist()
    output = torch.randint(vocab, (3,), generator=g).tolist()
    stop = torch.randint(vocab, (2,), generator=g).tolist()
    return row(prompt=prompt, output=output, eos=stop[:1], stop_token_ids=stop[1:], seed=seed, **params)


@PROPERTY
@given(
    params=st.lists(row_params, min_size=1, max_size=5),
    vocab=st.sampled_from([7, 300, 3000]),
    scale=st.sampled_from([0.3, 2.0, 6.0]),
    seed=st.integers(0, 2**16),
)
def test_a_masked_token_is_never_drawn(params, vocab, scale, seed):
    logits = random_logits(seed, len(params), vocab, scale)
    rows = [make_row(p, vocab, salt=seed + i) for i, p in enumerate(params)]
    tokens = Sampler(seed=seed)(logits.clone(), rows).token_ids
    for i, r in enumerate(rows):
        assert reference_probs(logits[i], r)[tokens[i]] > 0, (i, r.params, int(tokens[i]))


@PROPERTY
@given(
    knob=st.sampled_from([{"top_k": 1}, {"top_p": 1e-6}, {"temperature": 0.0}, {"min_p": 1.0}]),
    temperature=st.sampled_from([0.2, 1.0, 2.0]),
    vocab=st.sampled_from([5, 1000]),
    scale=st.sampled_from([0.1, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_degenerate_settings_give_the_argmax(knob, temperature, vocab, scale, seed):
    logits = random_logits(seed, 3, vocab, scale)
    rows = [row(**{"temperature": temperature, **knob}) for _ in range(3)]
    tokens = Sampler(seed=seed)(logits.clone(), rows).token_ids
    assert torch.equal(tokens, logits.argmax(dim=-1))


@PROPERTY
@given(
    seeded=st.lists(row_params, min_size=1, max_size=3),
    others_a=st.lists(row_params, max_size=4),
    others_b=st.lists(row_params, max_size=4),
    vocab=st.sampled_from([50, 3000]),
    seed=st.integers(0, 2**16),
)
def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch(seeded, others_a, others_b, vocab, seed):
    def run(others: list[dict], seeded_first: bool) -> list[list[int]]:
        seeded_rows = [make_row(p, vocab, salt=seed + i, seed=seed + i) for i, p in enumerate(seeded)]
        other_rows = [make_row(p, vocab, salt=seed + 100 + i) for i, p in enumerate(others)]
        batch = seeded_rows + other_rows if seeded_first else other_rows + seeded_rows
        where = [batch.index(r) for r in seeded_rows]
        sampler, steps = Sampler(), []
        for step in range(3):  # the same generators over several steps, as in a request
            # The seeded rows see the same logits in both runs, the other rows different ones.
            logits = random_logits(seed + 7919 * len(others) + step, len(batch), vocab)
            for i, w in enumerate(where):
                logits[w] = random_logits(seed + 31 * i + step, 1, vocab)[0]
            tokens = sampler(logits, batch).token_ids
            steps.append([int(tokens[w]) for w in where])
            for r, w in zip(seeded_rows, where):
                r.output_token_ids.append(int(tokens[w]))
        return steps

    assert run(others_a, seeded_first=True) == run(others_b, seeded_first=False)


# ----------------------------------------------------------------------------- the rest


def test_min_tokens_blocks_stop_ids_until_reached():
    vocab = 20
    logits = torch.zeros(1, vocab)
    logits[0, 3] = logits[0, 4] = 30.0  # eos 3 and stop id 4 would win every time
    blocked = row(output=[0], min_tokens=2, stop_token_ids=[4], eos=[3])
    assert Sampler(seed=0)(logits.clone(), [blocked]).token_ids.item() not in (3, 4)
    done = row(output=[0, 0], min_tokens=2, stop_token_ids=[4], eos=[3])
    assert Sampler(seed=0)(logits.clone(), [done]).token_ids.item() in (3, 4)
    ignoring_eos = row(output=[0], min_tokens=2, stop_token_ids=[4], eos=[3], ignore_eos=True, temperature=0.0)
    assert Sampler(seed=0)(logits.clone(), [ignoring_eos]).token_ids.item() == 3


def test_logit_bias_and_its_range():
    logits = random_logits(8, 2, 100)
    rows = [row(logit_bias={17: 100.0}), row(temperature=0.0, logit_bias={int(logits[1].argmax()): -100.0})]
    tokens = Sampler(seed=0)(logits.clone(), rows).token_ids
    assert tokens[0] == 17
    assert tokens[1] != logits[1].argmax()
    with pytest.raises(ValueError, match="logit_bias: token id 100 is outside"):
        Sampler()(logits.clone(), [row(logit_bias={100: 1.0})] * 2)


def test_greedy_takes_the_argmax_after_penalties():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    r = row(output=[0], temperature=0.0, repetition_penalty=2.0)  # 5 / 2 < 4
    assert Sampler()(logits.clone(), [r]).token_ids.item() == 1


def test_compute_logprobs_matches_log_softmax():
    logits = random_logits(9, 6, 300)
    token_ids = torch.tensor([0, 5, 299, 17, 42, int(logits[5].argmax())])
    token_lp, rank, top_ids, top_lp = compute_logprobs(logits, token_ids, 4)
    expected = logits.log_softmax(dim=-1)
    torch.testing.assert_close(token_lp, expected.gather(1, token_ids[:, None])[:, 0])
    order = expected.argsort(dim=-1, descending=True)
    expected_rank = (order == token_ids[:, None]).float().argmax(dim=-1) + 1
    assert torch.equal(rank, expected_rank)
    assert rank[5] == 1
    assert torch.equal(top_ids, order[:, :4])
    torch.testing.assert_close(top_lp, expected.gather(1, order[:, :4]))
    # Tokens all among each row's best 20 (ranks read from the top list, no full count), ties too.
    logits[:, 50] = logits[:, 60] = logits.max(dim=-1).values + 1.0
    token_ids = torch.tensor([50, 60, int(order[2, 3]), int(order[3, 17]), int(order[4, 0]), int(order[5, 7])])
    _, rank, _, _ = compute_logprobs(logits, token_ids, 0)
    assert rank.tolist() == [1, 1, 6, 20, 3, 10]


def test_sampler_logprobs_come_from_the_raw_logits():
    logits = random_logits(10, 3, 200)
    rows = [
        row(output=[1, 2], temperature=0.5, top_k=3, repetition_penalty=3.0, frequency_penalty=2.0, logprobs=5),
        row(temperature=0.0),  # asked for nothing
        row(temperature=0.0, logit_bias={7: 100.0}, logprobs=0),
    ]
    out = Sampler(seed=3)(logits.clone(), rows)
    raw = logits.log_softmax(dim=-1)
    assert out.logprobs[1] is None
    for i in (0, 2):
        lp = out.logprobs[i]
        token = int(out.token_ids[i])
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(raw[i, token]), abs=1e-5)
        assert lp.rank == int((raw[i] > raw[i, token]).sum()) + 1
        assert len(lp.top_ids) == rows[i].params.logprobs
        assert lp.top_ids == raw[i].topk(len(lp.top_ids)).indices.tolist()
    assert out.logprobs[2].token_id == 7 and out.logprobs[2].rank > 1  # biased in, unlikely under raw logits


# ----------------------------------------------------------------------------- end to end on SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from fp8_turbo import LLM

    return LLM("smollm2-135m-instruct", device="cpu")


def test_a_seed_gives_the_same_completion_alone_and_in_a_batch(smollm2):
    def chat(text: str) -> list[dict]:
        return [{"role": "user", "content": text}]

    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    poem = chat("Write a short poem about the sea.")
    alone = [smollm2.chat(poem, seeded)[0].outputs[0].token_ids for _ in range(2)]
    others = [chat(f"Tell me a fact about the number {i}.") for i in range(7)]
    other_params = [SamplingParams(temperature=0.8, top_k=40, max_tokens=16, seed=i if i % 2 else None)
                    for i in range(7)]
    batch = smollm2.chat(others[:3] + [poem] + others[3:], other_params[:3] + [seeded] + other_params[3:])
    assert alone[0] == alone[1] == batch[3].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, ignore_eos=True)
    assert smollm2.chat(poem, unseeded)[0].outputs[0].token_ids != alone[0]  # the seed is what fixes it


def test_frequency_penalty_reduces_repeated_tokens(smollm2):
    story = [{"role": "user", "content": "Write a long story about a cat."}]

    def repeats(frequency_penalty: float) -> int:  # generated tokens that already appeared before
        params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, frequency_penalty=frequency_penalty)
        ids = smollm2.chat(story, params)[0].outputs[0].token_ids
        assert len(ids) == 64
        return len(ids) - len(set(ids))

    plain, penalised = repeats(0.0), repeats(2.0)
    assert penalised < plain * 0.75, (plain, penalised)  # measured: 19 -> 10 of 64


def test_logprobs_of_a_row_do_not_depend_on_the_batch_or_threads():
    """A row's logprob bits are the same alone, in a batch of 4 and at 1 or 2 threads (torch's CPU
    logsumexp splits a lone row across threads, which changed its last bit at 2 threads)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 49152, generator=g) * 4
    ids = x.argmax(-1)
    saved = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(compute_logprobs(x, ids, 2))
            alone = [compute_logprobs(x[i:i + 1], ids[i:i + 1], 2) for i in range(4)]
            for j in (0, 3):  # the token's logprob and the top logprobs
                assert torch.equal(got[-1][j], torch.cat([a[j] for a in alone])), (threads, j)
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(a, b) for a, b in zip(got[0], got[1]))
    assert torch.allclose(got[0][0], (x.log_softmax(-1).gather(1, ids[:, None])).squeeze(1), atol=1e-5)
