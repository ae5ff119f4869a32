"""fp8_gemm: the torch reference against a float64 oracle, the Triton kernel (TRITON_INTERPRET=1, in a
subprocess: see tests/test_quantize_fp8.py) against the reference, and on a GPU when there is one.

Tolerance. Both paths compute the same exact products of e4m3 values and scales; they differ only in
fp32 rounding: summation order, the scale applied per K block (kernel) or per element (reference).
Each is within gamma_n = n * 2^-24 (n = K + 4 roundings) of the exact sum times sum_k |a_k| |b_k|, so
    |c - ref| <= 2 (K + 4) 2^-24 (|A| @ |B|.T)          A, B: the dequantized operands
plus the rounding of the output dtype: bf16 < 1 ulp <= 2^-7 |c| (the interpreter truncates fp32 ->
bf16 instead of rounding; the GPU rounds), fp16 <= 2^-10 |c| + 2^-24. On the GPU, Hopper's fp8 MMA
keeps ~14 bits inside each BLOCK_K step before the fp32 promotion: 2^-11 (|A| @ |B|.T) there.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fp8_turbo.kernels.fp8 import dequantize_fp8, quantize_weight
from fp8_turbo.kernels.gemm import (
    DECODE_CONFIGS,
    GEMM_CONFIGS,
    PREFILL_CONFIGS,
    W8A16_CONFIGS,
    W8A16_DECODE_CONFIGS,
    W8A16_PREFILL_CONFIGS,
    _prune_configs,
    fp8_gemm,
    fp8_gemm_reference,
    fp8_weight_only_gemm,
    fp8_weight_only_gemm_reference,
    m_bucket,
    split_k_for,
)
from fp8_turbo.kernels.quantize import fake_quantize_fp8, quantize_fp8

ACT = ["tensor", "token", "group"]  # a_scale [1] | [M, 1] | [M, ceil(K/128)]
# b_scale [1] | [N, 1] | [ceil(N/128), ceil(K/128)] | "group": [N, ceil(K/128)] (fused unaligned shards)
WEIGHT = ["tensor", "channel", "block", "group"]
OUT_RTOL = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def operands(m, n, k, act, weight, seed=0, zero_rows=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]
    w = torch.randn(n, k, generator=g) * 0.05
    if zero_rows:
        x[::7] = 0.0
        w[::5] = 0.0
    a, a_scale = quantize_fp8(x, act)
    b, b_scale = quantize_fp8(w, "group") if weight == "group" else quantize_weight(w, weight)
    bias = torch.randn(n, generator=g)
    return a, b, a_scale, b_scale, bias


def assert_close_gemm(c, a, b, a_scale, b_scale, bias, out_dtype, mma_rel=None):
    """c against the reference with the tolerance of the module docstring."""
    k = a.shape[1]
    ref = fp8_gemm_reference(a, b, a_scale, b_scale, torch.float32, bias)
    mag = dequantize_fp8(a, a_scale).abs() @ dequantize_fp8(b, b_scale).abs().T  # [M, N]
    rel = mma_rel if mma_rel is not None else 2 * (k + 4) * 2.0**-24
    tol = rel * mag * 1.01 + OUT_RTOL[out_dtype] * ref.abs() + 2.0**-24
    if bias is not None:
        tol += 2.0**-23 * bias.float().abs()
    err = (c.float().cpu() - ref).abs()
    assert c.dtype == out_dtype and c.shape == ref.shape
    assert (err <= tol).all(), f"max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"


# ----------------------------------------------------------------------------------------------------
# reference (CPU, plain run)
# ----------------------------------------------------------------------------------------------------


def test_triton_kernel_in_interpreter():
    from test_quantize_fp8 import run_interp_tests

    run_interp_tests(__file__)


@pytest.mark.parametrize("act", ACT)
@pytest.mark.parametrize("weight", WEIGHT)
def test_reference_matches_float64(act, weight):
    a, b, a_scale, b_scale, bias = operands(37, 150, 300, act, weight, zero_rows=True)
    c = fp8_gemm(a, b, a_scale, b_scale, torch.float32, bias)  # CPU: the reference
    exact = dequantize_fp8(a, a_scale).double() @ dequantize_fp8(b, b_scale).double().T + bias.double()
    mag = dequantize_fp8(a, a_scale).abs().double() @ dequantize_fp8(b, b_scale).abs().double().T
    assert ((c.double() - exact).abs() <= (300 + 4) * 2.0**-24 * mag + 2.0**-23 * bias.abs().double()).all()
    assert (c[::7] == bias).all()  # all-zero activation rows: no NaN, just the bias


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_out_dtypes_and_quantization_error(out_dtype):
    torch.manual_seed(3)
    x, w = torch.randn(16, 256), torch.randn(64, 256) * 0.1
    a, a_scale = quantize_fp8(x, "token")
    b, b_scale = quantize_weight(w, "channel")
    c = fp8_gemm(a, b, a_scale, b_scale, out_dtype)
    assert c.dtype == out_dtype
    exact = x @ w.T
    sqnr = 10 * torch.log10(exact.pow(2).mean() / (c.float() - exact).pow(2).mean())
    assert sqnr > 25, f"FP8 W8A8 SQNR {sqnr:.1f} dB"


def test_cpu_model_path_matches_gemm():
    """The CPU model's linear (fake-quantized activations, dequantized fp32 weights, F.linear) is
    fp8_gemm up to fp32 rounding."""
    torch.manual_seed(4)
    x, w, bias = torch.randn(5, 300), torch.randn(70, 300), torch.randn(70)
    for act, weight in [("token", "channel"), ("tensor", "tensor"), ("group", "block")]:
        w_fp8, w_scale = quantize_weight(w, weight)
        y = F.linear(fake_quantize_fp8(x, act), dequantize_fp8(w_fp8, w_scale), bias)
        a, a_scale = quantize_fp8(x, act)
        c = fp8_gemm(a, w_fp8, a_scale, w_scale, torch.float32, bias)
        assert_close_gemm(c, a, w_fp8, a_scale, w_scale, bias, torch.float32)
        assert_close_gemm(y, a, w_fp8, a_scale, w_scale, bias, torch.float32)


def test_argument_errors():
    a, b, a_scale, b_scale, _ = operands(4, 8, 64, "token", "channel")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemm(a.float(), b, a_scale, b_scale)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        fp8_gemm(a, b[:, :32], a_scale, b_scale)
    with pytest.raises(ValueError, match="a_scale"):
        fp8_gemm(a, b, torch.ones(3, 1), b_scale)
    with pytest.raises(ValueError, match="b_scale"):  # K=64: 1xg groups give 4, 2 or 1 columns
        fp8_gemm(a, b, a_scale, torch.ones(8, 3))
    with pytest.raises(ValueError, match="b_scale"):  # E8M0 scales are per-row groups only
        fp8_gemm(a, b, a_scale, torch.ones(1).to(torch.float8_e8m0fnu))
    with pytest.raises(ValueError, match="b_scale"):
        fp8_gemm(a, b, a_scale, torch.ones(2, 1))
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_gemm(a, b, a_scale, b_scale, torch.int32)
    with pytest.raises(ValueError, match="bias"):
        fp8_gemm(a, b, a_scale, b_scale, bias=torch.ones(9))


def test_autotune_buckets_and_split_k():
    # decode sizes 1..16 share the 16-wide tile, hence one bucket: 3 decode buckets per weight shape
    assert [m_bucket(m) for m in (1, 2, 3, 5, 16, 17, 64, 65, 300, 10**5)] == [16, 16, 16, 16, 16, 32, 64, 128, 512, 8192]
    assert len({m_bucket(m) for m in range(1, 65)}) == 3
    for m in (1, 3, 16, 33, 64):  # decode: swapped tiles whose narrow side covers the tokens
        kept = _prune_configs(GEMM_CONFIGS, {"M_BUCKET": m_bucket(m)})
        assert kept and all(c in DECODE_CONFIGS and c.kwargs["BLOCK_N"] >= m for c in kept)
        kept = _prune_configs(W8A16_CONFIGS, {"M_BUCKET": m_bucket(m)})
        assert len(kept) == 1 and kept[0] in W8A16_DECODE_CONFIGS  # one config: nothing to benchmark
    assert _prune_configs(GEMM_CONFIGS, {"M_BUCKET": 128}) == PREFILL_CONFIGS
    assert _prune_configs(W8A16_CONFIGS, {"M_BUCKET": 4096}) == W8A16_PREFILL_CONFIGS


def test_autotune_key_is_the_bucket_and_the_weight_shape():
    """The swapped decode GEMM passes the token count as the kernel's N: the key must not contain it
    (it re-tuned every batch size 1..64, and a tuning run inside a CUDA-graph capture breaks it)."""
    from fp8_turbo.kernels import gemm

    for tuner in (gemm._fp8_gemm_autotuned, gemm._w8a16_gemm_autotuned):
        assert "N" not in tuner.keys and "M" not in tuner.keys, tuner.keys
        assert {"M_BUCKET", "N_KEY", "K"} <= set(tuner.keys)
    unspecialized = {p.name for p in gemm._fp8_gemm_kernel.params if p.do_not_specialize}
    assert {"M", "N", "M_BUCKET", "N_KEY"} <= unspecialized  # no new compile per token count


def test_gemm_launch_split_k_and_deterministic():
    """gemm_launch decides what the launcher runs: the heuristic's split, an explicit one (the split-K sweep
    of bench/gemm.py), and deterministic mode, which refuses a split (its rows must not depend on the batch)."""
    from fp8_turbo.kernels.gemm import DETERMINISTIC_CONFIG, PER_ROW, gemm_launch

    row = (PER_ROW, 1)
    assert gemm_launch(1, 1280, 8192, row, row, has_bias=False, num_sms=132).split_k == 4  # TP=8 qkv
    assert gemm_launch(1, 8192, 8192, row, row, has_bias=False, num_sms=132).split_k == 1  # TP=1 o: 128 tiles
    launch = gemm_launch(16, 8192, 8192, row, row, has_bias=False, split_k=2, num_sms=132)
    assert launch.swap and launch.split_k == 2 and dict(launch.meta)["SPLIT_K"] == 2 and launch.autotuned
    assert set(launch.configs) == {c for c in DECODE_CONFIGS if c.kwargs["BLOCK_N"] == 16}
    det = gemm_launch(16, 8192, 8192, row, row, has_bias=False, deterministic=True, num_sms=132)
    assert not det.swap and det.split_k == 1 and det.configs == (DETERMINISTIC_CONFIG,) and not det.autotuned
    with pytest.raises(ValueError, match="deterministic"):
        gemm_launch(1, 8192, 8192, row, row, has_bias=False, deterministic=True, split_k=2)
    with pytest.raises(ValueError, match="split_k"):
        gemm_launch(1, 8192, 8192, row, row, has_bias=False, split_k=0)


def test_weight_only_reference():
    torch.manual_seed(5)
    x, w, bias = torch.randn(7, 300), torch.randn(90, 300), torch.randn(90)
    for gran in ("channel", "tensor", "block"):
        b, b_scale = quantize_weight(w, gran)
        c = fp8_weight_only_gemm(x, b, b_scale, bias)  # CPU: the reference
        torch.testing.assert_close(c, x @ dequantize_fp8(b, b_scale).T + bias, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="e4m3"):
        fp8_weight_only_gemm(x, w, b_scale)
    # Llama-3.3-70B TP=8 qkv (N=1280, K=8192) on 132 SMs: 20 tiles -> split K 4 ways; TP=1 gate_up: none
    assert split_k_for(1, 1280, 8192, 132) == 4
    assert split_k_for(1, 57344, 8192, 132) == 1
    assert split_k_for(512, 1280, 8192, 132) == 1


# ----------------------------------------------------------------------------------------------------
# Triton kernel in the interpreter (collected only by the subprocess, as interp_*)
# ----------------------------------------------------------------------------------------------------

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None)


@SETTINGS
@given(
    m=st.integers(1, 300),
    n=st.integers(1, 300),
    k=st.integers(32, 400),
    act=st.sampled_from(ACT),
    weight=st.sampled_from(WEIGHT),
    has_bias=st.booleans(),
    out_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def interp_kernel_matches_reference(m, n, k, act, weight, has_bias, out_dtype, seed):
    a, b, a_scale, b_scale, bias = operands(m, n, k, act, weight, seed, zero_rows=seed % 2 == 0)
    bias = bias.to(out_dtype) if has_bias else None
    c = fp8_gemm(a, b, a_scale, b_scale, out_dtype, bias)  # Triton (interpreted)
    assert_close_gemm(c, a, b, a_scale, b_scale, bias, out_dtype)


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("act, weight", [("token", "channel"), ("group", "block"), ("tensor", "group")])
def interp_split_k(act, weight, split_k):
    from fp8_turbo.kernels.gemm import _check_args, _fp8_gemm_triton

    a, b, a_scale, b_scale, bias = operands(5, 77, 700, act, weight, seed=split_k)
    layouts = _check_args(a, b, a_scale, b_scale, torch.bfloat16, bias)
    c = _fp8_gemm_triton(a, b, a_scale, b_scale, *layouts, torch.bfloat16, bias, split_k=split_k)
    assert_close_gemm(c, a, b, a_scale, b_scale, bias, torch.bfloat16)


@settings(max_examples=6, deadline=None, derandomize=True, database=None)
@given(
    m=st.integers(1, 100),
    n=st.integers(1, 130),
    k=st.integers(32, 300),
    weight=st.sampled_from(WEIGHT),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def interp_weight_only_matches_reference(m, n, k, weight, has_bias, seed):
    """W8A16 (fp32 activations in the interpreter): exact products, fp32 sums as the GEMM tolerance."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    _, b, _, b_scale, bias = operands(m, n, k, "token", weight, seed)
    bias = bias if has_bias else None
    c = fp8_weight_only_gemm(x, b, b_scale, bias)  # Triton (interpreted)
    ref = fp8_weight_only_gemm_reference(x, b, b_scale, bias)
    mag = x.abs() @ dequantize_fp8(b, b_scale).abs().T
    tol = 2 * (k + 4) * 2.0**-24 * mag * 1.01 + 2.0**-24 + (2.0**-23 * bias.abs() if has_bias else 0)
    assert c.dtype == x.dtype and ((c - ref).abs() <= tol).all()


def interp_deterministic_rows_do_not_depend_on_the_batch():
    """deterministic=True: a row computed in a batch equals the same row computed alone (one config, no
    swap, no split-K); also for W8A16. Bit for bit where the row keeps its place in the 64-row tile: the
    interpreter's tl.dot is numpy's BLAS, whose rounding varies with a row's position in the tile (1 ulp);
    the GPU's MMA does not, and tests/test_fp8_gemm.py::test_gpu_deterministic_* checks any slice there."""
    a, b, a_scale, b_scale, bias = operands(70, 150, 256, "token", "channel", seed=9)
    full = fp8_gemm(a, b, a_scale, b_scale, torch.float32, bias, deterministic=True)
    for rows in (slice(0, 1), slice(0, 5), slice(64, 70)):
        part = fp8_gemm(a[rows], b, a_scale[rows], b_scale, torch.float32, bias, deterministic=True)
        assert torch.equal(part, full[rows])
    assert_close_gemm(full, a, b, a_scale, b_scale, bias, torch.float32)
    x = torch.randn(70, 256)
    full = fp8_weight_only_gemm(x, b, b_scale, deterministic=True)
    assert torch.equal(fp8_weight_only_gemm(x[64:66], b, b_scale, deterministic=True), full[64:66])


def interp_edge_values():
    """Saturated and subnormal operands, all-zero rows, exact +-448 products, tiny shapes."""
    x = torch.tensor([[448.0, -448.0, 500.0, -1e5, 2.0**-9, 2.0**-10, 3 * 2.0**-11, 0.0] * 4,
                      [0.0] * 32, [1.0] * 32])  # [3, 32]
    a, a_scale = quantize_fp8(x, "tensor", scale=torch.tensor([1.0]))  # static: saturates, subnormals
    assert a.float().abs().max() == 448.0
    b, b_scale = quantize_weight(torch.cat([torch.eye(32)[:5] * 448, torch.zeros(2, 32)]), "channel")
    c = fp8_gemm(a, b, a_scale, b_scale, torch.float32)
    assert_close_gemm(c, a, b, a_scale, b_scale, None, torch.float32)
    assert c[0, 0] == 448.0 * 448.0 and c[0, 2] == 448.0 * 448.0 and (c[1] == 0).all() and (c[:, 5:] == 0).all()
    for m, n, k in [(1, 1, 32), (1, 130, 33), (65, 1, 129), (64, 64, 128)]:
        for act, weight in [("token", "channel"), ("group", "block"), ("token", "group")]:
            a, b, a_scale, b_scale, bias = operands(m, n, k, act, weight, zero_rows=True)
            c = fp8_gemm(a, b, a_scale, b_scale, torch.bfloat16, bias)
            assert_close_gemm(c, a, b, a_scale, b_scale, bias, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 16, 64, 65, 300])
@pytest.mark.parametrize("act, weight", [(a, w) for a in ACT for w in WEIGHT])
def test_gpu_gemm_matches_reference(m, act, weight):
    a, b, a_scale, b_scale, bias = operands(m, 1000, 1100, act, weight, zero_rows=True)
    bias = bias.bfloat16()
    c = fp8_gemm(a.cuda(), b.cuda(), a_scale.cuda(), b_scale.cuda(), torch.bfloat16, bias.cuda())
    assert_close_gemm(c, a, b, a_scale, b_scale, bias, torch.bfloat16, mma_rel=2.0**-11)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("weight", WEIGHT)
def test_gpu_weight_only_matches_reference(m, weight):
    """W8A16 on the GPU: bf16 products are exact and the 16-bit MMA accumulates in fp32; bf16 output."""
    _, b, _, b_scale, bias = operands(m, 1000, 1100, "token", weight)
    x = torch.randn(m, 1100).bfloat16()
    bias = bias.bfloat16()
    c = fp8_weight_only_gemm(x.cuda(), b.cuda(), b_scale.cuda(), bias.cuda()).float().cpu()
    ref = fp8_weight_only_gemm_reference(x.float(), b, b_scale, bias.float())
    mag = x.float().abs() @ dequantize_fp8(b, b_scale).abs().T
    tol = 2 * (1100 + 4) * 2.0**-24 * mag + 2.0**-7 * ref.abs() + 2.0**-20
    assert ((c - ref).abs() <= tol).all(), ((c - ref).abs() / tol).max()


@pytest.mark.gpu
@gpu
def test_gpu_deterministic_rows_do_not_depend_on_the_batch():
    a, b, a_scale, b_scale, bias = operands(300, 1000, 1100, "token", "channel")
    a, b, a_scale, b_scale = a.cuda(), b.cuda(), a_scale.cuda(), b_scale.cuda()
    full = fp8_gemm(a, b, a_scale, b_scale, torch.bfloat16, deterministic=True)
    for rows in (slice(0, 1), slice(7, 23), slice(100, 300)):
        assert torch.equal(fp8_gemm(a[rows], b, a_scale[rows], b_scale, torch.bfloat16, deterministic=True), full[rows])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("granularity", ["token", "tensor", "group"])
def test_gpu_quantize_bit_exact(granularity):
    x = torch.randn(300, 1000) * torch.logspace(-4, 4, 300)[:, None]
    x[7] = 0
    q, scale = quantize_fp8(x.cuda(), granularity)
    q_ref, scale_ref = quantize_fp8(x, granularity)
    assert torch.equal(scale.cpu(), scale_ref)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
