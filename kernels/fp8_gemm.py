"""W8A8 FP8 GEMM: Triton kernel, launcher, torch reference.

    fp8_gemm(a, b, a_scale, b_scale, out_dtype=torch.bfloat16, bias=None) -> c [M, N]
        c = (a * a_scale) @ (b * b_scale).T (+ bias)
        a [M, K] e4m3 (activations), b [N, K] e4m3, K-major (a linear layer's weight)
        a_scale: [1] per-tensor | [M, 1] per-token | [M, ceil(K/128)] per 1x128 group
        b_scale: [1] per-tensor | [N, 1] per-channel | [ceil(N/128), ceil(K/128)] per 128x128 block

Kernel (Triton tutorial 03 structure, grouped tile ordering): each BLOCK_K step's fp8 product is
promoted into an fp32 accumulator (Hopper's fp8 wgmma keeps only ~14 bits when it accumulates by
itself, design.md pitfall 5). Scales are applied in the epilogue; with a 128-block scale on either
side, the K loop scales each BLOCK_K partial product by its K block's scales instead (BLOCK_K divides
128). Decode sizes (M <= 64) get small BLOCK_M tiles and split-K when the N tiles cannot fill the GPU;
split-K writes fp32 partials [SPLIT_K, M, N] that are summed afterwards (deterministic, no atomics).

CPU reference (the production path on CPU): fp8 -> fp32 is exact, then one fp32 matmul with the
per-tensor/row/channel scales applied to the output, or on dequantized operands for block scales.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting, use_triton
from kernels.fp8 import FP8_DTYPE, dequantize_fp8

SCALE_BLOCK = 128  # K (and N) extent of one block scale
# Scale layouts, the A_SCALE / B_SCALE constexprs of the kernel.
PER_TENSOR, PER_ROW, PER_BLOCK = 0, 1, 2
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _fp8_gemm_kernel(
    # pointers
    a_ptr, b_ptr,  # a [M, K] e4m3, b [N, K] e4m3
    c_ptr,  # c [M, N] out dtype, or fp32 partials [SPLIT_K, M, N] when SPLIT_K > 1
    a_scale_ptr, b_scale_ptr,  # fp32, layouts A_SCALE / B_SCALE
    bias_ptr,  # [N] or unused
    # sizes
    M, N, K,
    M_BUCKET,  # bucketed M: only keys the autotuner
    # strides
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_cs, stride_cm, stride_cn,  # stride_cs: between split-K partials
    stride_asm, stride_ask,  # a_scale [M, 1] or [M, ceil(K/128)]
    stride_bsn, stride_bsk,  # b_scale [N, 1] or [ceil(N/128), ceil(K/128)]
    # scale layouts and epilogue
    A_SCALE: tl.constexpr,  # PER_TENSOR 0 | PER_ROW 1 | PER_BLOCK 2 (1x128 groups)
    B_SCALE: tl.constexpr,  # PER_TENSOR 0 | PER_ROW 1 (channel) | PER_BLOCK 2 (128x128)
    HAS_BIAS: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # tile rows per group of the grouped ordering (L2 reuse of b)
    SPLIT_K: tl.constexpr,
):
    # -- grouped ordering of the output tiles (tutorial 03)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_m = offs_m < M
    mask_n = offs_n < N
    # clamp out-of-range rows/cols to row 0 instead of masking the loads: they are never stored
    offs_am = tl.where(mask_m, offs_m, 0)
    offs_bn = tl.where(mask_n, offs_n, 0)

    # -- this program's K range (all of K unless split-K); whole BLOCK_K steps
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = min(k_start + k_per_split, K)

    offs_k = k_start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        mask_k = offs_k < k_end - (k - k_start)
        a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None], other=0.0)
        if A_SCALE == 2 or B_SCALE == 2:
            # K-blocked scales: scale this step's fp32 partial product by its K block's scales
            kb = k // 128  # SCALE_BLOCK; BLOCK_K divides it
            partial = tl.dot(a, b)  # [BLOCK_M, BLOCK_N] fp32, promoted into acc below
            if A_SCALE == 2:
                a_s = tl.load(a_scale_ptr + offs_am * stride_asm + kb * stride_ask)  # [BLOCK_M]
                partial = partial * a_s[:, None]
            if B_SCALE == 2:
                b_s = tl.load(b_scale_ptr + (offs_bn // 128) * stride_bsn + kb * stride_bsk)  # [BLOCK_N]
                partial = partial * b_s[None, :]
            acc += partial
        else:
            # promote the fp8 MMA's partial sums into the fp32 accumulator every BLOCK_K
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # -- epilogue: per-tensor / per-row / per-channel scales, bias
    if A_SCALE == 0:
        acc = acc * tl.load(a_scale_ptr)
    elif A_SCALE == 1:
        acc = acc * tl.load(a_scale_ptr + offs_am * stride_asm)[:, None]
    if B_SCALE == 0:
        acc = acc * tl.load(b_scale_ptr)
    elif B_SCALE == 1:
        acc = acc * tl.load(b_scale_ptr + offs_bn * stride_bsn)[None, :]
    if HAS_BIAS:
        if pid_k == 0:  # added once, by the first K split
            acc += tl.load(bias_ptr + offs_bn).to(tl.float32)[None, :]  # upcast right after the load
    c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


# Decode (M <= 64): BLOCK_M follows the M bucket, so a 1-token step does not compute 64 rows.
DECODE_CONFIGS = [
    _config(bm, bn, 128, 4, stages)
    for bm in (16, 32, 64)
    for bn, stages in ((64, 5), (128, 4))
]
# Prefill: wgmma tiles (BLOCK_M a multiple of 64, num_warps % 4 == 0).
PREFILL_CONFIGS = [
    _config(128, 128, 128, 8, 3),
    _config(128, 256, 128, 8, 3),
    _config(64, 128, 128, 4, 4),
]
GEMM_CONFIGS = DECODE_CONFIGS + PREFILL_CONFIGS
# The interpreter runs programs one at a time: one small fixed config (design.md pitfall 4).
INTERPRET_CONFIG = _config(32, 32, 64, 4, 1, group_m=4)


def m_bucket(m: int) -> int:
    """Autotune key for M: powers of two (1, 2, 4, ... 64 are the decode buckets), capped at 8192."""
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def _prune_configs(configs, named_args, **kwargs):
    bucket = named_args["M_BUCKET"]
    if bucket <= 64:
        return [c for c in configs if c in DECODE_CONFIGS and c.kwargs["BLOCK_M"] == max(16, bucket)]
    return [c for c in configs if c in PREFILL_CONFIGS]


_fp8_gemm_autotuned = triton.autotune(
    configs=GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "A_SCALE", "B_SCALE", "HAS_BIAS", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_fp8_gemm_kernel)


def split_k_for(m: int, n: int, k: int, num_sms: int) -> int:
    """Decode split-K: split K (power of two, <= 8, >= 1024 deep each) while the output tiles of a
    64-wide BLOCK_N leave more than half the SMs idle."""
    if m > 64:
        return 1
    tiles = triton.cdiv(n, 64)
    split = 1
    while split < 8 and tiles * split * 2 <= num_sms and k // (split * 2) >= 1024:
        split *= 2
    return split


def _fp8_gemm_triton(a, b, a_scale, b_scale, a_mode, b_mode, out_dtype, bias, split_k=None):
    m, k = a.shape
    n = b.shape[0]
    if split_k is None:
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 1
        split_k = split_k_for(m, n, k, sms)
    if m == 0 or n == 0:
        return torch.zeros((m, n), dtype=out_dtype, device=a.device)
    if split_k > 1:
        c = torch.empty((split_k, m, n), dtype=torch.float32, device=a.device)  # partials
    else:
        c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    a_scale2 = a_scale.reshape(a_scale.shape[0], -1) if a_mode != PER_TENSOR else a_scale
    b_scale2 = b_scale.reshape(b_scale.shape[0], -1) if b_mode != PER_TENSOR else b_scale
    sa = a_scale2.stride() if a_mode != PER_TENSOR else (0, 0)
    sb = b_scale2.stride() if b_mode != PER_TENSOR else (0, 0)
    args = (
        a, b, c, a_scale2, b_scale2, bias if bias is not None else a_scale2,
        m, n, k, m_bucket(m),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        c.stride(0) if split_k > 1 else 0, c.stride(-2), c.stride(-1),
        sa[0], sa[1], sb[0], sb[1],
    )
    meta = dict(A_SCALE=a_mode, B_SCALE=b_mode, HAS_BIAS=bias is not None, SPLIT_K=split_k)

    def grid(META):
        return (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]), split_k)

    if interpreting():
        cfg = INTERPRET_CONFIG
        _fp8_gemm_kernel[grid(cfg.kwargs)](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps)
    else:
        _fp8_gemm_autotuned[grid](*args, **meta)
    return c.sum(0).to(out_dtype) if split_k > 1 else c


# ----------------------------------------------------------------------------- reference


def fp8_gemm_reference(a, b, a_scale, b_scale, out_dtype=torch.bfloat16, bias=None) -> torch.Tensor:
    """fp32 torch path: exact fp8 -> fp32, one fp32 matmul, scales on the output where they allow it."""
    a_mode, b_mode = _check_args(a, b, a_scale, b_scale, out_dtype, bias)
    if a_mode == PER_BLOCK or b_mode == PER_BLOCK:
        c = dequantize_fp8(a, a_scale, SCALE_BLOCK) @ dequantize_fp8(b, b_scale, SCALE_BLOCK).T
    else:
        c = a.float() @ b.float().T  # [M, N]
        c = c * a_scale.float().reshape(-1, 1) * b_scale.float().reshape(1, -1)
    if bias is not None:
        c = c + bias.float()
    return c.to(out_dtype)


def _scale_mode(scale: torch.Tensor, rows: int, k: int, block_rows: int, name: str, row_name: str) -> int:
    kb = triton.cdiv(k, SCALE_BLOCK)
    shape = tuple(scale.shape)
    if scale.numel() == 1 and scale.dim() <= 2:
        return PER_TENSOR
    if shape == (rows, 1):
        return PER_ROW
    if shape == (block_rows, kb):
        return PER_BLOCK
    raise ValueError(
        f"fp8_gemm: {name} of shape {shape} is none of [1], [{row_name}={rows}, 1], [{block_rows}, {kb}]"
    )


def _check_args(a, b, a_scale, b_scale, out_dtype, bias) -> tuple[int, int]:
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm: a and b must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_gemm: need a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"fp8_gemm: out_dtype={out_dtype}; allowed: {OUT_DTYPES}")
    m, k = a.shape
    n = b.shape[0]
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fp8_gemm: bias of shape {tuple(bias.shape)}, expected [{n}]")
    a_mode = _scale_mode(a_scale, m, k, m, "a_scale", "M")
    b_mode = _scale_mode(b_scale, n, k, triton.cdiv(n, SCALE_BLOCK), "b_scale", "N")
    return a_mode, b_mode


@torch.inference_mode()
def fp8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """c [M, N] = (a * a_scale) @ (b * b_scale).T (+ bias); see the module docstring."""
    a_mode, b_mode = _check_args(a, b, a_scale, b_scale, out_dtype, bias)
    if not use_triton(a):
        return fp8_gemm_reference(a, b, a_scale, b_scale, out_dtype, bias)
    return _fp8_gemm_triton(a, b, a_scale.float(), b_scale.float(), a_mode, b_mode, out_dtype, bias)
