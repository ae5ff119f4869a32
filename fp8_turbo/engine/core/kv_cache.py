"""The paged KV-cache manager: fixed-size blocks, per-sequence block tables, ref counts, prefix caching.

Blocks hold `block_size` tokens of every layer's K and V. A full block is identified by a hash of its
token ids chained with the previous block's hash, so equal prefixes map to equal hashes. Blocks whose
ref count drops to 0 go to the back of an LRU free list but keep their contents and hash: a later
request with the same prefix takes them back (a cache hit); allocation takes from the front (evicting
the least recently used cached block).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from fp8_turbo.engine.core.sequence import Sequence


@dataclass(slots=True)
class KVCacheStats:
    num_blocks: int
    num_free_blocks: int  # ref count 0 (includes cached blocks that can be evicted)
    num_cached_blocks: int  # blocks with a prefix hash
    prefix_cache_queries: int  # full prompt blocks looked up
    prefix_cache_hits: int

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0, (num_blocks, block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        # Per sequence: hashes of its full blocks computed so far (the chain used for registering).
        self._seq_hashes: dict[int, list[int]] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queries --------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def stats(self) -> KVCacheStats:
        return KVCacheStats(self.num_blocks, self.num_free_blocks, len(self.hash_to_block),
                            self.prefix_cache_queries, self.prefix_cache_hits)

    # ---- prefix caching -------------------------------------------------------------------------
    def _chain_hashes(self, token_ids: list[int], num_full_blocks: int, start: int = 0, prev: int | None = None) -> list[int]:
        hashes = []
        bs = self.block_size
        for i in range(start, num_full_blocks):
            prev = hash((prev, tuple(token_ids[i * bs:(i + 1) * bs])))
            hashes.append(prev)
        return hashes

    def match_prefix(self, seq: Sequence) -> int:
        """On a sequence's first schedule: take the cached blocks of its longest cached prefix.

        Returns the number of tokens found (a multiple of block_size, always fewer than the
        sequence's tokens so that at least one token is computed and yields logits).
        """
        assert not seq.block_table, f"{seq} already has blocks"
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return 0  # prompt logprobs need every prompt position computed
        tokens = seq.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        hashes = self._chain_hashes(tokens, max_blocks)
        self.prefix_cache_queries += len(hashes)
        for h in hashes:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            self._take(block)
            seq.block_table.append(block)
        hit = len(seq.block_table)
        self.prefix_cache_hits += hit
        self._seq_hashes[seq.seq_id] = hashes[:hit]
        seq.num_computed_tokens = seq.num_cached_tokens = hit * self.block_size
        return seq.num_computed_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full with computed tokens."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= len(hashes):
            return
        new = self._chain_hashes(seq.all_token_ids, num_full, start=len(hashes), prev=hashes[-1] if hashes else None)
        for i, h in enumerate(new, start=len(hashes)):
            block = seq.block_table[i]
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
        hashes.extend(new)

    # ---- allocation -----------------------------------------------------------------------------
    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _allocate_block(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)  # least recently used
        h = self.block_hash[block]
        if h is not None:  # evict its cached contents
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table so the cache can hold num_computed_tokens + num_new_tokens."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        assert needed <= self.num_free_blocks, f"need {needed} blocks, {self.num_free_blocks} free: call can_allocate first"
        for _ in range(needed):
            seq.block_table.append(self._allocate_block())

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks beyond what the sequence's tokens need (speculative decoding allocated
        them for drafts that were rejected). They hold no prefix-cache entry (only blocks full of
        computed, accepted tokens are registered), so they go to the front of the free list, to be
        reused before any cached block is evicted."""
        keep = self.blocks_needed(seq.num_tokens)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            assert self.block_hash[block] is None and self.ref_counts[block] == 1, (block, self.ref_counts[block])
            self.ref_counts[block] = 0
            self.free_blocks[block] = None
            self.free_blocks.move_to_end(block, last=False)

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks (tail first, so its last blocks are evicted first)."""
        for block in reversed(seq.block_table):
            assert self.ref_counts[block] > 0, f"block {block} freed twice ({seq})"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        self._seq_hashes.pop(seq.seq_id, None)

    def check_consistency(self, live: list[Sequence]) -> None:
        """Assert that ref counts equal the block-table references of the live sequences (tests)."""
        expected = [0] * self.num_blocks
        for seq in live:
            for block in seq.block_table:
                expected[block] += 1
        assert expected == self.ref_counts, "ref counts disagree with block tables"
        free = {b for b in range(self.num_blocks) if expected[b] == 0}
        assert free == set(self.free_blocks), "free list disagrees with ref counts"


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (k, v) pair per layer, each [num_blocks, block_size, KVH, D]."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)]


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
