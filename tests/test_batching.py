"""Continuous batching end to end on a tiny model: batch invariance under chunked prefill and
preemption, prefix caching that computes only new tokens, abort freeing blocks, FP8 KV cache.

Greedy tokens at different batch shapes are compared exactly. The model runs in fp32 (no FP8
activations, so no e4m3 rounding boundary to tip): the CPU BLAS sums a row in an order that depends on
the batch's row count, which moves logits by ~1e-4 of their magnitude at most (tests/test_parity.py),
and these trajectories' smallest top-2 gap is 0.19 nats on logits below 1.3 (measured; a property of the
fixed model and prompts, not of the CPU), ~1000x that."""
from __future__ import annotations

import pytest
import torch

from fp8_turbo import LLM, SamplingParams
from model_factory import VOCAB, make_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def rand_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("ck"), "llama32"))


def test_sixteen_prompts_together_equal_each_alone(path):
    prompts = [{"prompt_token_ids": rand_ids(4 + 9 * i, i)} for i in range(16)]
    alone_llm = LLM(path, device="cpu", enable_prefix_caching=False)
    alone = [alone_llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    cfg = alone_llm.engine.model_config
    block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * 16
    # 20 blocks (320 tokens) for prompts totalling ~1200 tokens: forces preemption; 32-token chunks.
    tight = LLM(path, device="cpu", max_num_batched_tokens=32, kv_cache_memory_bytes=20 * block_bytes)
    seen_preemption = []
    schedule = tight.engine.scheduler.schedule

    def spy():
        out = schedule()
        seen_preemption.extend(out.preempted)
        return out

    tight.engine.scheduler.schedule = spy
    together = tight.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert seen_preemption, "the cache was meant to be small enough to preempt"
    bm = tight.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_cache_computes_only_new_tokens(path):
    system = rand_ids(64, 100)  # 4 full blocks shared
    a, b = system + rand_ids(5, 101), system + rand_ids(7, 102)
    llm = LLM(path, device="cpu")
    engine = llm.engine
    llm.generate([{"prompt_token_ids": a}], GREEDY)
    before = engine.num_computed_tokens_total
    out = llm.generate([{"prompt_token_ids": b}], GREEDY)[0]
    computed = engine.num_computed_tokens_total - before
    assert out.num_cached_tokens == 64
    # 7 new prompt tokens + 15 decode steps (the 16th token is sampled, never fed back)
    assert computed == 7 + GREEDY.max_tokens - 1
    uncached = LLM(path, device="cpu", enable_prefix_caching=False).generate([{"prompt_token_ids": b}], GREEDY)[0]
    assert out.outputs[0].token_ids == uncached.outputs[0].token_ids


def test_abort_frees_blocks_at_once(path):
    llm = LLM(path, device="cpu")
    engine = llm.engine
    engine.add_request("x", rand_ids(40, 7), SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort_request("x")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


def test_fp8_kv_cache_doubles_capacity_and_stays_close(path):
    auto = LLM(path, device="cpu", kv_cache_memory_bytes=1 << 20)
    fp8 = LLM(path, device="cpu", kv_cache_memory_bytes=1 << 20, kv_cache_dtype="fp8")
    assert fp8.engine.kv_capacity_tokens == 4 * auto.engine.kv_capacity_tokens  # fp32 -> 1 byte on CPU
    ids = rand_ids(30, 3)
    p = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    lp_auto = [e[t].logprob for e, t in zip(auto.generate([{"prompt_token_ids": ids}], p)[0].prompt_logprobs[1:], ids[1:])]
    lp_fp8 = [e[t].logprob for e, t in zip(fp8.generate([{"prompt_token_ids": ids}], p)[0].prompt_logprobs[1:], ids[1:])]
    # e4m3 keys/values carry ~3 significant bits; on this random model the logprobs move by < 0.1 nat.
    # (A K/V element on an e4m3 rounding boundary may round either way on another CPU: one element moves
    # one step, a small part of what quantizing all of them does.)
    assert max(abs(x - y) for x, y in zip(lp_auto, lp_fp8)) < 0.1


def test_token_ids_outside_the_vocabulary_are_rejected_up_front(path):
    llm = LLM(path, device="cpu")
    for params in (SamplingParams(stop_token_ids=[VOCAB + 5]), SamplingParams(logit_bias={VOCAB: 1.0})):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate([{"prompt_token_ids": [5, 6]}], params)
    assert not llm.engine.has_unfinished_requests()


def test_round_robin_admission_changes_when_tokens_come_not_which(path):
    """A request with n=8 on a 4-slot engine does not hold a later request behind all eight of its
    sequences, and both get exactly the tokens they get alone (seeded sampling, per-sequence generators)."""
    many = SamplingParams(n=8, temperature=0.8, seed=11, max_tokens=6, ignore_eos=True)
    one = SamplingParams(temperature=0.8, seed=5, max_tokens=6, ignore_eos=True)
    a_ids, b_ids = rand_ids(20, 1), rand_ids(9, 2)
    alone = LLM(path, device="cpu")
    a_alone = [c.token_ids for c in alone.generate([{"prompt_token_ids": a_ids}], many)[0].outputs]
    b_alone = alone.generate([{"prompt_token_ids": b_ids}], one)[0].outputs[0].token_ids

    engine = LLM(path, device="cpu", max_num_seqs=4).engine
    engine.add_request("a", a_ids, many)
    engine.add_request("b", b_ids, one)
    finished: dict[str, object] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert list(finished) == ["b", "a"]  # first come first served would finish "b" last
    assert finished["b"].outputs[0].token_ids == b_alone
    assert [c.token_ids for c in finished["a"].outputs] == a_alone


def test_kv_cache_memory_option_sets_the_cpu_budget(path):
    """`--kv-cache-memory` / LLM(kv_cache_memory_bytes=...): the CPU cache holds what the budget buys."""
    import argparse

    from fp8_turbo.engine.serving.cli import build_parser, memory_size

    assert [memory_size(s) for s in ("256MiB", "1.5GB", "2g", "4096", "64 KiB")] == [
        256 << 20, 1_500_000_000, 2_000_000_000, 4096, 64 << 10]
    for bad in ("", "-1MB", "12 parsecs", "0"):
        with pytest.raises(argparse.ArgumentTypeError, match="invalid size"):
            memory_size(bad)
    args = build_parser().parse_args(["serve", "--kv-cache-memory", "3MiB", "--lm-head-dtype", "bfloat16"])
    assert (args.kv_cache_memory, args.lm_head_dtype) == (3 << 20, "bfloat16")
    llm = LLM(path, device="cpu", kv_cache_memory_bytes=3 << 20)
    cfg = llm.engine.model_config
    per_block = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * 16  # K and V, fp32, 16 tokens
    assert llm.engine.kv_capacity_tokens == (3 << 20) // per_block * 16
    with pytest.raises(ValueError, match="kv_cache_memory_bytes must be > 0"):
        LLM(path, device="cpu", kv_cache_memory_bytes=-5)
