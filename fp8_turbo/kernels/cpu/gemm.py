"""CPU FP8 GEMM and linear layers (C++ in gemm.cpp / gemm_kernel.h / vec8.h), and their launchers.

Entry points (CPU tensors; `isa=None` picks the instruction set, see `selected_isa`):

    fp8_gemm(a, b, a_scale, b_scale, out_dtype=torch.bfloat16, bias=None) -> c [M, N]
        kernels.fp8_gemm's contract: c = (a * a_scale) @ (b * b_scale).T (+ bias)
        a [M, K] e4m3, a_scale [1] | [M, 1] | [M, ceil(K/g)];  b [N, K] e4m3,
        b_scale [1] | [N, 1] | [ceil(N/128), ceil(K/128)] | [N, ceil(K/g)]; out fp32 | bf16 | fp16.
        Group scales (1 x g along K, g a power of two in 16..128, inferred from the shape) are fp32, or
        for b float8_e8m0fnu (MXFP8's power-of-two scales, one byte each).

    fp8_linear(x, weight, weight_scale, act="token", input_scale=None, bias=None, out_dtype=None,
               act_group=128, act_pow2=False)
        One call for a whole FP8 linear layer: y [..., N] = quant(x) @ (weight * weight_scale).T + bias.
        x [..., K] fp32 | bf16 (any leading dims; rows with unit stride along K).
        act: "token" (dynamic per-token), "tensor" (dynamic, or static with input_scale [1]),
             "group" (dynamic 1 x act_group), or None (weight-only: x used unquantized).
        act_pow2: dynamic activation scales rounded up to powers of two (MXFP8, kernels.fp8.pow2_scale).
        Quantization is kernels.quantize_fp8's, bit for bit, fused: x is read once and never
        materialized as e4m3. weight [N, K] e4m3 with weight_scale as b_scale above. bias [N] any
        float dtype. out_dtype defaults to x.dtype.

    dense_linear(x, weight, bias=None, out_dtype=None) -> y [..., N]
        x [..., K] fp32 | bf16, weight [N, K] bf16 | fp32 (e.g. lm_head / the tied embedding stored
        in bf16: half the bytes of fp32). Same fixed-order fp32 accumulation.

    quantize_fp8(x, granularity="token" | "tensor" | "group", group_size=128, scale=None, pow2=False)
        kernels.quantize_fp8 on CPU, bit for bit (scale = max(amax, 1e-12) / 448, rounded up to a power
        of two with pow2; x / scale rounded half to even onto the e4m3 grid, saturating at +-448).

Guarantees (all entry points):
  - Products of e4m3 values are exact in fp32, and every accumulation is fp32 in one fixed order over K:
    8 lanes (lane j takes k = j, j+8, ...; K zero-padded to a multiple of 16), one FMA per
    product, combined by a fixed tree; scales constant along K are applied after the tree,
    ((sum * a_scale) * b_scale), those changing along K per partial sum over the smaller group
    (16..128 of K); then bias.
  - Therefore a row's output is bit-identical whether it is computed alone or in a batch of any size
    at any position, with any thread count, on AVX-512, AVX2 or the portable path.
  - Against the torch reference (`kernels.gemm.fp8_gemm_reference`) the difference is fp32
    summation order only: |c - ref| <= ~2 (K + 4) 2^-24 sum_k |a_k| |b_k| (tests/test_cpu_gemm.py).
  - Threads (torch.get_num_threads()) split N; K is never split.
  - Decode sizes (M <= 4) read the weight once, decoding e4m3 in registers; larger M decode L2-sized
    panels of weight rows once and sweep them with register tiles.

Instruction set: the best the CPU has (AVX-512F > AVX2+FMA+F16C > portable C++), unless
FP8_TURBO_CPU_ISA=portable|avx2|avx512 or ATEN_CPU_CAPABILITY=default|avx2|avx512 asks for less.
When the extension cannot be built, `available()` is False and kernels.fp8_gemm runs the torch
reference.
"""
from __future__ import annotations

import logging
import os

import torch

from fp8_turbo.kernels.cpu import build

log = logging.getLogger(__name__)

ISAS = ("portable", "avx2", "avx512")
_ACT = {"fp8": 0, None: 1, "token": 2, "tensor": 3, "group": 4}  # gemm.cpp's Act
_GRANULARITY = {"token": 0, "tensor": 1, "group": 2}  # gemm.cpp's Granularity
FP8 = torch.float8_e4m3fn


_EXT = None  # the loaded extension module (build.load caches None when it cannot be built)
_ISA: int | None = None


def extension():
    global _EXT
    if _EXT is None:
        _EXT = build.load("fp8t_cpu_gemm", ["gemm.cpp"], ["gemm_kernel.h", "common.h", "vec8.h", "vec8_math.h"])
    return _EXT


def _ext():
    if _EXT is not None:
        return _EXT
    if extension() is None:
        raise RuntimeError("the CPU kernels are not available (their build failed: see the logged warning)")
    return _EXT


def available() -> bool:
    return extension() is not None


def supported_isas() -> tuple[str, ...]:
    return ISAS[: extension().best_isa() + 1] if available() else ()


def selected_isa() -> int:
    """Index into ISAS of the instruction set to run, read once per process: FP8_TURBO_CPU_ISA, else
    ATEN_CPU_CAPABILITY, else the best one; capped (with a warning) at what the CPU supports."""
    global _ISA
    if _ISA is None:
        best = extension().best_isa()
        env = os.environ.get("FP8_TURBO_CPU_ISA", "").lower() or os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
        want = {"": ISAS[best], "default": "portable", "scalar": "portable"}.get(env, env)
        if want not in ISAS:
            log.warning("CPU ISA %r unknown (allowed: %s); using %s", want, ISAS, ISAS[best])
            want = ISAS[best]
        _ISA = ISAS.index(want)
        if _ISA > best:
            log.warning("CPU ISA %s requested but this CPU supports up to %s", want, ISAS[best])
            _ISA = best
    return _ISA


def _isa(isa: str | None) -> int:
    if isa is None:
        return _ISA if _ISA is not None else selected_isa()
    if isa not in ISAS:
        raise ValueError(f"isa={isa!r}; allowed: {ISAS}")
    return ISAS.index(isa)


def fp8_gemm(a, b, a_scale, b_scale, out_dtype=torch.bfloat16, bias=None, *, isa: str | None = None) -> torch.Tensor:
    """kernels.fp8_gemm on CPU tensors (arguments already validated by kernels.gemm._check_args)."""
    return _ext().linear(a, 0, a_scale, b, b_scale, bias, out_dtype, _isa(isa), 128, False)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    act: str | None = "token",
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    act_group: int = 128,
    act_pow2: bool = False,
    isa: str | None = None,
) -> torch.Tensor:
    """y [..., N] = quantize(x, act) @ (weight * weight_scale).T + bias; see the module docstring."""
    code = _ACT.get(act)
    if code is None or act == "fp8":
        raise ValueError(f"fp8_linear: act={act!r}; allowed: 'token', 'tensor', 'group', None")
    if weight.dtype != FP8:
        raise ValueError(f"fp8_linear: weight must be float8_e4m3fn, got {weight.dtype}")
    return _ext().linear(x, code, input_scale, weight, weight_scale, bias, out_dtype or x.dtype, _isa(isa),
                         act_group, act_pow2)


def dense_linear(x, weight, bias=None, out_dtype=None, *, isa: str | None = None) -> torch.Tensor:
    """y [..., N] = x @ weight.T + bias with bf16 / fp32 weights; see the module docstring."""
    return _ext().linear(x, 1, None, weight, None, bias, out_dtype or x.dtype, _isa(isa), 128, False)


def quantize_fp8(x, granularity="token", group_size=128, scale=None, pow2=False, *, isa: str | None = None):
    """kernels.quantize_fp8 on a CPU tensor: (x_fp8 [..., K], scale [..., 1] | [..., G] | [1])."""
    if granularity not in _GRANULARITY:
        raise ValueError(f"quantize_fp8: granularity={granularity!r}; allowed: {tuple(_GRANULARITY)}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q, s = _ext().quantize(x2, _GRANULARITY[granularity], group_size, scale, _isa(isa), pow2)
    s = s if granularity == "tensor" else s.reshape(*x.shape[:-1], s.shape[-1])
    return q.reshape(x.shape), s
