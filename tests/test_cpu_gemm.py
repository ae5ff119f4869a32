"""Our CPU FP8 GEMM / linear kernels (kernels/cpu): against the torch reference, bit-exact fused
quantization, exact products, and bit-identical rows whatever the batch, thread count and ISA.

Tolerance (vs kernels.gemm.fp8_gemm_reference and plain fp32 matmuls). Both sides sum the same
products in fp32, in different orders. Each sum of K terms is within gamma = (K - 1) 2^-24 of the
exact one, relative to sum_k |a_k| |b_k| (A, B the dequantized operands); the products themselves
are exact on our side (e4m3 x e4m3) and at most 3 roundings off on the reference's (dequantized
operands, then their product), and each side rounds its scale multiplications (<= 3 more). So
    |ours - ref| <= 2 (K + 4) 2^-24 (|A| @ |B|.T)
plus 2^-23 |bias| for the bias addition and, for a bf16 output, one bf16 rounding on each side
(2^-7 |ref|). Batch invariance needs no tolerance: the comparisons there are bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fp8_turbo.kernels import cpu
from fp8_turbo.kernels.fp8 import FP8_DTYPE, dequantize_fp8, quantize_weight
from fp8_turbo.kernels.gemm import fp8_gemm, fp8_gemm_reference, fp8_weight_only_gemm, fp8_weight_only_gemm_reference
from fp8_turbo.kernels.quantize import quantize_fp8

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels could not be built (see the warning)")

ACT = ["tensor", "token", "group", "group32", "mx"]  # group: 1x128; group32: 1x32; mx: 1x32, power-of-two scales
# group: [N, ceil(K/128)] fp32 (fused unaligned shards); group32/group64: finer fp32 group scales along K;
# mx: MXFP8, [N, ceil(K/32)] float8_e8m0fnu power-of-two scales
WEIGHT = ["tensor", "channel", "block", "group", "group32", "group64", "mx"]
ACT_ARGS = {"tensor": ("tensor", 128, False), "token": ("token", 128, False), "group": ("group", 128, False),
            "group32": ("group", 32, False), "mx": ("group", 32, True)}  # -> quantize_fp8 / fp8_linear arguments
OUT_RTOL = {torch.float32: 0.0, torch.bfloat16: 2.0**-7}
ISAS = cpu.supported_isas() if cpu.available() else ()
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)


def weights(n, k, weight, g):
    w = torch.randn(n, k, generator=g) * 0.05
    w[::5] = 0.0  # all-zero rows: tiny scales, still finite
    if weight in ("group32", "group64"):
        return quantize_weight(w, "group", int(weight[5:]))
    return quantize_fp8(w, "group") if weight == "group" else quantize_weight(w, weight)


def quantize_act(x, act):
    granularity, group, pow2 = ACT_ARGS[act]
    return quantize_fp8(x, granularity, group, pow2=pow2)


def linear(x, b, b_scale, act, **kw):
    """cpu.fp8_linear with an ACT name (None: weight-only)."""
    if act is None:
        return cpu.fp8_linear(x, b, b_scale, None, **kw)
    granularity, group, pow2 = ACT_ARGS[act]
    return cpu.fp8_linear(x, b, b_scale, granularity, act_group=group, act_pow2=pow2, **kw)


def activations(m, k, g, dtype=torch.float32):
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m)[:, None]
    x[::7] = 0.0
    return x.to(dtype)


def tolerance(a_deq, b_deq, ref, bias, out_dtype):
    k = a_deq.shape[1]
    mag = a_deq.abs() @ b_deq.abs().T
    tol = 2 * (k + 4) * 2.0**-24 * mag * 1.01 + OUT_RTOL[out_dtype] * ref.abs() + 2.0**-126
    if bias is not None:
        tol += 2.0**-23 * bias.float().abs()
    return tol


def assert_within(c, ref, tol):
    err = (c.float() - ref).abs()
    assert c.shape == ref.shape
    assert (err <= tol).all(), f"max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


# ------------------------------------------------------------------------------------ vs reference


@SETTINGS
@given(
    m=st.integers(1, 300), n=st.integers(1, 200), k=st.integers(1, 400),
    act=st.sampled_from(ACT), weight=st.sampled_from(WEIGHT), has_bias=st.booleans(),
    out_dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16),
)
def test_fp8_gemm_matches_reference(m, n, k, act, weight, has_bias, out_dtype, seed):
    """kernels.fp8_gemm on CPU tensors (our kernel) vs the torch reference, every scale layout."""
    g = torch.Generator().manual_seed(seed)
    a, a_scale = quantize_act(activations(m, k, g), act)
    b, b_scale = weights(n, k, weight, g)
    bias = torch.randn(n, generator=g).to(out_dtype) if has_bias else None
    c = fp8_gemm(a, b, a_scale, b_scale, out_dtype, bias)
    assert c.dtype == out_dtype
    ref = fp8_gemm_reference(a, b, a_scale, b_scale, torch.float32, bias)
    assert_within(c, ref, tolerance(dequantize_fp8(a, a_scale), dequantize_fp8(b, b_scale), ref, bias,
                                    out_dtype))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 70])  # every small-M kernel, and the panel path
@pytest.mark.parametrize("act, weight", [(a, w) for a in ACT for w in WEIGHT])
def test_every_layout_and_path(m, act, weight):
    """Each scale layout through each kernel shape (ragged N > 128 and K > 128: several scale blocks)."""
    g = torch.Generator().manual_seed(m)
    a, a_scale = quantize_act(activations(m, 300, g), act)
    b, b_scale = weights(201, 300, weight, g)
    bias = torch.randn(201, generator=g)
    c = fp8_gemm(a, b, a_scale, b_scale, torch.float32, bias)
    ref = fp8_gemm_reference(a, b, a_scale, b_scale, torch.float32, bias)
    assert_within(c, ref, tolerance(dequantize_fp8(a, a_scale), dequantize_fp8(b, b_scale), ref, bias,
                                    torch.float32))


@SETTINGS
@given(
    m=st.integers(1, 300), n=st.integers(1, 200), k=st.integers(1, 400),
    act=st.sampled_from(ACT + [None]), weight=st.sampled_from(WEIGHT),
    x_dtype=st.sampled_from([torch.float32, torch.bfloat16]), has_bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_fp8_linear_matches_reference(m, n, k, act, weight, x_dtype, has_bias, seed):
    """The fused linear (activation quantization inside; act=None: weight-only) vs quantize_fp8 +
    the reference GEMM, or the dequantized weight's fp32 matmul."""
    g = torch.Generator().manual_seed(seed)
    x = activations(m, k, g, x_dtype)
    b, b_scale = weights(n, k, weight, g)
    bias = torch.randn(n, generator=g) if has_bias else None
    y = linear(x, b, b_scale, act, bias=bias)
    assert y.dtype == x_dtype and y.shape == (m, n)
    b_deq = dequantize_fp8(b, b_scale)
    if act is None:
        a_deq = x.float()
        ref = a_deq @ b_deq.T + (bias if bias is not None else 0)
    else:
        a, a_scale = quantize_act(x, act)
        a_deq = dequantize_fp8(a, a_scale)
        ref = fp8_gemm_reference(a, b, a_scale, b_scale, torch.float32, bias)
    assert_within(y, ref, tolerance(a_deq, b_deq, ref, bias, x_dtype))


@pytest.mark.parametrize("weight", WEIGHT)
def test_weight_only_gemm_dispatch(weight):
    """kernels.fp8_weight_only_gemm on CPU runs our weight-only kernel, within the bound of its reference."""
    g = torch.Generator().manual_seed(11)
    x, (b, b_scale), bias = activations(6, 300, g), weights(150, 300, weight, g), torch.randn(150, generator=g)
    y = fp8_weight_only_gemm(x, b, b_scale, bias)
    assert torch.equal(y, cpu.fp8_linear(x, b, b_scale, None, bias=bias))
    ref = fp8_weight_only_gemm_reference(x, b, b_scale, bias)
    assert_within(y, ref, tolerance(x, dequantize_fp8(b, b_scale), ref, bias, torch.float32))


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_dense_linear_matches_matmul(w_dtype, x_dtype):
    """bf16 / fp32 weights (lm_head, tied embedding) vs an fp32 matmul."""
    g = torch.Generator().manual_seed(1)
    for m, n, k in [(1, 1000, 576), (3, 37, 33), (9, 130, 300), (64, 77, 17)]:
        x, w = activations(m, k, g, x_dtype), (torch.randn(n, k, generator=g) * 0.05).to(w_dtype)
        bias = torch.randn(n, generator=g)
        ref = x.float() @ w.float().T + bias
        y = cpu.dense_linear(x, w, bias, out_dtype=torch.float32)
        assert_within(y, ref, tolerance(x.float(), w.float(), ref, bias, torch.float32))


def test_products_are_exact():
    """K = 1: every e4m3 x e4m3 product (all 254 x 254 finite byte pairs) comes out exact."""
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    a = codes.view(FP8_DTYPE).reshape(-1, 1)
    one = torch.ones(1)
    for isa in ISAS:
        c = cpu.fp8_gemm(a, a, one, one, torch.float32, isa=isa)
        exact = a.double() @ a.double().T
        assert torch.equal(c.double(), exact), isa


def test_edge_values():
    """Saturation, subnormals, all-zero rows, +-448 x 448, K = 0."""
    x = torch.tensor([[448.0, -448.0, 500.0, -1e5, 2.0**-9, 2.0**-10, 3 * 2.0**-11, 0.0] * 4, [0.0] * 32, [1.0] * 32])
    b, b_scale = quantize_weight(torch.cat([torch.eye(32)[:5] * 448, torch.zeros(2, 32)]), "channel")
    y = cpu.fp8_linear(x, b, b_scale, "tensor", input_scale=torch.tensor([1.0]), out_dtype=torch.float32)
    assert y[0, 0] == 448.0 * 448.0 and y[0, 2] == 448.0 * 448.0 and y[0, 3] == -448.0 * 448.0
    assert (y[1] == 0).all() and (y[:, 5:] == 0).all()
    empty = cpu.fp8_linear(torch.zeros(3, 0), torch.zeros(4, 0, dtype=FP8_DTYPE), torch.ones(4, 1), bias=torch.ones(4))
    assert torch.equal(empty, torch.ones(3, 4))
    assert cpu.fp8_linear(torch.zeros(0, 8), b[:, :8].contiguous(), b_scale).shape == (0, 7)


# ------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("granularity, group, pow2", [("token", 128, False), ("tensor", 128, False),
                                                     ("group", 128, False), ("group", 32, False), ("group", 64, False),
                                                     ("group", 32, True), ("token", 128, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_bit_exact(granularity, group, pow2, dtype):
    """Bytes and scales equal kernels.quantize_fp8's exactly: ties, subnormals, saturation, zeros;
    group sizes and power-of-two (MXFP8) scales."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 333, generator=g) * torch.logspace(-30, 30, 50)[:, None]
    x[3] = 0.0
    x[4, :20] = torch.tensor([448.0, 464.0, 480.0, 2.0**-10, 3 * 2.0**-10, 2.0**-7 * 17, -0.0, 1e-40, 7.5, 8.5] * 2)
    x[5, :64] = 448.0 * 2.0**-3  # amax / 448 is a power of two: pow2 keeps it
    x = x.to(dtype)
    ref_q, ref_s = quantize_fp8(x, granularity, group, pow2=pow2)
    if pow2:  # the plain scale rounded up to the next power of two (kept when it is one already)
        plain = quantize_fp8(x, granularity, group)[1]
        assert (ref_s >= plain).all() and (ref_s < 2 * plain).all()
        assert torch.equal(torch.frexp(ref_s).mantissa, torch.full_like(ref_s, 0.5))
    for isa in ISAS:
        q, s = cpu.quantize_fp8(x, granularity, group, pow2=pow2, isa=isa)
        assert torch.equal(s, ref_s), isa
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), isa
    static = torch.tensor([0.5])  # a static scale that saturates the large rows
    ref_q, _ = quantize_fp8(x, "tensor", scale=static)
    q, s = cpu.quantize_fp8(x, "tensor", scale=static)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, static)


@pytest.mark.parametrize("act, weight", [("token", "channel"), ("tensor", "tensor"), ("group", "block"), ("token", "group"),
                                         ("group32", "group32"), ("mx", "mx"), ("token", "group64"), ("group", "mx")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_quantization_is_quantize_then_gemm(act, weight, dtype):
    """fp8_linear(x) == fp8_gemm(quantize_fp8(x)) bit for bit: the fused quantization produces the
    very e4m3 values (and scales) of kernels.quantize_fp8."""
    g = torch.Generator().manual_seed(5)
    x = activations(37, 300, g, dtype)
    b, b_scale = weights(70, 300, weight, g)
    a, a_scale = quantize_act(x, act)
    expected = fp8_gemm(a, b, a_scale, b_scale, torch.float32)
    assert torch.equal(bits(linear(x, b, b_scale, act, out_dtype=torch.float32)), bits(expected))


def test_group_scales_of_one_value_equal_channel_scales():
    """A group scale that is the same along K computes what the per-channel scale does, up to where the
    scale is applied (per 32-block partial sum vs after the tree): within the summation bound, and
    MXFP8 with power-of-two scales equal to fp32 group scales of the same values bit for bit."""
    g = torch.Generator().manual_seed(9)
    x = activations(5, 320, g)
    w = torch.randn(40, 320, generator=g) * 0.05
    q, s = quantize_weight(w, "channel")
    s = torch.exp2(torch.round(torch.log2(s)))  # powers of two, so E8M0 holds them exactly
    s32 = s.expand(40, 10).contiguous()
    y_channel = cpu.fp8_linear(x, q, s, None, out_dtype=torch.float32)
    y_group = cpu.fp8_linear(x, q, s32, None, out_dtype=torch.float32)
    y_mx = cpu.fp8_linear(x, q, s32.to(torch.float8_e8m0fnu), None, out_dtype=torch.float32)
    assert torch.equal(bits(y_group), bits(y_mx))
    ref = x @ dequantize_fp8(q, s).T
    assert_within(y_channel, ref, tolerance(x, dequantize_fp8(q, s), ref, None, torch.float32))
    assert_within(y_group, ref, tolerance(x, dequantize_fp8(q, s), ref, None, torch.float32))


def test_bad_group_scales_are_refused():
    """A scale whose shape fits no layout, or E8M0 scales that are not per-row groups, raise."""
    b, _ = quantize_weight(torch.randn(8, 96), "channel")
    x = torch.randn(2, 96)
    with pytest.raises(RuntimeError, match="fits none"):
        cpu.fp8_linear(x, b, torch.ones(8, 7), None)
    with pytest.raises(RuntimeError, match="e8m0"):
        cpu.fp8_linear(x, b, torch.ones(1).to(torch.float8_e8m0fnu), None)
    with pytest.raises(RuntimeError, match="act_group"):
        cpu.fp8_linear(x, b, torch.ones(8, 1), "group", act_group=48)


# ------------------------------------------------------------------------------------ batch invariance

CASES = [  # (name, k, call(x [M, K] fp32, isa) -> y): every weight dtype, act and scale layout
    ("w8a8 token/channel", 576, lambda w: lambda x, isa: cpu.fp8_linear(x, *w["channel"], "token", bias=w["bias"], isa=isa)),
    ("w8a8 group/block", 300, lambda w: lambda x, isa: cpu.fp8_linear(x, *w["block"], "group", isa=isa)),
    ("w8a8 static tensor", 300, lambda w: lambda x, isa: cpu.fp8_linear(x, *w["tensor"], "tensor", torch.tensor([0.01]), isa=isa)),
    ("w8a8 token/group bf16 out", 300, lambda w: lambda x, isa: cpu.fp8_linear(x, *w["group"], "token", out_dtype=torch.bfloat16, isa=isa)),
    ("w8a8 mx", 300, lambda w: lambda x, isa: cpu.fp8_linear(x, *w["mx"], "group", act_group=32, act_pow2=True, isa=isa)),
    ("w8a8 group64", 576, lambda w: lambda x, isa: cpu.fp8_linear(x, *w["group64"], "group", act_group=64, isa=isa)),
    ("weight-only", 257, lambda w: lambda x, isa: cpu.fp8_linear(x, *w["channel"], None, bias=w["bias"], isa=isa)),
    ("weight-only group32", 577, lambda w: lambda x, isa: cpu.fp8_linear(x, *w["group32"], None, bias=w["bias"], isa=isa)),
    ("weight-only mx", 300, lambda w: lambda x, isa: cpu.fp8_linear(x, *w["mx"], None, isa=isa)),
    ("dense bf16", 577, lambda w: lambda x, isa: cpu.dense_linear(x, w["bf16"], isa=isa)),
    ("dense fp32", 100, lambda w: lambda x, isa: cpu.dense_linear(x, w["fp32"], w["bias"], isa=isa)),
]


def make_case(k, n=131, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    return {
        "channel": quantize_weight(w, "channel"), "block": quantize_weight(w, "block"),
        "tensor": quantize_weight(w, "tensor"), "group": quantize_fp8(w, "group"),
        "group32": quantize_weight(w, "group", 32), "group64": quantize_weight(w, "group", 64),
        "mx": quantize_weight(w, "mx"),
        "bf16": w.bfloat16(), "fp32": w, "bias": torch.randn(n, generator=g),
    }


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name, k, make", CASES, ids=[c[0] for c in CASES])
def test_row_alone_equals_row_in_any_batch(name, k, make, threads):
    """Row r computed alone == row r inside batches of 2..64 at every position, bit for bit."""
    fn = make(make_case(k))
    g = torch.Generator().manual_seed(7)
    pool = torch.randn(64, k, generator=g) * torch.logspace(-2, 2, 64)[:, None]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone = torch.cat([fn(pool[r : r + 1], None) for r in range(64)])
        for size in (2, 3, 4, 5, 8, 13, 31, 64):
            perm = torch.randperm(64, generator=g)[:size]
            batch = fn(pool[perm], None)
            assert torch.equal(bits(batch), bits(alone[perm])), f"batch of {size}"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name, k, make", CASES, ids=[c[0] for c in CASES])
def test_isas_and_threads_agree(name, k, make):
    """portable == AVX2 (== AVX-512 where the CPU has it), 1 thread == 2 threads, bit for bit, on a
    decode (M = 3) and a prefill (M = 70) batch."""
    fn = make(make_case(k, n=203, seed=1))
    g = torch.Generator().manual_seed(8)
    before = torch.get_num_threads()
    for m in (3, 70):
        x = torch.randn(m, k, generator=g)
        results = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for isa in ISAS:
                results[(isa, threads)] = bits(fn(x, isa))
        torch.set_num_threads(before)
        first = next(iter(results.values()))
        for key, r in results.items():
            assert torch.equal(r, first), f"M={m}: {key} differs from {next(iter(results))}"
    assert "avx2" in ISAS or "avx2" not in open("/proc/cpuinfo").read(), "AVX2 CPU but no AVX2 path"


def test_isa_environment_override(monkeypatch):
    """FP8_TURBO_CPU_ISA / ATEN_CPU_CAPABILITY pick the instruction set (capped at the CPU's)."""
    from fp8_turbo.kernels.cpu import gemm

    for env, want in [({"ATEN_CPU_CAPABILITY": "default"}, "portable"), ({"FP8_TURBO_CPU_ISA": "scalar"}, "portable"),
                      ({"ATEN_CPU_CAPABILITY": "avx2"}, "avx2" if "avx2" in ISAS else ISAS[-1]),
                      ({"FP8_TURBO_CPU_ISA": "avx512"}, ISAS[-1]), ({}, ISAS[-1])]:
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        monkeypatch.delenv("FP8_TURBO_CPU_ISA", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(gemm, "_ISA", None)  # the choice is read once per process
        assert gemm.ISAS[cpu.selected_isa()] == want, env


def test_fallback_when_unavailable(monkeypatch, caplog, tmp_path):
    """A build that fails logs one warning and yields None (so does FP8_TURBO_CPU_KERNELS=0), and
    kernels.fp8_gemm then runs the torch reference."""
    import fp8_turbo.kernels.cpu
    from fp8_turbo import kernels
    from fp8_turbo.kernels.cpu import build

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(build, "_compile", broken)
    monkeypatch.setenv("FP8_TURBO_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_loaded", {})
    with caplog.at_level("WARNING"):
        assert build.load("fp8t_never_built", ["gemm.cpp"]) is None
        assert build.load("fp8t_never_built", ["gemm.cpp"]) is None
    assert sum("unavailable" in r.message for r in caplog.records) == 1
    monkeypatch.setenv("FP8_TURBO_CPU_KERNELS", "0")
    assert build.load("fp8t_turned_off", ["gemm.cpp"]) is None and not list(tmp_path.rglob("fp8t_turned_off*"))

    monkeypatch.setattr(kernels.cpu, "available", lambda: False)
    b, s = quantize_weight(torch.randn(4, 40), "channel")
    assert torch.equal(fp8_gemm(b, b, s, s, torch.float32), fp8_gemm_reference(b, b, s, s, torch.float32))
