"""e4m3 numerics of fp8_turbo/kernels/fp8.py (torch only, no Triton): rounding, saturation, scales, weight quantization.

torch's own fp32 -> float8_e4m3fn cast rounds half to even and is exact on the grid; it is the oracle
for round_to_e4m3 on values already clamped to +-448 (the cast itself does not saturate).
"""
from __future__ import annotations

import pytest
import torch

from fp8_turbo.kernels.fp8 import (
    E4M3_MAX,
    FP8_DTYPE,
    compute_scale,
    dequantize_fp8,
    expand_scale,
    group_of,
    pow2_scale,
    quantize_weight,
    round_to_e4m3,
)


def e4m3_grid() -> torch.Tensor:
    """All finite e4m3 values, sorted (-448 .. 448; +-0 once)."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    return grid[grid.isfinite()].unique()


def edge_values() -> torch.Tensor:
    """Grid values, midpoints (ties: round to even), values 1 fp32 ulp either side of the midpoints,
    subnormals and below, and values beyond 448 that must saturate."""
    grid = e4m3_grid()
    mid = (grid[1:] + grid[:-1]) / 2
    up = torch.nextafter(mid, torch.full_like(mid, float("inf")))
    down = torch.nextafter(mid, torch.full_like(mid, float("-inf")))
    extra = torch.tensor([448.0, 449.0, 463.9, 464.0, 465.0, 1e4, 3e38, float("inf"),
                          2.0**-9, 2.0**-10, 3 * 2.0**-11, 2.0**-12, 1e-30, 1e-40, 0.0])
    return torch.cat([grid, mid, up, down, extra, -extra])


def test_round_to_e4m3_matches_torch_cast_on_edges_and_random():
    x = torch.cat([edge_values(), torch.randn(100_000) * 50, torch.randn(100_000) * 1e-3])
    got = round_to_e4m3(x)
    expect = x.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).float()
    bad = got != expect
    assert not bad.any(), f"{bad.sum()} mismatches, e.g. x={x[bad][:5]} got={got[bad][:5]} expect={expect[bad][:5]}"
    # the sign of zero survives (-0.0 quantizes to the e4m3 bit pattern 0x80, like the cast)
    assert torch.equal(round_to_e4m3(torch.tensor([-0.0])).to(FP8_DTYPE).view(torch.uint8), torch.tensor([0x80], dtype=torch.uint8))


def test_round_to_e4m3_ties_saturation_subnormals():
    # ties to even: 17 is halfway between 16 and 18 (mantissa of 16 is even); 19 -> 20;
    # 2^-10 is halfway between 0 and 2^-9 -> 0; 3 * 2^-10 halfway between 2^-9 and 2^-8 -> 2^-8
    x = torch.tensor([17.0, 19.0, 2.0**-10, 3 * 2.0**-10, 464.0, 500.0, -1e9, 5 * 2.0**-9])
    expect = torch.tensor([16.0, 20.0, 0.0, 2.0**-8, 448.0, 448.0, -448.0, 5 * 2.0**-9])
    assert torch.equal(round_to_e4m3(x), expect)
    assert torch.isnan(round_to_e4m3(torch.tensor([float("nan")]))).all()
    # every value is on the grid: the cast afterwards is exact
    y = round_to_e4m3(torch.randn(10_000) * 300)
    assert torch.equal(y.to(FP8_DTYPE).float(), y)


def test_compute_scale_guards_zero():
    s = compute_scale(torch.tensor([0.0, 448.0, 1e-30, 896.0]))
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s[1] == 1.0 and s[3] == 2.0
    assert s[0] == s[2]  # both floored at MIN_AMAX / 448
    assert s.dtype == torch.float32


@pytest.mark.parametrize("granularity, scale_shape", [("channel", (300, 1)), ("tensor", (1,)), ("block", (3, 2))])
def test_quantize_weight_layouts_and_error(granularity, scale_shape):
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-3, 2, 300)[:, None]
    w[7] = 0.0  # all-zero row: no NaN/Inf anywhere
    w_fp8, scale = quantize_weight(w, granularity)
    assert w_fp8.dtype == FP8_DTYPE and w_fp8.shape == w.shape
    assert tuple(scale.shape) == scale_shape and scale.dtype == torch.float32
    assert torch.isfinite(scale).all() and torch.isfinite(w_fp8.float()).all()
    deq = dequantize_fp8(w_fp8, scale)
    assert (deq[7] == 0).all()
    # each scale group's amax maps to exactly +-448 (up to the fp32 rounding of amax / scale)
    assert w_fp8.float().abs().max() == E4M3_MAX
    # error bound: half an e4m3 step relative (2^-4), plus the subnormal step 2^-9 * scale absolute
    err = (deq - w).abs()
    bound = w.abs() * 2.0**-4 + expand_scale(scale, 300, 200) * 2.0**-10 * 1.0001
    assert (err <= bound).all()


def test_quantize_weight_rejects_nan_inf_and_bad_args():
    for bad in (float("nan"), float("inf")):
        w = torch.ones(4, 8)
        w[2, 3] = bad
        with pytest.raises(ValueError, match="NaN/Inf"):
            quantize_weight(w)
    with pytest.raises(ValueError, match="granularity"):
        quantize_weight(torch.ones(4, 8), "row")
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.ones(8))


def test_quantize_weight_saturates_large_values_and_keeps_bf16_input():
    w = torch.tensor([[1e6, -3e5, 1.0, 0.0]], dtype=torch.bfloat16)
    w_fp8, scale = quantize_weight(w, "tensor")
    assert w_fp8.float()[0, 0] == 448.0 and w_fp8.float()[0, 1] < 0
    assert torch.allclose(dequantize_fp8(w_fp8, scale), w.float(), rtol=2.0**-4, atol=scale.item() * 2.0**-9)


def test_expand_scale_layouts_and_errors():
    s = torch.arange(6, dtype=torch.float32).view(2, 3)
    e = expand_scale(s, 130, 300)  # 128x128 blocks
    assert e.shape == (130, 300) and e[127, 127] == 0 and e[128, 256] == 5 and e[0, 128] == 1
    g = expand_scale(torch.arange(3.0).repeat(5, 1), 5, 300)  # 1x128 groups
    assert g.shape == (5, 300) and g[4, 299] == 2
    assert expand_scale(torch.tensor([2.0]), 5, 7).shape == (1, 1)
    with pytest.raises(ValueError, match="fits no layout"):
        expand_scale(torch.ones(4, 4), 5, 300)


def test_pow2_scale_rounds_up_to_a_power_of_two():
    s = torch.tensor([1.0, 0.75, 2.0**-40, 3.0 * 2.0**100, float("nan"), compute_scale(torch.tensor(1e-30)).item()])
    p = pow2_scale(s)
    assert p[:4].tolist() == [1.0, 1.0, 2.0**-40, 2.0**102] and torch.isnan(p[4])
    assert p[5] >= s[5] and p[5] < 2 * s[5] and torch.frexp(p[5]).mantissa == 0.5
    x = torch.rand(10_000) * torch.logspace(-30, 30, 10_000)
    q = pow2_scale(x)
    assert (q >= x).all() and (q < 2 * x).all() and (torch.frexp(q).mantissa == 0.5).all()


@pytest.mark.parametrize("granularity, group", [("group", 32), ("group", 64), ("group", 128), ("mx", 32)])
def test_quantize_weight_group_and_mx(granularity, group):
    """Per-group scales along K: one per `group` weights of a row (the last group ragged); MXFP8: E8M0
    powers of two, never below amax / 448, so no weight clips; the same error bound as the coarser layouts."""
    torch.manual_seed(1)
    w = torch.randn(40, 200) * torch.logspace(-3, 2, 200)[None, :]  # magnitude grows along K
    w[3] = 0.0
    w_fp8, scale = quantize_weight(w, granularity, group)
    groups = -(-200 // group)
    assert tuple(scale.shape) == (40, groups)
    assert scale.dtype == (torch.float8_e8m0fnu if granularity == "mx" else torch.float32)
    amax = torch.nn.functional.pad(w.abs(), (0, groups * group - 200)).view(40, groups, group).amax(2)
    if granularity == "mx":
        assert (scale.float() >= compute_scale(amax)).all() and (scale.float() < 2 * compute_scale(amax)).all()
        assert (w_fp8.float().abs() <= E4M3_MAX).all()
    else:
        assert torch.equal(scale, compute_scale(amax))
        assert (w_fp8.float().abs().amax(1) == E4M3_MAX)[torch.arange(40) != 3].all()
    deq = dequantize_fp8(w_fp8, scale)
    assert torch.equal(deq, dequantize_fp8(w_fp8, scale, 32 if granularity == "mx" else group))  # shape infers g
    err = (deq - w).abs()
    assert (err <= w.abs() * 2.0**-4 + expand_scale(scale, 40, 200) * 2.0**-10 * 1.0001).all()
    # finer groups never give a larger scale than the row's, so never a coarser grid
    channel = quantize_weight(w, "channel")[1]
    assert (expand_scale(scale, 40, 200) <= 2 * expand_scale(channel, 40, 200)).all()


def test_group_of_is_unique():
    for cols in range(1, 700):
        for g in (16, 32, 64, 128):
            n = -(-cols // g)
            if n > 1:
                assert group_of(cols, n) == g, (cols, g)
