"""Speculative decoding on each device, on a tiny random Llama (tests/model_factory.py): identical tokens
and logprobs with and without it. On CUDA with deterministic=True (batch-invariant kernels) and decode
CUDA graphs captured: pure decode steps replay graphs, steps that verify drafts run eagerly (graphs
are captured for one-token decode shapes only), and the outputs still match. The CUDA case runs in
the GPU check (`pytest -m gpu`); the CPU case checks the same test here."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from fp8_turbo import LLM, SamplingParams
from fp8_turbo.engine.core.cuda_graphs import CudaGraphRunner
from fp8_turbo.engine.core.scheduler import ScheduledSeq
from fp8_turbo.engine.core.sequence import Sequence
from model_factory import make_checkpoint

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def facts(outs) -> list:
    return [[(c.token_ids, c.finish_reason, [sorted((t, lp.logprob, lp.rank) for t, lp in d.items())
                                             for d in c.logprobs or []]) for c in o.outputs] for o in outs]


def test_verification_steps_do_not_replay_graphs():
    graphs = CudaGraphRunner(None, [], 16, max_model_len=64, max_num_seqs=8, device=torch.device("cpu"), capture=False)
    seq = Sequence("r", 0, list(range(3, 13)), SamplingParams())
    seq.num_computed_tokens, seq.block_table = 9, [0]
    assert graphs.can_run([ScheduledSeq(seq, 1)])
    assert not graphs.can_run([ScheduledSeq(seq, 1, [5, 6])])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tiny_model_is_identical_with_speculation(device, tmp_path):
    ckpt = make_checkpoint(tmp_path / "tiny", "llama31")
    options = dict(device=device, deterministic=True, kv_cache_memory_bytes=16 << 20, max_num_seqs=8)
    plain = LLM(str(ckpt), **options)
    spec = LLM(str(ckpt), speculative_config=SPEC, **options)
    replays = {"plain": [], "spec": []}
    if device == "cuda":
        for name, llm in (("plain", plain), ("spec", spec)):
            graphs = llm.engine.runner.graphs
            assert graphs is not None, "decode CUDA graphs were meant to be captured"
            graphs.run = (lambda run, seen: lambda host: seen.append(len(host.seq_lens)) or run(host))(
                graphs.run, replays[name])
    # Repetitive prompts: the random model's continuations repeat too, so prompt lookup finds drafts.
    prompts = [{"prompt_token_ids": [5 + i, 6, 7, 8] * 6} for i in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=40, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=32, repetition_penalty=1.2, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, seed=8, max_tokens=40, logprobs=1, ignore_eos=True)]
    assert facts(spec.generate(prompts, params)) == facts(plain.generate(prompts, params))
    drafter = spec.engine.drafter
    assert 0 < drafter.num_accepted_tokens < drafter.num_draft_tokens
    if device == "cuda":  # graphs replayed the plain engine's decode steps (the speculative engine's
        # steps without any draft replay too; those verifying drafts run eagerly)
        assert replays["plain"], "no decode step replayed a graph"
    bm = spec.engine.block_manager
    bm.check_consistency([])
    assert bm.num_free_blocks == bm.num_blocks


def test_tensor_parallel_is_identical_with_speculation(tmp_path):
    """TP=2 (gloo on CPU): the workers receive the verification chunks like any step; outputs equal
    TP=2's without speculation."""
    ckpt = make_checkpoint(tmp_path / "tiny", "llama31")
    prompts = [{"prompt_token_ids": [5 + i, 6, 7, 8] * 6} for i in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=24, logprobs=1, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, frequency_penalty=0.5, ignore_eos=True)]
    results = []
    for spec in (None, SPEC):
        llm = LLM(str(ckpt), device="cpu", tensor_parallel_size=2, kv_cache_memory_bytes=4 << 20,
                  speculative_config=spec)
        try:
            results.append(facts(llm.generate(prompts, params)))
            if spec:
                assert 0 < llm.engine.drafter.num_accepted_tokens < llm.engine.drafter.num_draft_tokens
        finally:
            llm.shutdown()
    assert results[0] == results[1]


SYMBOLS = [5, 6, 7, 8]
# Next-symbol probabilities given the current one (index i): i + 1 (mod 4) 0.6, i + 2 0.25, i 0.1, i + 3 0.05.
STEP_PROBS = {1: 0.6, 2: 0.25, 0: 0.1, 3: 0.05}


class MarkovModel(torch.nn.Module):
    """A stand-in for the model under the runner's contract (input ids + AttentionMetadata -> logits at
    logits_indices): the next token depends only on the current one, through a known chain over four
    symbols, so the exact distribution of any continuation is known."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.logits = torch.full((vocab_size, vocab_size), float("-inf"))
        for token in range(vocab_size):
            i = SYMBOLS.index(token) if token in SYMBOLS else 0
            for step, p in STEP_PROBS.items():
                self.logits[token, SYMBOLS[(i + step) % 4]] = float(np.log(p))

    def forward(self, input_ids, meta, kv_caches):
        return self.logits[input_ids[meta.logits_indices]]


def test_unseeded_sampling_keeps_its_distribution(tmp_path):
    """Without a seed, each verified position draws fresh numbers from the shared generator, so the
    kept tokens follow the model's distribution exactly as without speculation. On a Markov-chain
    model whose next token depends strongly on the current one (prompt lookup drafts the likeliest
    successor, accepted ~60% of the time), the joint distribution of the first three generated tokens
    of 1500 unseeded sequences fits the chain's exact probabilities with and without speculation
    (one-sample chi-square, outcomes with fewer than 10 expected draws pooled). Keeping a token drawn
    after a rejected draft, or sharing numbers between positions, skews the joint."""
    ckpt = make_checkpoint(tmp_path / "tiny", "llama31")
    prompt = {"prompt_token_ids": SYMBOLS * 6}
    params = SamplingParams(temperature=1.0, n=1500, max_tokens=3, ignore_eos=True)
    exact: dict[tuple[int, ...], float] = {}
    for a in SYMBOLS:
        for b in SYMBOLS:
            for c in SYMBOLS:
                p = 1.0
                for cur, nxt in ((8, a), (a, b), (b, c)):
                    p *= STEP_PROBS[(SYMBOLS.index(nxt) - SYMBOLS.index(cur)) % 4]
                exact[(a, b, c)] = p
    for spec in (None, {**SPEC, "prompt_lookup_min": 1}):
        llm = LLM(str(ckpt), device="cpu", kv_cache_memory_bytes=16 << 20, max_num_seqs=64, speculative_config=spec)
        llm.engine.runner.model = MarkovModel(llm.engine.model_config.vocab_size)
        counts = Counter(tuple(c.token_ids) for c in llm.generate([prompt], params)[0].outputs)
        assert set(counts) <= set(exact)
        if spec:
            drafter = llm.engine.drafter
            assert drafter.num_drafts >= 1000 and 0.4 < drafter.acceptance_rate < 0.8, drafter.acceptance_rate
        observed, expected, pooled = [], [], [0.0, 0.0]
        for outcome, p in exact.items():
            if p * params.n >= 10:
                observed.append(counts[outcome]), expected.append(p * params.n)
            else:
                pooled = [pooled[0] + counts[outcome], pooled[1] + p * params.n]
        observed, expected = np.array(observed + [pooled[0]]), np.array(expected + [pooled[1]])
        statistic = ((observed - expected) ** 2 / expected).sum()
        assert chi2.sf(statistic, len(observed) - 1) > 1e-3, (spec, statistic, len(observed))
