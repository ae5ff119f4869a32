"""Dynamic FP8 (e4m3) activation quantization: Triton kernels, launcher, torch reference.

    quantize_fp8(x, granularity="token" | "tensor" | "group", group_size=128, scale=None, pow2=False)
        -> (x_fp8, scale)
        x [..., K] fp32/bf16/fp16 -> x_fp8 [..., K] float8_e4m3fn and an fp32 scale:
        "token" [..., 1] (one per row), "group" [..., ceil(K/group_size)], "tensor" [1].
        pow2: dynamic scales rounded up to a power of two (kernels.fp8.pow2_scale: MXFP8's E8M0
        scales, returned in fp32); computed by the torch reference on every backend.
        `scale` is given instead of computed: per-tensor [1] (a checkpoint's static input_scale) or
        per-token [..., 1] (from the whole row when x is a shard of it: row-parallel layers).
    fake_quantize_fp8(x, ...) -> fp32 x_hat == dequantize_fp8(*quantize_fp8(x, ...)), bit for bit.

Numerics are those of fp8_turbo/kernels/fp8.py (scale = max(amax, 1e-12) / 448, q = round_to_e4m3(x / scale)).
The kernel uses correctly rounded division (`div_rn`) and rounds to the e4m3 grid in fp32 before the
cast, so its output is bit-exact to the reference on the GPU and in the interpreter alike.

CPU model path (design.md, Backends): weights are kept as `dequantize_fp8(*quantize_weight(w))` in fp32
and a linear layer is `F.linear(fake_quantize_fp8(x, granularity, group_size), w_dequant, bias)` -- one
cheap elementwise pass over the activations and one fp32 matmul, the same values fp8_gemm computes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8_turbo.kernels.backend import use_triton
from fp8_turbo.kernels.fp8 import E4M3_MAX, FP8_DTYPE, compute_scale, expand_scale, pow2_scale, round_to_e4m3

GRANULARITIES = ("token", "tensor", "group")


# ----------------------------------------------------------------------------- Triton


@triton.jit
def round_to_e4m3_tl(x):
    """fp32 -> nearest e4m3 value, still fp32 (kernels/fp8.round_to_e4m3, same operations)."""
    a = tl.minimum(tl.abs(x), 448.0, propagate_nan=tl.PropagateNan.ALL)  # saturate
    exp = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 a); 0 -> -127
    exp = tl.maximum(exp, -6) - 3  # log2 of the grid step: 3 mantissa bits, subnormal step 2^-9
    step = ((exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - exp) << 23).to(tl.float32, bitcast=True)
    q = a * inv_step  # exact: power-of-two scaling, q in [0, 16)
    # round half to even, written out with exact operations (no libdevice in the interpreter)
    q_floor = tl.floor(q)
    frac = q - q_floor
    odd = (q_floor.to(tl.int32) & 1) == 1
    q = q_floor + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
    r = q * step
    sign = x.to(tl.int32, bitcast=True) & -2147483648  # 0x80000000: keep -0.0 and the sign of x
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_row_kernel(
    # pointers: x [M, K], q [M, K] e4m3, scale [M] (computed) or [1] (given)
    x_ptr, q_ptr, scale_ptr,
    # sizes and strides
    M, K,
    stride_xm, stride_qm,
    # meta
    STATIC_SCALE: tl.constexpr,  # 0: per-row scale from amax; 1 (True): read scale[0]; 2: read scale[row]
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    q_row = q_ptr + pid_m.to(tl.int64) * stride_qm
    if STATIC_SCALE == 2:
        scale = tl.load(scale_ptr + pid_m)
    elif STATIC_SCALE:
        scale = tl.load(scale_ptr)
    else:
        # pass 1: amax of the row
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        row_amax = tl.maximum(tl.max(amax, axis=0), 1e-12)  # MIN_AMAX
        scale = tl.math.div_rn(row_amax, 448.0)  # E4M3_MAX
        tl.store(scale_ptr + pid_m, scale)
    # pass 2: quantize (the row is back from L2)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        q = round_to_e4m3_tl(tl.math.div_rn(x, scale))
        tl.store(q_row + offs_k, q.to(q_ptr.dtype.element_ty), mask=offs_k < K)


@triton.jit
def _quantize_group_kernel(
    # pointers: x [M, K], q [M, K] e4m3, scale [M, G] with G = ceil(K / GROUP_SIZE)
    x_ptr, q_ptr, scale_ptr,
    # sizes and strides
    M, K, G,
    stride_xm, stride_qm, stride_sm,
    # meta
    GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,  # next power of two >= GROUP_SIZE (masked)
    GROUPS_PER_PROG: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_g = pid_g * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)  # [GROUPS_PER_PROG]
    offs_i = tl.arange(0, BLOCK_G)
    offs_k = offs_g[:, None] * GROUP_SIZE + offs_i[None, :]  # [GROUPS_PER_PROG, BLOCK_G]
    mask = (offs_i[None, :] < GROUP_SIZE) & (offs_k < K)
    x = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + offs_k, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12)  # [GROUPS_PER_PROG], MIN_AMAX
    scale = tl.math.div_rn(amax, 448.0)
    tl.store(scale_ptr + pid_m.to(tl.int64) * stride_sm + offs_g, scale, mask=offs_g < G)
    q = round_to_e4m3_tl(tl.math.div_rn(x, scale[:, None]))
    tl.store(q_ptr + pid_m.to(tl.int64) * stride_qm + offs_k, q.to(q_ptr.dtype.element_ty), mask=mask)


# Launch parameters, also compiled ahead of time by tests/test_aot_gemm.py.
ROW_BLOCK_K = 1024
GROUPS_PER_PROG = 4


def _quantize_fp8_triton(x2: torch.Tensor, granularity: str, group_size: int, scale: torch.Tensor | None):
    m, k = x2.shape
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x2.device)
    if m == 0:
        return q, _empty_scale(m, k, granularity, group_size, x2.device, scale)
    if granularity == "group":
        g = triton.cdiv(k, group_size)
        scale = torch.empty((m, g), dtype=torch.float32, device=x2.device)
        grid = (m, triton.cdiv(g, GROUPS_PER_PROG))
        _quantize_group_kernel[grid](
            x2, q, scale, m, k, g, x2.stride(0), q.stride(0), scale.stride(0),
            GROUP_SIZE=group_size, BLOCK_G=triton.next_power_of_2(group_size), GROUPS_PER_PROG=GROUPS_PER_PROG,
        )
        return q, scale
    if granularity == "tensor":
        static = 1
        if scale is None:
            scale = compute_scale(x2.abs().amax().reshape(1))  # one torch reduction, then the kernel
    elif scale is not None:  # per-token scales given
        static, scale = 2, scale.contiguous()
    else:
        static, scale = 0, torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    _quantize_row_kernel[(m,)](
        x2, q, scale, m, k, x2.stride(0), q.stride(0), STATIC_SCALE=static, BLOCK_K=ROW_BLOCK_K,
    )
    return q, scale


# ----------------------------------------------------------------------------- reference


def _empty_scale(m, k, granularity, group_size, device, scale):
    if granularity == "tensor":
        return scale if scale is not None else torch.ones(1, device=device) / E4M3_MAX
    cols = 1 if granularity == "token" else -(-k // group_size)
    return torch.empty((m, cols), dtype=torch.float32, device=device)


def _scale_reference(x2: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """fp32 scale of x2 [M, K] for the dynamic schemes."""
    m, k = x2.shape
    if granularity == "token":
        return compute_scale(x2.abs().amax(dim=1, keepdim=True))  # [M, 1]
    if granularity == "tensor":
        amax = x2.abs().amax() if x2.numel() else x2.new_zeros(())
        return compute_scale(amax.reshape(1))  # [1]
    g = -(-k // group_size)
    padded = torch.nn.functional.pad(x2.abs(), (0, g * group_size - k))
    return compute_scale(padded.view(m, g, group_size).amax(dim=2))  # [M, G]


def _round_reference(x2, granularity, group_size, scale, pow2=False):
    """(q fp32 on the e4m3 grid, scale) for x2 [M, K]."""
    if scale is None:
        scale = _scale_reference(x2, granularity, group_size)
        if pow2:
            scale = pow2_scale(scale)
    m, k = x2.shape
    return round_to_e4m3(x2 / expand_scale(scale, m, k, group_size)), scale


def quantize_fp8_reference(x2: torch.Tensor, granularity: str, group_size: int, scale: torch.Tensor | None,
                           pow2: bool = False):
    q, scale = _round_reference(x2.float(), granularity, group_size, scale, pow2)
    return q.to(FP8_DTYPE), scale


# ----------------------------------------------------------------------------- public


def _prepare(x: torch.Tensor, granularity: str, group_size: int, scale: torch.Tensor | None):
    if granularity not in GRANULARITIES:
        raise ValueError(f"quantize_fp8: granularity={granularity!r}; allowed: {GRANULARITIES}")
    if granularity == "group" and group_size < 1:
        raise ValueError(f"quantize_fp8: group_size={group_size}; must be >= 1")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_fp8: x.dtype={x.dtype}; allowed: float32, bfloat16, float16")
    if x.dim() < 1:
        raise ValueError("quantize_fp8: x must have at least one dimension [..., K]")
    x2 = x.reshape(-1, x.shape[-1])
    if scale is not None:
        # per-tensor: a checkpoint's static input_scale; per-token: scales computed elsewhere from the
        # whole row (a row-parallel layer's shard, fp8_turbo/engine/model/parallel.py)
        if granularity == "tensor" and scale.numel() == 1:
            scale = scale.reshape(1).float().to(x.device)
        elif granularity == "token" and scale.numel() == x2.shape[0]:
            scale = scale.reshape(-1, 1).float().to(x.device)
        else:
            raise ValueError(
                f"quantize_fp8: a static scale is per-tensor (granularity='tensor', 1 element) or per-token "
                f"(granularity='token', one per row: {x2.shape[0]}); got granularity={granularity!r}, "
                f"scale of shape {tuple(scale.shape)}"
            )
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, scale


def _output_scale_shape(x: torch.Tensor, scale: torch.Tensor, granularity: str) -> torch.Tensor:
    return scale if granularity == "tensor" else scale.reshape(*x.shape[:-1], scale.shape[-1])


@torch.inference_mode()
def quantize_fp8(
    x: torch.Tensor, granularity: str = "token", group_size: int = 128, scale: torch.Tensor | None = None,
    pow2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations x [..., K] to e4m3; see the module docstring for scale shapes."""
    x2, scale = _prepare(x, granularity, group_size, scale)
    if use_triton(x2) and not pow2:
        q, scale = _quantize_fp8_triton(x2, granularity, group_size, scale)
    else:
        q, scale = quantize_fp8_reference(x2, granularity, group_size, scale, pow2)
    return q.reshape(x.shape), _output_scale_shape(x, scale, granularity)


@torch.inference_mode()
def fake_quantize_fp8(
    x: torch.Tensor, granularity: str = "token", group_size: int = 128, scale: torch.Tensor | None = None,
    pow2: bool = False,
) -> torch.Tensor:
    """fp32 quantize-dequantize of x [..., K]: equal, bit for bit, to dequantizing quantize_fp8(x).
    The CPU model's activation path (torch only, a few elementwise passes)."""
    x2, scale = _prepare(x, granularity, group_size, scale)
    q, scale = _round_reference(x2.float(), granularity, group_size, scale, pow2)
    return (q * expand_scale(scale, x2.shape[0], x2.shape[1], group_size)).reshape(x.shape)
