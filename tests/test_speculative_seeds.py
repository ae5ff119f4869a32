"""Position-keyed randomness for seeded sampling (fp8_turbo/engine/sampling/philox.py).

Speculative decoding verifies several positions of a sequence in one step; a seeded request stays
exact only if the numbers drawn for the token at position p depend on (seed, p) alone. Checked here:
Philox4x32-10 against Random123's published known-answer vectors (tests/kat_vectors of
github.com/DEShawResearch/random123), then the uniforms' keying, grid and statistics.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fp8_turbo.engine.sampling.philox import philox4x32, seeded_uniforms

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter (4 words), key (2), expected (4).
KAT = [
    ([0x00000000, 0x00000000, 0x00000000, 0x00000000], [0x00000000, 0x00000000],
     [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
    ([0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff], [0xffffffff, 0xffffffff],
     [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
    ([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0],
     [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]),
]


def test_philox_matches_random123_known_answers():
    counter = np.array([c for c, _, _ in KAT], dtype=np.uint32)
    key = np.array([k for _, k, _ in KAT], dtype=np.uint32)
    expected = np.array([e for _, _, e in KAT], dtype=np.uint32)
    assert np.array_equal(philox4x32(counter, key), expected)


def test_uniforms_are_philox_words_on_the_float32_grid():
    """Number j of a row is word j % 4 of block j // 4, counter (position low, high, block, 0), key
    (seed low, high), mapped to (w >> 8 + 1) 2^-24: in (0, 1], exactly the 24-bit grid."""
    seed, position, count = 0x0123456789ABCDEF, (7 << 32) + 5, 10
    u = seeded_uniforms([seed], [position], count)[0]
    blocks = np.array([[5, 7, b, 0] for b in range(3)], dtype=np.uint32)
    keys = np.array([[0x89ABCDEF, 0x01234567]] * 3, dtype=np.uint32)
    words = philox4x32(blocks, keys).reshape(-1)[:count]
    assert np.array_equal(u, ((words >> 8) + 1).astype(np.float32) * np.float32(2.0 ** -24))
    extremes = seeded_uniforms([0, 2**64 - 1, 2**63 + 3], [2**64 - 1, 0, 12], 17)
    assert extremes.dtype == np.float32 and (extremes > 0).all() and (extremes <= 1).all()


def test_a_rows_numbers_depend_on_its_seed_and_position_only():
    g = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**62, (40,), generator=g).tolist()
    positions = torch.randint(0, 5000, (40,), generator=g).tolist()
    together = seeded_uniforms(seeds, positions, 17)
    for i in range(40):
        assert np.array_equal(seeded_uniforms([seeds[i]], [positions[i]], 17)[0], together[i])
        assert np.array_equal(seeded_uniforms([seeds[i]], [positions[i]], 5)[0], together[i, :5])
    # a different seed or position gives different numbers
    assert not np.array_equal(seeded_uniforms([seeds[0] + 1], [positions[0]], 17)[0], together[0])
    assert not np.array_equal(seeded_uniforms([seeds[0]], [positions[0] + 1], 17)[0], together[0])


@pytest.mark.parametrize("axis", ["positions", "seeds"])
def test_uniforms_are_uniform_and_pairwise_independent(axis):
    """Chi-square over 20 bins of each number, and over 10 x 10 bins of a number and the next
    position's (or the next seed's): the statistic of a uniform sample exceeds these bounds with
    probability 1e-4 (chi-square quantiles for 19 and 99 degrees of freedom: 49.0 and 157.4)."""
    n = 20000
    seeds, positions = (([3] * n, range(n)) if axis == "positions" else (range(n), [3] * n))
    u = seeded_uniforms(list(seeds), list(positions), 17)  # [n, 17]
    for j in (0, 1, 16):
        counts = np.bincount((u[:, j] * 20 - 1e-6).astype(int), minlength=20)
        assert ((counts - n / 20) ** 2 / (n / 20)).sum() < 49.0, j
    pairs = np.bincount((u[:-1, 0] * 10 - 1e-6).astype(int) * 10 + (u[1:, 0] * 10 - 1e-6).astype(int), minlength=100)
    expected = (n - 1) / 100
    assert ((pairs - expected) ** 2 / expected).sum() < 157.4
