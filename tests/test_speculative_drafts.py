"""Speculative decoding without a model: the n-gram proposer, the config, the drafter's limits and
back-off, and the scheduler + block manager with drafts that get rejected (no block leaked, no
rejected token in the prefix cache, drafts never preempt). The exactness of whole generations is in
tests/test_speculative.py."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fp8_turbo.engine.core.kv_cache import BlockManager
from fp8_turbo.engine.core.scheduler import Scheduler
from fp8_turbo.engine.core.sequence import Sequence
from fp8_turbo.engine.core.spec_decode import Drafter, SpeculativeConfig, ngram_continuation
from fp8_turbo.engine.sampling.params import SamplingParams


def ngram(tokens: list[int], n_min: int = 2, n_max: int = 4, k: int = 3) -> list[int]:
    return ngram_continuation(np.asarray(tokens, dtype=np.int64), n_min, n_max, k)


def reference_ngram(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    """Prompt lookup written plainly: the longest n first, the latest earlier occurrence."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[-n:]
        for i in range(len(tokens) - n - 1, -1, -1):
            if tokens[i:i + n] == suffix:
                return tokens[i + n:i + n + k]
    return []


def test_ngram_examples():
    assert ngram([1, 2, 3, 4, 5, 1, 2]) == [3, 4, 5]  # the tokens after the earlier "1 2"
    assert ngram([1, 2, 3, 4, 5, 9, 2, 3]) == [4, 5, 9]
    assert ngram([7, 1, 2, 8, 1, 2, 9, 1, 2]) == [9, 1, 2]  # the latest occurrence
    assert ngram([5, 1, 2, 3, 6, 2, 3, 7, 1, 2, 3]) == [6, 2, 3]  # "1 2 3" beats the later "2 3"
    assert ngram([1, 2, 3, 9, 3]) == []  # a 1-gram is below prompt_lookup_min
    assert ngram([1, 2, 3, 9, 3], n_min=1) == [9, 3]
    assert ngram([4, 4, 4]) == [4]  # the occurrence may overlap the suffix; one token follows it
    assert ngram([1, 2]) == [] and ngram([]) == []


@settings(max_examples=200, deadline=None, derandomize=True)
@given(tokens=st.lists(st.integers(0, 4), max_size=60), n_min=st.integers(1, 3), extra=st.integers(0, 3),
       k=st.integers(1, 6))
def test_ngram_matches_the_plain_search(tokens, n_min, extra, k):
    assert ngram(tokens, n_min, n_min + extra, k) == reference_ngram(tokens, n_min, n_min + extra, k)


def test_config_parsing_and_errors():
    assert SpeculativeConfig.parse(None) is None
    config = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, '
                                     '"prompt_lookup_min": 2}')
    assert (config.num_speculative_tokens, config.prompt_lookup_max, config.prompt_lookup_min) == (4, 4, 2)
    assert SpeculativeConfig.parse(config) is config
    for value, message in [("{", "not valid JSON"), ([1], "must be a dict"),
                           ({"method": "eagle"}, "method must be one of ('ngram',)"),
                           ({"num_speculative_tokens": 0}, "num_speculative_tokens must be an integer in [1, 64]"),
                           ({"num_speculative_tokens": True}, "num_speculative_tokens must be an integer"),
                           ({"prompt_lookup_min": 5}, "prompt_lookup_min (5) must not exceed prompt_lookup_max (4)"),
                           ({"jump_forward": "yes"}, "jump_forward must be true or false"),
                           ({"num_speculative": 3}, "unknown keys ['num_speculative']")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            SpeculativeConfig.parse(value)


def decoding(prompt: list[int], output: list[int], **params) -> Sequence:
    seq = Sequence("r", 0, prompt, SamplingParams(**params))
    seq.output_token_ids = list(output)
    return seq


def test_drafts_respect_max_tokens_the_context_and_the_room():
    drafter = Drafter(SpeculativeConfig(num_speculative_tokens=4), max_model_len=100)
    prompt = list(range(20)) + [0, 1]  # "0 1" occurred: 2, 3, 4, 5 follow
    assert drafter.propose(decoding(prompt, [], max_tokens=None), room=99) == [2, 3, 4, 5]
    assert drafter.propose(decoding(prompt, [], max_tokens=None), room=2) == [2, 3]
    # max_tokens 3 with none generated: the last token plus 2 drafts, then the bonus token, make 3
    assert drafter.propose(decoding(prompt[:-1], [1], max_tokens=3), room=99) == [2]
    assert drafter.propose(decoding(prompt[:-1], [1], max_tokens=2), room=99) == []
    short = Drafter(SpeculativeConfig(num_speculative_tokens=4), max_model_len=len(prompt) + 2)
    assert short.propose(decoding(prompt, [], max_tokens=None), room=99) == [2]  # positions stay < max_model_len


def test_drafting_backs_off_after_rejections_and_recovers():
    drafter = Drafter(SpeculativeConfig(num_speculative_tokens=3), max_model_len=10_000)
    seq = decoding(list(range(10)) + [3, 4], [], max_tokens=None)
    assert drafter.propose(seq, 99) == [5, 6, 7]
    drafter.observe(seq, 3, 0)  # nothing kept: pause 2 steps
    assert [drafter.propose(seq, 99) for _ in range(3)] == [[], [], [5]]  # then one draft (1 + accepted)
    drafter.observe(seq, 1, 0)  # again: pause 4
    assert [drafter.propose(seq, 99) for _ in range(5)] == [[]] * 4 + [[5]]
    drafter.observe(seq, 1, 1)  # kept: grow by one per fully accepted run
    assert drafter.propose(seq, 99) == [5, 6]
    drafter.observe(seq, 2, 2)
    assert drafter.propose(seq, 99) == [5, 6, 7]
    drafter.observe(seq, 3, 1)  # partly kept: one more than kept
    assert drafter.propose(seq, 99) == [5, 6]
    for _ in range(10):
        drafter.observe(seq, 1, 0)
    assert seq.draft_state.pause == 32  # the pause is capped
    assert (drafter.num_drafts, drafter.num_draft_tokens, drafter.num_accepted_tokens) == (15, 20, 4)
    assert drafter.accepted_per_position == [3, 1, 0]


class ForcedGrammar:
    """A grammar stand-in whose next tokens are forced (a JSON key with its quotes and colon)."""

    def __init__(self, forced: list[int]):
        self.forced = forced

    def forced_tokens(self) -> list[int]:
        return list(self.forced)

    def valid_prefix(self, tokens: list[int]) -> int:
        n = 0
        while n < len(tokens) and n < len(self.forced) and tokens[n] == self.forced[n]:
            n += 1
        return n if n < len(self.forced) else len(tokens)  # past the forced run anything goes


def test_grammar_forced_drafts_are_not_capped_by_num_speculative_tokens():
    """A forced run is drafted whole (within the room, the context and max_tokens), n-gram drafts may
    follow it up to num_speculative_tokens more, and the per-position counts grow to the longest run."""
    drafter = Drafter(SpeculativeConfig(num_speculative_tokens=2), max_model_len=100)
    prompt = list(range(20)) + [7, 8]  # after the forced run "30 31 ... 35", nothing matches
    seq = decoding(prompt, [], max_tokens=None)
    seq.grammar = ForcedGrammar([30, 31, 32, 33, 34, 35])
    assert drafter.propose(seq, room=99) == [30, 31, 32, 33, 34, 35]
    assert seq.draft_state.forced == 6
    assert drafter.propose(seq, room=4) == [30, 31, 32, 33]
    capped = decoding(prompt, [], max_tokens=3)  # 2 drafts, then the bonus token makes 3
    capped.grammar = ForcedGrammar([30, 31, 32, 33, 34, 35])
    assert drafter.propose(capped, room=99) == [30, 31]
    seq.grammar = ForcedGrammar([9, 10])  # "9 10" then the prompt's "11 12" by n-gram lookup
    seq.prompt_token_ids = list(range(20)) + [7, 8]
    assert drafter.propose(seq, room=99) == [9, 10, 11, 12]
    drafter.observe(seq, 6, 6)
    assert drafter.accepted_per_position == [1] * 6


class FakeDrafter:
    """Proposes `k` random drafts (from a small alphabet, so some are right) for every sequence."""

    def __init__(self, rng: random.Random, k: int):
        self.rng, self.k = rng, k

    def propose(self, seq: Sequence, room: int) -> list[int]:
        return [self.rng.randrange(3) for _ in range(min(self.k, room))]


def simulate(seed: int, num_blocks: int, budget: int, k: int, n_requests: int) -> tuple[int, int, int]:
    """Random requests through the scheduler with drafts; the 'model' samples tokens from {0, 1, 2}, so
    drafts are accepted at random. After every step: ref counts consistent, every block a sequence
    holds is needed by its tokens, and every block in the prefix cache holds computed tokens of a
    sequence's accepted text (its hash is that of the sequence's own tokens). Returns (drafted, kept,
    preemptions)."""
    rng = random.Random(seed)
    block_size = 4
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_batched_tokens=budget, max_num_seqs=8, drafter=FakeDrafter(rng, k))
    prefix = [rng.randrange(3) for _ in range(2 * block_size)]
    live, drafted, kept, preemptions = [], 0, 0, 0
    for i in range(n_requests):  # each fits the cache alone (the engine refuses longer ones)
        prompt = prefix + [rng.randrange(3) for _ in range(rng.randint(1, 12))]
        max_tokens = rng.randint(1, min(20, num_blocks * block_size - len(prompt)))
        seq = Sequence(f"r{i}", 0, prompt, SamplingParams(max_tokens=max_tokens))
        sched.add(seq)
        live.append(seq)
    for _ in range(5_000):
        out = sched.schedule()
        assert out.num_tokens <= budget
        preemptions += len(out.preempted)
        for item in out.scheduled:
            seq, drafts = item.seq, item.draft_token_ids
            assert not out.preempted or not drafts, "drafts in a step that preempted"
            completes = item.completes
            seq.num_computed_tokens += item.num_new_tokens
            assert len(seq.block_table) == bm.blocks_needed(seq.num_computed_tokens + len(drafts))
            if not completes:
                bm.cache_full_blocks(seq)
                continue
            accepted = 0
            while True:  # the engine's acceptance walk with random samples
                token = rng.randrange(3)
                seq.output_token_ids.append(token)
                done = len(seq.output_token_ids) >= seq.params.max_tokens
                matched = accepted < len(drafts) and token == drafts[accepted]
                if done or not matched:
                    accepted += matched
                    break
                accepted += 1
            drafted, kept = drafted + len(drafts), kept + accepted
            if done:
                sched.finish(seq)
                live.remove(seq)
                continue
            seq.num_computed_tokens += accepted
            bm.trim(seq)
            bm.cache_full_blocks(seq)
            # the computed tokens' blocks stay, and no block only a rejected draft needed
            assert bm.blocks_needed(seq.num_computed_tokens) <= len(seq.block_table) <= bm.blocks_needed(seq.num_tokens)
        bm.check_consistency(live)
        for seq in live:
            hashes = bm._chain_hashes(seq.all_token_ids, seq.num_computed_tokens // block_size)
            for block, h in zip(seq.block_table, hashes):
                assert bm.block_hash[block] in (None, h), "a cached block does not hold its sequence's tokens"
        if not sched.has_unfinished():
            break
    assert not live
    assert bm.num_free_blocks == num_blocks
    bm.check_consistency([])
    return drafted, kept, preemptions


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(8, 40), budget=st.integers(8, 64), k=st.integers(1, 4),
       n_requests=st.integers(1, 10))
def test_rejected_drafts_leave_no_block_and_no_cache_entry(seed, num_blocks, budget, k, n_requests):
    simulate(seed, num_blocks, budget, k, n_requests)


def test_the_simulation_drafts_rejects_and_preempts():
    """The property above is not vacuous: drafts are both kept and rejected, and a small cache preempts."""
    drafted, kept, preemptions = simulate(seed=1, num_blocks=10, budget=32, k=3, n_requests=10)
    assert 0 < kept < drafted and preemptions > 0


def test_trimmed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=6, block_size=4)
    cached = Sequence("c", 0, list(range(9)), SamplingParams())
    bm.allocate(cached, 9)
    cached.num_computed_tokens = 9
    bm.cache_full_blocks(cached)
    bm.free(cached)  # two cached blocks at the back of the free list, one plain
    seq = Sequence("s", 0, [50, 51, 52], SamplingParams())
    bm.allocate(seq, 3 + 6)  # room for 6 drafts: 3 blocks
    seq.num_computed_tokens = 3
    rejected = seq.block_table[1:]
    bm.trim(seq)  # nothing accepted: one block is enough again
    assert len(seq.block_table) == 1
    assert set(list(bm.free_blocks)[:2]) == set(rejected)
    assert len(bm.hash_to_block) == 2  # the cached prefix survived
