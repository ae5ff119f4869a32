"""Scheduler + block manager properties, driven without a model: random add/step/abort/finish
sequences never leak or double-free a block, ref counts stay consistent, and every request finishes."""
from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from fp8_turbo.engine.core.kv_cache import BlockManager
from fp8_turbo.engine.sampling.params import SamplingParams
from fp8_turbo.engine.core.scheduler import Scheduler, WaitingQueue
from fp8_turbo.engine.core.sequence import Sequence


def simulate(seed: int, num_blocks: int, block_size: int, budget: int, max_seqs: int, n_requests: int,
             shared_prefix: bool) -> None:
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    capacity = num_blocks * block_size
    prefix = [rng.randrange(100) for _ in range(3 * block_size)] if shared_prefix else []
    pending, live, done = [], [], []
    for i in range(n_requests):
        max_tokens = rng.randint(1, 12)
        prompt_len = rng.randint(1, max(1, min(60, capacity - max_tokens - len(prefix))))
        prompt = prefix + [rng.randrange(100) for _ in range(prompt_len)]
        pending.append(Sequence(f"r{i}", 0, prompt, SamplingParams(max_tokens=max_tokens)))

    for _ in range(10_000):
        if pending and rng.random() < 0.5:
            seq = pending.pop(0)
            sched.add(seq)
            live.append(seq)
        if live and rng.random() < 0.05:  # abort a random live request
            seq = live.pop(rng.randrange(len(live)))
            sched.finish(seq)
            done.append(seq)
        out = sched.schedule()
        for item in out.scheduled:
            completes = item.completes
            item.seq.num_computed_tokens += item.num_new_tokens
            bm.cache_full_blocks(item.seq)
            assert item.seq.num_computed_tokens <= len(item.seq.block_table) * block_size
            if completes:
                item.seq.output_token_ids.append(rng.randrange(100))
                if len(item.seq.output_token_ids) >= item.seq.params.max_tokens:
                    sched.finish(item.seq)
                    live.remove(item.seq)
                    done.append(item.seq)
        assert out.num_tokens <= budget and len(out.scheduled) <= max_seqs
        bm.check_consistency(live)
        if not pending and not sched.has_unfinished():
            break
    assert not live and not pending, f"{len(live)} requests never finished"
    assert len(done) == n_requests
    assert bm.num_free_blocks == num_blocks
    bm.check_consistency([])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(6, 40), block_size=st.sampled_from([4, 16]),
       budget=st.integers(8, 96), max_seqs=st.integers(1, 8), n_requests=st.integers(1, 20),
       shared_prefix=st.booleans())
def test_random_workloads_never_leak_and_always_finish(seed, num_blocks, block_size, budget, max_seqs, n_requests,
                                                       shared_prefix):
    simulate(seed, num_blocks, block_size, budget, max_seqs, n_requests, shared_prefix)


def test_prefix_blocks_are_shared_and_evicted_lru():
    bm = BlockManager(8, 4)
    a = Sequence("a", 0, list(range(10)), SamplingParams())
    bm.match_prefix(a)
    bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)  # blocks of tokens 0-3 and 4-7 are now cached
    b = Sequence("b", 0, list(range(9)) + [99], SamplingParams())
    assert bm.match_prefix(b) == 8 and b.block_table == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.stats().num_cached_blocks == 2
    c = Sequence("c", 0, list(range(9)), SamplingParams())  # still a hit after both freed
    assert bm.match_prefix(c) == 8
    bm.free(c)
    for i in range(3):  # fill the cache with other content: cached blocks are evicted last-used-last
        s = Sequence(f"x{i}", 0, [50 + i] * 8, SamplingParams())
        bm.allocate(s, 8)
    assert bm.stats().num_cached_blocks <= 2


# ---- fairness: the round-robin policy of the scheduler's docstring -------------------------------------
def _seqs(request_id: str, n: int, prompt_len: int) -> list[Sequence]:
    return [Sequence(request_id, i, list(range(prompt_len)), SamplingParams(max_tokens=4)) for i in range(n)]


def _step(sched: Scheduler) -> list[tuple[str, int, int]]:
    """One scheduler step with the model's part simulated; (request, index, tokens) per scheduled sequence."""
    out = sched.schedule()
    for item in out.scheduled:
        completes = item.completes
        item.seq.num_computed_tokens += item.num_new_tokens
        if completes:
            item.seq.output_token_ids.append(0)
    return [(item.seq.request_id, item.seq.index, item.num_new_tokens) for item in out.scheduled]


def test_waiting_requests_are_admitted_round_robin():
    # A step holds two 8-token prompts (budget 16). Request "big" has n=8 and arrives first.
    sched = Scheduler(BlockManager(256, 4, enable_prefix_caching=False), max_num_batched_tokens=16, max_num_seqs=64)
    sched.long_prefill_tokens = 8  # whole 8-token prompts (the default cap would be 16 // 4 = 4)
    for seq in _seqs("big", 8, 8) + _seqs("small", 1, 8):
        sched.add(seq)
    assert len(sched.waiting) == 9 and sched.num_waiting_tokens == 9 * 8
    # First come first served would have run big 0 and big 1 here, and "small" only in the fifth step.
    assert _step(sched) == [("big", 0, 8), ("small", 0, 8)]
    sched.add(_seqs("late", 1, 8)[0])
    # Decodes first, then big's next sequence and, in the same step, the request that just arrived.
    assert _step(sched) == [("big", 0, 1), ("small", 0, 1), ("big", 1, 8), ("late", 0, 6)]
    assert sched.waiting.num_seqs == len(list(sched.waiting)) == 6 and sched.num_waiting_tokens == 6 * 8


def test_a_huge_prompt_shares_the_step_and_still_gets_the_budget_alone():
    sched = Scheduler(BlockManager(256, 16, enable_prefix_caching=False), max_num_batched_tokens=64, max_num_seqs=8)
    [huge] = _seqs("huge", 1, 1000)
    sched.add(huge)
    assert [i.num_new_tokens for i in sched.schedule().scheduled] == [64]  # alone: the whole budget
    huge.num_computed_tokens += 64
    [short] = _seqs("short", 1, 10)
    sched.add(short)
    step = {item.seq.request_id: item.num_new_tokens for item in sched.schedule().scheduled}
    # The short prompt is prefilled in the very next step; the huge one takes the rest of the budget.
    assert step == {"huge": 54, "short": 10}


def test_preempted_sequences_go_back_to_the_front():
    q = WaitingQueue()
    a, b = _seqs("a", 2, 4), _seqs("b", 1, 4)
    for seq in a + b:
        q.append(seq)
    assert q.popleft() is a[0] and q.popleft() is b[0]
    q.appendleft(a[0])
    assert q.peek() is a[0] and len(q) == 2 and q.num_tokens == 8
    q.remove(a[1])
    assert list(q) == [a[0]] and q.num_tokens == 4
