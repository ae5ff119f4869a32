"""Continuous batching: which sequences compute how many tokens in the next step.

Each step takes, first come first served, the running sequences (one decode token each, or the next
chunk of a long prompt) and then waiting ones, under a token budget (`max_num_batched_tokens`) and a
sequence cap (`max_num_seqs`). Long prompts are prefilled in chunks. When the cache runs out of blocks
the newest running sequence is preempted: its blocks are freed and it waits to be recomputed (its
cached prefix blocks usually survive, so recomputation is often a cache hit).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.core.kv_cache import BlockManager
from engine.core.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int = 2048, max_num_seqs: int = 64):
        assert max_num_batched_tokens > 0 and max_num_seqs > 0, (max_num_batched_tokens, max_num_seqs)
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.can_allocate(seq, n):
                victim = self.running.pop()  # newest first
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, n)
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1

        # New work only when nothing had to be preempted this step (the cache is not under pressure).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if not seq.block_table:
                bm.match_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not bm.can_allocate(seq, n):
                bm.free(seq)  # return prefix-cache hits; the sequence keeps waiting
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            bm.allocate(seq, n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
