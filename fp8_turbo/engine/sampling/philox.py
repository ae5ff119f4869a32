"""Counter-based random numbers for seeded sampling: Philox4x32-10, keyed by a request's seed and
counted by the position of the token being drawn.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; the generator of
cuRAND and of torch's CUDA RNG) maps a 128-bit counter and a 64-bit key to 128 random bits with no
state in between. A seeded sequence's draw for the token at position p uses key = seed and
counter = (p, block): the numbers depend on (seed, p) only, never on how many draws came before,
so sampling one position per step and verifying several positions in one step (speculative
decoding) draw the same numbers. Vectorised over rows in numpy (32-bit words held in 64-bit lanes,
so each 32 x 32 -> 64-bit product is exact); checked against Random123's known-answer vectors.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # round multipliers
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # key schedule (Weyl sequence)
_LOW = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
_ROUNDS = 10


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = _ROUNDS) -> np.ndarray:
    """counter [N, 4] and key [N, 2] (uint32 words, word 0 first) -> [N, 4] uint32 random words."""
    words = _philox(*(counter[:, i].astype(np.uint64) for i in range(4)),
                    *(key[:, i].astype(np.uint64) for i in range(2)), rounds)
    return np.stack(words, axis=1).astype(np.uint32)


def _philox(c0, c1, c2, c3, k0, k1, rounds: int = _ROUNDS) -> tuple[np.ndarray, ...]:
    """The rounds on uint64 arrays holding 32-bit words (each 32 x 32 -> 64-bit product is exact)."""
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & _LOW, (k1 + _W1) & _LOW
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = (p1 >> _SHIFT) ^ c1 ^ k0, p1 & _LOW, (p0 >> _SHIFT) ^ c3 ^ k1, p0 & _LOW
    return c0, c1, c2, c3


def seeded_uniforms(seeds: Sequence[int], positions: Sequence[int], count: int) -> np.ndarray:
    """[N, count] float32 in (0, 1]: row i's numbers are a function of (seeds[i], positions[i]) only.

    seeds in [0, 2^64), positions in [0, 2^64). Number j of a row is word j % 4 of Philox block
    j // 4 (counter = (position low, position high, block, 0), key = (seed low, seed high)); its top
    24 bits give (w + 1) * 2^-24, exactly representable in float32, the grid of torch.rand's floats.
    """
    n, blocks = len(seeds), -(-count // 4)
    seed = np.repeat(np.asarray(seeds, dtype=np.uint64), blocks)  # [N * blocks], row-major by block
    pos = np.repeat(np.asarray(positions, dtype=np.uint64), blocks)
    block = np.tile(np.arange(blocks, dtype=np.uint64), n)
    words = _philox(pos & _LOW, pos >> _SHIFT, block, np.zeros_like(block), seed & _LOW, seed >> _SHIFT)
    words = np.stack(words, axis=1).reshape(n, blocks * 4)[:, :count]  # [N, count] 32-bit words in uint64
    return ((words >> np.uint64(8)) + np.uint64(1)).astype(np.float32) * np.float32(2.0 ** -24)
