"""Speculative decoding on each device, on a tiny random Llama (tests/model_factory.py): identical tokens
and logprobs with and without it. On CUDA with deterministic=True (batch-invariant kernels) and decode
CUDA graphs captured: pure decode steps replay graphs, steps that verify drafts run eagerly (graphs
are captured for one-token decode shapes only), and the outputs still match. The CUDA case runs in
the GPU check (`pytest -m gpu`); the CPU case checks the same test here."""
from __future__ import annotations

import pytest
import torch

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
