"""Our fused CPU small ops (fp8_turbo/kernels/cpu/ops.py) against the torch code in fp8_turbo/engine/model/model.py, and
bit-identical rows whatever the batch, thread count and ISA.

Tolerances:
  - rotary: none. The kernel performs torch's operations (x1 cos - x2 sin, x2 cos + x1 sin, each
    product and the sum rounded to the dtype) in the same order: bit for bit.
  - RMSNorm: the mean of squares is a sum of N products in a different order than torch's: within
    2 (N + 2) 2^-24 relative on each side, so rsqrt within (N + 4) 2^-24 (half the relative error, plus
    the rsqrt's own rounding on each side), the output (one more product, and the weight) within
    (N + 8) 2^-24 |ref|; for bf16, where h * rsqrt and the weight product round to bf16, the
    two sides may land on neighbouring bf16 values of both products: 2 2^-7 |ref| (2 bf16 ulps).
  - SiLU(gate) * up: our exp2(-g log2 e) is within 4 2^-24 relative plus the rounding of the product
    -g log2(e) (|g| 2^-24 in the exponent); the division and 1 + e add 3 roundings, the product with up
    one more, and torch's exp its own few: (8 + 2 |g|) 2^-24 |ref|; bf16: the silu and the product
    each round to bf16, 2 2^-7 |ref|.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fp8_turbo.engine.model import model as model_mod
from fp8_turbo.kernels import cpu
from fp8_turbo.kernels.cpu import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason="the CPU kernels could not be built")

ISAS = cpu.supported_isas()
DTYPES = [torch.float32, torch.bfloat16]
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)
U = 2.0**-24


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def norm_reference(x, weight, eps):
    """fp8_turbo/engine/model/model.py RMSNorm's torch code."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotary_reference(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rows(m, n, g, dtype):
    x = torch.randn(m, n, generator=g) * torch.logspace(-3, 3, m)[:, None]
    return x.to(dtype)


def cos_sin(t, d, dtype, g):
    pos = torch.randint(0, 4096, (t,), generator=g).float()
    freqs = pos[:, None] * (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))[None, :]
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ------------------------------------------------------------------------------------ vs torch


@SETTINGS
@given(m=st.integers(1, 40), n=st.integers(1, 700), dtype=st.sampled_from(DTYPES), residual=st.booleans(),
       seed=st.integers(0, 2**16))
def test_rms_norm_matches_torch(m, n, dtype, residual, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = rows(m, n, g, dtype), (torch.rand(n, generator=g) + 0.5).to(dtype)
    if residual:
        r = rows(m, n, g, dtype)
        out, h = ops.rms_norm(x, w, 1e-5, r)
        assert torch.equal(h, x + r)  # the add is torch's, bit for bit
    else:
        out, h = ops.rms_norm(x, w, 1e-5), x
    ref = norm_reference(h, w, 1e-5).double()
    tol = ((n + 8) * U if dtype == torch.float32 else 2 * 2.0**-7) * ref.abs() * 1.01 + 2.0**-126
    err = (out.double() - ref).abs()
    assert (err <= tol).all(), f"max err/tol {(err / tol).max():.3g}"


@SETTINGS
@given(t=st.integers(1, 20), heads=st.integers(1, 12), d=st.sampled_from([2, 16, 40, 64, 128]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_rotary_is_torch_bit_for_bit(t, heads, d, dtype, seed):
    """Also on a strided view: q and k heads inside the fused qkv projection's output."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (heads + 1) * d, generator=g).to(dtype)
    x = qkv[:, : heads * d].view(t, heads, d)
    cos, sin = cos_sin(t, d, dtype, g)
    ref = rotary_reference(x, cos, sin)
    v_before = qkv[:, heads * d:].clone()
    out = ops.rotary_(x, cos, sin)
    assert out.data_ptr() == x.data_ptr()  # in place
    assert torch.equal(bits(out), bits(ref))
    assert torch.equal(qkv[:, heads * d:], v_before)


@SETTINGS
@given(m=st.integers(1, 20), i=st.integers(1, 600), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_silu_mul_matches_torch(m, i, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, 2 * i, generator=g) * 8).to(dtype)
    x[0, : min(i, 3)] = torch.tensor([-200.0, 200.0, 0.0])[: min(i, 3)].to(dtype)  # exp over/underflow, zero
    out = ops.silu_mul(x)
    gate, up = x.split(i, dim=-1)
    ref = (torch.nn.functional.silu(gate) * up).double()
    if dtype == torch.float32:
        tol = (8 + 2 * gate.double().abs()) * U * ref.abs() * 1.01 + 2.0**-126
    else:
        tol = 2 * 2.0**-7 * ref.abs() + 2.0**-126
    err = (out.double() - ref).abs()
    assert (err <= tol).all(), f"max err/tol {(err / tol).max():.3g}"


# ------------------------------------------------------------------------------------ invariance

OPS = {  # name -> (make inputs [M, ...] from a generator, call(inputs, isa) -> output)
    "rms_norm": (lambda m, g, dt: (rows(m, 576, g, dt), (torch.rand(576, generator=g) + 0.5).to(dt)),
                 lambda a, isa: ops.rms_norm(a[0], a[1], 1e-5, isa=isa)),
    "add_rms_norm": (lambda m, g, dt: (rows(m, 576, g, dt), (torch.rand(576, generator=g) + 0.5).to(dt),
                                       rows(m, 576, g, dt)),
                     lambda a, isa: torch.cat(ops.rms_norm(a[0], a[1], 1e-5, a[2], isa=isa), -1)),
    "rotary": (lambda m, g, dt: (torch.randn(m, 12, 64, generator=g).to(dt), *cos_sin(m, 64, dt, g)),
               lambda a, isa: ops.rotary_(a[0].clone(), a[1], a[2], isa=isa)),
    "silu_mul": (lambda m, g, dt: (rows(m, 2 * 1536, g, dt),), lambda a, isa: ops.silu_mul(a[0], isa=isa)),
}


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_alone_equals_row_in_any_batch(name, dtype):
    """Row 0 alone vs at every position of batches of 2..16, with 1 and 2 threads, on every ISA."""
    make, call = OPS[name]
    inputs = make(16, torch.Generator().manual_seed(0), dtype)
    rowwise = [i for i, t in enumerate(inputs) if t.shape[0] == 16]
    before = torch.get_num_threads()
    try:
        alone = call(tuple(t[:1] if i in rowwise else t for i, t in enumerate(inputs)), None)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for isa in ISAS:
                for size in (2, 5, 16):
                    for pos in {0, size // 2, size - 1}:
                        idx = list(range(1, size))
                        idx.insert(pos, 0)
                        batch = tuple(t[idx] if i in rowwise else t for i, t in enumerate(inputs))
                        out = call(batch, isa)
                        assert torch.equal(bits(out[pos:pos + 1]), bits(alone)), (threads, isa, size, pos)
    finally:
        torch.set_num_threads(before)


def test_model_hooks_use_the_kernels_and_fall_back(monkeypatch):
    """RMSNorm, apply_rotary and the MLP activation in fp8_turbo/engine/model/model.py: the kernel's result on CPU,
    the torch code when the kernels are unavailable, and the two agree within the tolerances above."""
    g = torch.Generator().manual_seed(5)
    norm = model_mod.RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576, generator=g) + 0.5)
    x, r = rows(4, 576, g, torch.float32), rows(4, 576, g, torch.float32)
    fused, h = norm(x, r)
    assert torch.equal(fused, ops.rms_norm(x, norm.weight, 1e-5, r)[0]) and torch.equal(h, x + r)
    q = torch.randn(3, 12, 64, generator=g)
    cos, sin = cos_sin(3, 64, torch.float32, g)
    ref_rot = rotary_reference(q, cos, sin)
    monkeypatch.setattr(ops, "available", lambda: False)
    plain, h2 = norm(x, r)
    assert torch.equal(h2, h) and torch.equal(plain, norm_reference(x + r, norm.weight, 1e-5))
    assert torch.allclose(plain, fused, rtol=600 * U, atol=0)
    assert torch.equal(model_mod.apply_rotary(q, cos, sin), ref_rot)
    monkeypatch.undo()
    assert torch.equal(model_mod.apply_rotary(q.clone(), cos, sin), ref_rot)
