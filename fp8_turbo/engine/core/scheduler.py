"""Continuous batching: which sequences compute how many tokens in the next step.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`). The policy:

1. Running sequences first, oldest admission first: one token each when decoding, or the next chunk of
   a prompt being prefilled. A prefill chunk takes at most `long_prefill_tokens` (a quarter of the
   budget) in this pass, so a huge prompt cannot take the whole step from the others.
2. Then waiting sequences, admitted round-robin across requests: each admission takes the next
   sequence of the request at the front of the rotation and moves that request to the back. A request
   with n = 128 sequences (or many waiting sequences) takes every other free slot while another
   request waits, never all of them; a request arriving behind it starts within a step or two. An
   admitted prompt gets a chunk of at most `long_prefill_tokens` as well.
3. Budget left over tops up the prefill chunks of step 1 and 2, in the same order; alone, a long
   prompt still gets the whole budget.

Speculative decoding (a `Drafter`, core/spec_decode.py): after steps 1 and 2, each decoding sequence
also gets the drafts the drafter proposes, as far as the budget and the free blocks left allow (drafts
never preempt or keep a sequence out), and computes its last token plus the drafts as one chunk.

Sequences keep the slots and blocks they hold (fairness never preempts). When the cache runs out of
blocks the newest running sequence is preempted: its blocks are freed and it goes back to the front
of the rotation to be recomputed (its cached prefix blocks usually survive, so that is often a cache
hit). No new sequence is admitted in a step that had to preempt.

What a sequence computes never depends on the others: the kernels are batch-invariant and a prompt
gives the same results however it is chunked, so fairness changes when tokens come, not which.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fp8_turbo.engine.core.kv_cache import BlockManager
from fp8_turbo.engine.core.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from fp8_turbo.engine.core.spec_decode import Drafter


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # the sequence's own tokens computed this step (drafts not included)
    # Speculative drafts computed after the sequence's last token (only when the chunk completes):
    # the step verifies them and keeps those that match what is sampled (core/spec_decode.py).
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens this sequence runs through the model this step, drafts included."""
        return self.num_new_tokens + len(self.draft_token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class WaitingQueue:
    """Sequences waiting to start, in a rotation of requests (round-robin admission).

    `popleft()` takes the first sequence of the request at the front and moves that request to the
    back. `appendleft()` (a preempted sequence) puts it first in its request and its request first in
    the rotation. `num_seqs` and `num_tokens` are plain counters, safe to read from another thread.
    """

    def __init__(self) -> None:
        self._requests: OrderedDict[str, deque[Sequence]] = OrderedDict()
        self.num_seqs = 0
        self.num_tokens = 0  # tokens the waiting sequences must compute (prompt, plus output after preemption)

    def __len__(self) -> int:
        return self.num_seqs

    def __iter__(self) -> Iterator[Sequence]:
        for seqs in self._requests.values():
            yield from seqs

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self._requests.get(seq.request_id, ())

    def _count(self, seq: Sequence, sign: int) -> None:
        self.num_seqs += sign
        self.num_tokens += sign * seq.num_tokens

    def append(self, seq: Sequence) -> None:
        self._requests.setdefault(seq.request_id, deque()).append(seq)
        self._count(seq, 1)

    def appendleft(self, seq: Sequence) -> None:
        self._requests.setdefault(seq.request_id, deque()).appendleft(seq)
        self._requests.move_to_end(seq.request_id, last=False)
        self._count(seq, 1)

    def peek(self) -> Sequence:
        return next(iter(self._requests.values()))[0]

    def popleft(self) -> Sequence:
        request_id, seqs = next(iter(self._requests.items()))
        seq = seqs.popleft()
        if seqs:
            self._requests.move_to_end(request_id)
        else:
            del self._requests[request_id]
        self._count(seq, -1)
        return seq

    def remove(self, seq: Sequence) -> None:
        seqs = self._requests[seq.request_id]
        seqs.remove(seq)
        if not seqs:
            del self._requests[seq.request_id]
        self._count(seq, -1)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int = 2048, max_num_seqs: int = 64,
                 drafter: Drafter | None = None):
        assert max_num_batched_tokens > 0 and max_num_seqs > 0, (max_num_batched_tokens, max_num_seqs)
        self.block_manager = block_manager
        self.drafter = drafter
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.long_prefill_tokens = max(1, max_num_batched_tokens // 4)
        self.waiting = WaitingQueue()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting_tokens(self) -> int:
        return self.waiting.num_tokens

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens for a sequence in steps 1-2 of the policy: a decode token, or a capped prefill chunk."""
        return min(seq.num_uncomputed_tokens, budget, self.long_prefill_tokens)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences, oldest first; preempt the newest when the cache is full.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
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

        # 2. Waiting sequences, round-robin across requests; only when nothing had to be preempted.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting.peek()
            if not seq.block_table:
                bm.match_prefix(seq)
            n = self._chunk(seq, budget)
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

        # Speculative drafts for the decoding sequences, from what the budget and the free blocks leave
        # (so drafts never cost another sequence its place); none in a step that had to preempt.
        if self.drafter is not None and not out.preempted:
            for item in out.scheduled:
                if budget <= 0:
                    break
                drafts = self._drafts(item, budget)
                if drafts:
                    bm.allocate(item.seq, 1 + len(drafts))
                    item.draft_token_ids = drafts
                    budget -= len(drafts)

        # 3. Top up prefill chunks with what is left, in the same order (never preempting for it).
        for item in out.scheduled:
            if budget <= 0:
                break
            extra = min(item.seq.num_uncomputed_tokens - item.num_new_tokens, budget)
            if extra > 0 and bm.can_allocate(item.seq, item.num_new_tokens + extra):
                item.num_new_tokens += extra
                bm.allocate(item.seq, item.num_new_tokens)
                budget -= extra
        return out

    def _drafts(self, item: ScheduledSeq, room: int) -> list[int]:
        """At most `room` drafts for a decoding sequence (its one uncomputed token is scheduled), if
        their blocks are free; [] otherwise."""
        seq = item.seq
        if item.num_new_tokens != 1 or seq.num_uncomputed_tokens != 1:
            return []
        drafts = self.drafter.propose(seq, room)
        while drafts and not self.block_manager.can_allocate(seq, 1 + len(drafts)):
            drafts.pop()
        return drafts

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
