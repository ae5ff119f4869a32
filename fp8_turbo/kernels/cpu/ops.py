"""Fused small ops of a decoder layer on CPU (C++ in ops.cpp / ops_kernel.h), and their launchers.

Entry points (CPU tensors, fp32 or bf16, one dtype per call; `isa=None` picks the instruction set as
the GEMM does):

    rms_norm(x, weight, eps, residual=None) -> out, or (out, h) with a residual
        h = x + residual (in x's dtype); out = weight * (h * rsqrt(mean(h^2) + eps)), the product
        rounded to x's dtype before the weight, as fp8_turbo/engine/model/model.py's RMSNorm.
    rotary_(x, cos, sin) -> x, rotated in place
        x [T, heads, D] (any strides, unit along D), cos/sin [T, D]: x * cos + cat(-x2, x1) * sin,
        bit for bit torch's result (the same fp32 / bf16 roundings, in the same order).
    silu_mul(x) -> out [..., I]
        x [..., 2I] = (gate, up): silu(gate) * up, silu(g) = g / (1 + exp(-g)) with our exp2.

Guarantees: each row is computed alone in a fixed order (the RMSNorm's sum of squares in 8 fp32 lanes
with one tree), so a row's result is bit-identical in any batch, with any thread count and on every
instruction set. Against torch: rotary is exact; RMSNorm differs by the summation order of the mean
(relative ~N 2^-24 in rsqrt); silu by our exp2 (a few 2^-24 relative).
"""
from __future__ import annotations

import torch

from fp8_turbo.kernels.cpu import build
from fp8_turbo.kernels.cpu.gemm import _isa as isa_index

_EXT = None
_DTYPES = (torch.float32, torch.bfloat16)


def extension():
    global _EXT
    if _EXT is None:
        _EXT = build.load("fp8t_cpu_ops", ["ops.cpp"], ["ops_kernel.h", "ops_types.h", "common.h", "vec8.h", "vec8_math.h"])
    return _EXT


def available() -> bool:
    return extension() is not None


def supports(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """True when these kernels take a call on x (and the other operands): CPU, fp32/bf16, one dtype, built."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and all(o.dtype == x.dtype for o in others)
            and available())


def rms_norm(x, weight, eps: float, residual=None, *, isa: str | None = None):
    out, h = extension().rms_norm(x, weight, float(eps), residual, isa_index(isa))
    return out if residual is None else (out, h)


def rotary_(x, cos, sin, *, isa: str | None = None) -> torch.Tensor:
    return extension().rotary_(x, cos, sin, isa_index(isa))


def silu_mul(x, *, isa: str | None = None) -> torch.Tensor:
    return extension().silu_mul(x, isa_index(isa))
