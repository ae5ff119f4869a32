"""W8A8 FP8 GEMM: Triton kernel, launcher, torch reference.

    fp8_gemm(a, b, a_scale, b_scale, out_dtype=torch.bfloat16, bias=None, *, deterministic=False) -> c [M, N]
        c = (a * a_scale) @ (b * b_scale).T (+ bias)
        a [M, K] e4m3 (activations), b [N, K] e4m3, K-major (a linear layer's weight)
        a_scale: [1] per-tensor | [M, 1] per-token | [M, ceil(K/g)] per 1xg group
        b_scale: [1] per-tensor | [N, 1] per-channel | [ceil(N/128), ceil(K/128)] per 128x128 block
                 | [N, ceil(K/g)] per 1xg group (finer weight scales; fused shards whose 128-row
                 blocks do not align)
        g: 128, or 16 / 32 / 64 (a power of two, read from the shape: kernels.fp8.group_of); b's group
        scales may be float8_e8m0fnu (MXFP8). On CUDA, groups other than 128 and E8M0 scales run the
        torch reference (dequantized operands, one matmul): the Triton kernel's K loop steps by BLOCK_K
        and assumes 128-wide scale groups; finer groups there are future work.
    fp8_weight_only_gemm(x, b, b_scale, bias=None) -> c [M, N] in x.dtype     (W8A16, fp8-weight-only)
    gemm_launch(m, n, k, ...) -> GemmLaunch: swap, split-K, constexprs and candidate configs of a call

Kernel (Triton tutorial 03 structure, grouped tile ordering): each BLOCK_K step's fp8 product is
promoted into an fp32 accumulator (Hopper's fp8 wgmma keeps only ~14 bits when it accumulates by
itself, design.md pitfall 5). Scales are applied in the epilogue; with a 128-block scale on either
side, the K loop scales each BLOCK_K partial product by its K block's scales instead (BLOCK_K divides
128). Decode sizes (M <= 64) run swapped, c.T = b @ a.T, so the weight's N fills the 64-row wgmma tile
and the tokens its narrow side (16-64), with split-K when the N tiles cannot fill the GPU; split-K
writes fp32 partials [SPLIT_K, M, N] that are summed afterwards (deterministic, no atomics).
Prefill sizes use 64/128-row tiles. Autotuning (CUDA) is keyed on the bucketed token count and the
weight's shape (never on N, the token count of the swapped path); run each batch-size bucket once before
capturing CUDA graphs. W8A16 (weight-only) runs the same kernel with the e4m3 weight tile upcast to the
activations' 16-bit type in registers. Deterministic mode fixes one tile config for every M (no swap, no
split-K), so a row's result does not depend on the batch. Offsets are 32-bit: every operand stays below 2^31 elements.

CPU tensors run our C++ kernel (fp8_turbo/kernels/cpu/gemm.py: e4m3 decoded in registers, fixed-order fp32
accumulation, batch-invariant) when it is built, else the torch reference below, which stays the
reference in tests: fp8 -> fp32 is exact, then one fp32 matmul with the per-tensor/row/channel scales
applied to the output, or on dequantized operands for block scales.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fp8_turbo.kernels import cpu as cpu_kernels
from fp8_turbo.kernels.backend import interpreting, use_triton
from fp8_turbo.kernels.fp8 import FP8_DTYPE, dequantize_fp8, group_of

SCALE_BLOCK = 128  # K (and N) extent of one block scale
# Scale layouts of the public API (the kernel gets them as strides + SCALE_ROWS/SCALE_K constexprs).
PER_TENSOR, PER_ROW, PER_BLOCK, PER_GROUP = 0, 1, 2, 3  # PER_GROUP: 1xg with g != 128 (reference only)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------- Triton


# Sizes and autotune-only keys are not specialized: the token count changes every step and must not
# compile a new variant (value 1, multiples of 16); M_BUCKET / N_KEY only key the autotuner.
@triton.jit(do_not_specialize=["M", "N", "M_BUCKET", "N_KEY"])
def _fp8_gemm_kernel(
    # pointers
    a_ptr, b_ptr,  # a [M, K] e4m3, b [N, K] e4m3 (K-major both)
    c_ptr,  # c [M, N] out dtype, or fp32 partials [SPLIT_K, M, N] when SPLIT_K > 1
    a_scale_ptr, b_scale_ptr,  # fp32: scale of a[m, k] is a_scale[m // A_SCALE_ROWS, k // 128]
    bias_ptr,  # [N] (or [M] when BIAS_ALONG_M), or unused
    # sizes
    M, N, K,
    M_BUCKET,  # bucketed token count: only keys the autotuner
    N_KEY,  # the weight's N (output features): only keys the autotuner (N is the token count when swapped)
    # strides
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_cs, stride_cm, stride_cn,  # stride_cs: between split-K partials
    stride_asm, stride_ask,  # 0 where the scale does not vary (per-tensor; per-row along K)
    stride_bsn, stride_bsk,
    # scale layouts and epilogue
    A_SCALE_ROWS: tl.constexpr,  # rows sharing one scale: 1 (per-tensor/row/1x128 group) or 128 (block)
    A_SCALE_K: tl.constexpr,  # True: the scale changes every 128 of K (group / block scales)
    B_SCALE_ROWS: tl.constexpr,
    B_SCALE_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ALONG_M: tl.constexpr,  # swapped decode GEMM: the bias follows the rows of this c
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # tile rows per group of the grouped ordering (L2 reuse of b)
    SPLIT_K: tl.constexpr,
    # W8A16 (fp8 weight-only): one operand is bf16/fp16/fp32 activations; both are upcast to DOT_DTYPE
    # in registers inside the K loop (e4m3 -> bf16 is exact), so the weight is read once, as 1 byte
    UPCAST: tl.constexpr = False,
    DOT_DTYPE: tl.constexpr = tl.bfloat16,
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
    # out-of-range rows/cols read row 0 instead of masking the loads: they are never stored
    offs_am = tl.where(mask_m, offs_m, 0)
    offs_bn = tl.where(mask_n, offs_n, 0)
    a_scale_rows = a_scale_ptr + (offs_am // A_SCALE_ROWS) * stride_asm  # [BLOCK_M] pointers
    b_scale_rows = b_scale_ptr + (offs_bn // B_SCALE_ROWS) * stride_bsn  # [BLOCK_N] pointers

    # -- this program's K range: all of K, or its share under split-K (whole BLOCK_K steps)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = min(k_start + k_per_split, K)

    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + (k_start + offs_k)[:, None] * stride_bk + offs_bn[None, :] * stride_bn  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_end - k, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_end - k, other=0.0)
        if UPCAST:  # W8A16: exact upcasts (DOT_DTYPE is fp32 in the interpreter: design.md pitfall 1)
            a = a.to(DOT_DTYPE)
            b = b.to(DOT_DTYPE)
        if A_SCALE_K or B_SCALE_K:
            # scales change along K: scale this step's fp32 product by its K block's scales,
            # which also promotes it into the fp32 accumulator (BLOCK_K divides 128)
            if UPCAST:
                partial = tl.dot(a, b, input_precision="ieee")  # [BLOCK_M, BLOCK_N] fp32
            else:
                partial = tl.dot(a, b)
            if A_SCALE_K:
                partial = partial * tl.load(a_scale_rows + (k // 128) * stride_ask)[:, None]
            if B_SCALE_K:
                partial = partial * tl.load(b_scale_rows + (k // 128) * stride_bsk)[None, :]
            acc += partial
        elif UPCAST:
            acc = tl.dot(a, b, acc, input_precision="ieee")  # 16-bit MMA accumulates in fp32
        else:
            # promote the fp8 MMA's partial sums into the fp32 accumulator every BLOCK_K
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # -- epilogue: scales constant along K (per-tensor / per-row / per-channel), bias
    if not A_SCALE_K:
        acc = acc * tl.load(a_scale_rows)[:, None]
    if not B_SCALE_K:
        acc = acc * tl.load(b_scale_rows)[None, :]
    if HAS_BIAS:
        if pid_k == 0:  # added once, by the first K split
            if BIAS_ALONG_M:
                acc += tl.load(bias_ptr + offs_am).to(tl.float32)[:, None]  # upcast right after the load
            else:
                acc += tl.load(bias_ptr + offs_bn).to(tl.float32)[None, :]
    c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


# Decode (M <= 64) runs swapped, c.T = b @ a.T: the weight's N fills the 64-row wgmma tile and the
# tokens are its narrow side (BLOCK_N = the M bucket, at least 16), so no MMA work is wasted on
# padding rows and Hopper keeps the fp8 wgmma path.
DECODE_CONFIGS = [
    _config(bm, bn, 128, 4, stages)
    for bn in (16, 32, 64)
    for bm, stages in ((64, 6), (128, 4))
]
# Prefill: wgmma tiles (BLOCK_M a multiple of 64, num_warps % 4 == 0). No 128x256 tile: with the
# promotion's second accumulator it spills registers (tests/test_aot_gemm.py reports spills).
PREFILL_CONFIGS = [
    _config(128, 128, 128, 8, 4),
    _config(64, 256, 128, 8, 3),
    _config(64, 128, 128, 4, 4),
]
GEMM_CONFIGS = DECODE_CONFIGS + PREFILL_CONFIGS
# W8A16 (fp8 weight-only): 16-bit MMA operands take twice the registers/shared memory per K: BLOCK_K 64.
W8A16_DECODE_CONFIGS = [_config(64, bn, 64, 4, 6) for bn in (16, 32, 64)]
W8A16_PREFILL_CONFIGS = [_config(128, 128, 64, 8, 4), _config(64, 128, 64, 4, 4)]
W8A16_CONFIGS = W8A16_DECODE_CONFIGS + W8A16_PREFILL_CONFIGS
# Deterministic mode: one tile for every M, never swapped, never split along K, so a row's result does
# not depend on how many rows share the batch (batch invariance, as on the CPU path).
DETERMINISTIC_CONFIG = PREFILL_CONFIGS[2]
W8A16_DETERMINISTIC_CONFIG = W8A16_PREFILL_CONFIGS[1]
# The interpreter runs programs one at a time: one small fixed config (design.md pitfall 4).
INTERPRET_CONFIG = _config(64, 64, 128, 4, 1, group_m=4)
W8A16_INTERPRET_CONFIG = _config(64, 64, 64, 4, 1, group_m=4)
DECODE_MAX_M = 64
MIN_DECODE_TILE = 16  # narrowest wgmma N side: token counts 1..16 share one bucket


def m_bucket(m: int) -> int:
    """Autotune key for the token count: powers of two, decode sizes 1-16 in one bucket (they share
    the 16-wide tile), then 32, 64 (decode) and 128 ... 8192 (prefill)."""
    return min(max(triton.next_power_of_2(max(m, 1)), MIN_DECODE_TILE), 8192)


def _prune_configs(configs, named_args, **kwargs):
    bucket = named_args["M_BUCKET"]
    if bucket <= DECODE_MAX_M:
        return [c for c in configs if c in DECODE_CONFIGS + W8A16_DECODE_CONFIGS and c.kwargs["BLOCK_N"] == bucket]
    return [c for c in configs if c in PREFILL_CONFIGS + W8A16_PREFILL_CONFIGS]


# Keyed on the token bucket and the weight's fixed shape (N_KEY, K) only: on the swapped decode path N is
# the token count, and keying on it re-tuned every batch size (and tuning inside a CUDA-graph capture
# breaks the capture). Per layer shape: 3 decode + ~7 prefill buckets, each tuned once.
_KEY = ["M_BUCKET", "N_KEY", "K", "A_SCALE_ROWS", "A_SCALE_K", "B_SCALE_ROWS", "B_SCALE_K", "HAS_BIAS", "SPLIT_K"]
_fp8_gemm_autotuned = triton.autotune(
    configs=GEMM_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_configs},
)(_fp8_gemm_kernel)
_w8a16_gemm_autotuned = triton.autotune(
    configs=W8A16_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_configs},
)(_fp8_gemm_kernel)


def split_k_for(m: int, n: int, k: int, num_sms: int) -> int:
    """Decode split-K: split K (a power of two <= 8, each part >= 1024 deep) while the 64-row tiles
    over N leave more than half of the SMs idle. At Llama-3.3-70B TP=1 shapes on 132 SMs this never
    splits (o/down 128 tiles, qkv 160); `bench/gemm.py --split-k 1 2 4` sweeps the alternatives on a
    GPU (bench/GPU.md records the outcome; this rule changes only on a measured win)."""
    if m > DECODE_MAX_M:
        return 1
    tiles = triton.cdiv(n, 64)
    split = 1
    while split < 8 and tiles * split * 2 <= num_sms and k // (split * 2) >= 1024:
        split *= 2
    return split


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _operand(x, scale, layout):
    """(tensor, scale, stride_row, stride_k, SCALE_ROWS, SCALE_K) of one GEMM operand."""
    kind, scale_rows = layout
    if kind == PER_TENSOR:
        return x, scale.reshape(1), 0, 0, 1, False
    scale = scale.reshape(scale.shape[0], -1)
    if kind == PER_ROW:
        return x, scale, scale.stride(0), 0, 1, False
    return x, scale, scale.stride(0), scale.stride(1), scale_rows, True


@dataclass(frozen=True, slots=True)
class GemmLaunch:
    """How one fp8_gemm / W8A16 call launches the kernel: a pure function of the shapes and flags
    (`gemm_launch`), shared by the launcher and by scripts/gpu_compile_plan.py, which counts the
    variants a GPU run compiles (each distinct (meta, config) pair is one compile)."""

    swap: bool  # decode: c.T = b @ a.T (the weight's N fills the 64-row tile)
    split_k: int
    meta: tuple[tuple[str, object], ...]  # constexprs other than the tile config, sorted by name
    configs: tuple  # triton.Config: the one it runs (fixed), or the autotuner's candidates after pruning
    autotuned: bool
    w8a16: bool

    def constexprs(self, config) -> dict:
        return {**dict(self.meta), **config.kwargs}


def gemm_launch(m: int, n: int, k: int, a_layout: tuple[int, int], b_layout: tuple[int, int], *, has_bias: bool,
                w8a16_dtype: torch.dtype | None = None, split_k: int | None = None, deterministic: bool = False,
                num_sms: int = 1) -> GemmLaunch:
    """The launch of c [m, n] = a [m, k] @ b [n, k].T; w8a16_dtype: the activations' dtype of a W8A16 call
    (None: W8A8); split_k None: `split_k_for` (always 1 when deterministic)."""
    w8a16 = w8a16_dtype is not None
    if deterministic:
        if split_k not in (None, 1):
            raise ValueError(f"fp8_gemm: split_k={split_k} with deterministic=True (batch-invariant rows need 1)")
        split_k = 1
    elif split_k is None:
        split_k = split_k_for(m, n, k, num_sms)
    elif not (isinstance(split_k, int) and split_k >= 1):
        raise ValueError(f"fp8_gemm: split_k={split_k!r}; allowed: a positive int")
    swap = m <= DECODE_MAX_M and not deterministic
    lhs, rhs = (b_layout, a_layout) if swap else (a_layout, b_layout)
    meta = dict(
        A_SCALE_ROWS=1 if lhs[0] == PER_TENSOR else lhs[1], A_SCALE_K=lhs[0] == PER_BLOCK,
        B_SCALE_ROWS=1 if rhs[0] == PER_TENSOR else rhs[1], B_SCALE_K=rhs[0] == PER_BLOCK,
        HAS_BIAS=has_bias, BIAS_ALONG_M=swap, SPLIT_K=split_k,
    )
    if w8a16:
        meta.update(UPCAST=True, DOT_DTYPE=_dot_dtype(w8a16_dtype))
    if interpreting():
        configs, autotuned = (W8A16_INTERPRET_CONFIG if w8a16 else INTERPRET_CONFIG,), False
    elif deterministic:
        configs, autotuned = (W8A16_DETERMINISTIC_CONFIG if w8a16 else DETERMINISTIC_CONFIG,), False
    else:
        pool = W8A16_CONFIGS if w8a16 else GEMM_CONFIGS
        configs, autotuned = tuple(_prune_configs(pool, {"M_BUCKET": m_bucket(m)})), True
    return GemmLaunch(swap, split_k, tuple(sorted(meta.items())), configs, autotuned, w8a16)


def _fp8_gemm_triton(a, b, a_scale, b_scale, a_layout, b_layout, out_dtype, bias, split_k=None,
                     deterministic=False):
    """a [M, K] e4m3 (or bf16/fp16/fp32 activations: W8A16, a_scale a ones [1]), b [N, K] e4m3."""
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0:
        return torch.zeros((m, n), dtype=out_dtype, device=a.device)
    if max(a.numel(), b.numel(), m * n) >= 2**31:
        raise ValueError(f"fp8_gemm: a {tuple(a.shape)}, b {tuple(b.shape)}: operands need < 2^31 elements")
    w8a16 = a.dtype != FP8_DTYPE
    launch = gemm_launch(m, n, k, a_layout, b_layout, has_bias=bias is not None,
                         w8a16_dtype=a.dtype if w8a16 else None, split_k=split_k, deterministic=deterministic,
                         num_sms=_num_sms(a.device) if a.is_cuda else 1)
    split_k = launch.split_k
    if split_k > 1:
        c = torch.empty((split_k, m, n), dtype=torch.float32, device=a.device)  # partials
    else:
        c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    lhs, rhs = _operand(a, a_scale, a_layout), _operand(b, b_scale, b_layout)
    stride_cm, stride_cn = c.stride(-2), c.stride(-1)
    if launch.swap:  # c.T [N, M] = b @ a.T
        lhs, rhs, stride_cm, stride_cn = rhs, lhs, stride_cn, stride_cm
    (x, xs, xs_row, xs_k, _, _), (y, ys, ys_row, ys_k, _, _) = lhs, rhs
    rows, cols = x.shape[0], y.shape[0]
    args = (
        x, y, c, xs, ys, bias if bias is not None else xs,
        rows, cols, k, m_bucket(m), n,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        c.stride(0) if split_k > 1 else 0, stride_cm, stride_cn,
        xs_row, xs_k, ys_row, ys_k,
    )
    meta = dict(launch.meta)

    def grid(META):
        return (triton.cdiv(rows, META["BLOCK_M"]) * triton.cdiv(cols, META["BLOCK_N"]), split_k)

    if not launch.autotuned:
        fixed = launch.configs[0]
        _fp8_gemm_kernel[grid(fixed.kwargs)](*args, **meta, **fixed.kwargs, num_warps=fixed.num_warps,
                                             num_stages=fixed.num_stages)
    elif w8a16:
        _w8a16_gemm_autotuned[grid](*args, **meta)
    else:
        _fp8_gemm_autotuned[grid](*args, **meta)
    return c.sum(0).to(out_dtype) if split_k > 1 else c


def _dot_dtype(act_dtype: torch.dtype):
    """W8A16 MMA input type: the activations' 16-bit type on the GPU (e4m3 -> bf16/fp16 is exact); fp32
    in the interpreter (bf16 arithmetic is wrong there, design.md pitfall 1) and for fp32 models."""
    if interpreting() or act_dtype == torch.float32:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[act_dtype]


_ONES: dict[torch.device, torch.Tensor] = {}


def _unit_scale(device: torch.device) -> torch.Tensor:
    """A cached fp32 [1] of ones: the activation 'scale' of W8A16 (one allocation per device, not per call,
    so CUDA-graph captures and steps launch nothing extra)."""
    if device not in _ONES:
        _ONES[device] = torch.ones(1, dtype=torch.float32, device=device)
    return _ONES[device]


# ----------------------------------------------------------------------------- reference


def fp8_gemm_reference(a, b, a_scale, b_scale, out_dtype=torch.bfloat16, bias=None) -> torch.Tensor:
    """fp32 torch path: exact fp8 -> fp32, one fp32 matmul, scales on the output where they allow it."""
    a_layout, b_layout = _check_args(a, b, a_scale, b_scale, out_dtype, bias)
    if a_layout[0] in (PER_BLOCK, PER_GROUP) or b_layout[0] in (PER_BLOCK, PER_GROUP):
        c = dequantize_fp8(a, a_scale) @ dequantize_fp8(b, b_scale).T
    else:
        c = a.float() @ b.float().T  # [M, N]
        c = c * a_scale.float().reshape(-1, 1) * b_scale.float().reshape(1, -1)
    if bias is not None:
        c = c + bias.float()
    return c.to(out_dtype)


def _scale_layout(scale: torch.Tensor, rows: int, k: int, name: str) -> tuple[int, int]:
    """(PER_TENSOR | PER_ROW | PER_BLOCK | PER_GROUP, rows sharing one scale) of an operand's scale."""
    kb = triton.cdiv(k, SCALE_BLOCK)
    shape = tuple(scale.shape)
    if scale.dtype == torch.float8_e8m0fnu:  # MXFP8 weight scales: per-row groups, reference on CUDA
        if len(shape) == 2 and shape[0] == rows and (group_of(k, shape[1]) or shape[1] == 1):
            return PER_GROUP, 1
        raise ValueError(f"fp8_gemm: {name} float8_e8m0fnu of shape {shape}: E8M0 scales are per-row groups "
                         f"[{rows}, ceil(K/g)] along K={k}")
    if scale.numel() == 1 and scale.dim() <= 2:
        return PER_TENSOR, rows
    if shape == (rows, 1):
        return PER_ROW, 1
    if shape == (rows, kb):  # 1x128 groups: activations; weights of fused shards not 128-row aligned
        return PER_BLOCK, 1
    if shape == (triton.cdiv(rows, SCALE_BLOCK), kb):  # 128x128 blocks
        return PER_BLOCK, SCALE_BLOCK
    if len(shape) == 2 and shape[0] == rows and group_of(k, shape[1]):  # finer groups along K
        return PER_GROUP, 1
    raise ValueError(
        f"fp8_gemm: {name} of shape {shape} fits none of [1], [{rows}, 1], [{rows}, ceil(K/g)] (g = 16, 32, 64, "
        f"128), [{triton.cdiv(rows, SCALE_BLOCK)}, {kb}] for an operand of {rows} rows and K={k}"
    )


def _check_args(a, b, a_scale, b_scale, out_dtype, bias) -> tuple[tuple[int, int], tuple[int, int]]:
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
    return _scale_layout(a_scale, m, k, "a_scale"), _scale_layout(b_scale, n, k, "b_scale")


@torch.inference_mode()
def fp8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
    *,
    deterministic: bool = False,
    split_k: int | None = None,
) -> torch.Tensor:
    """c [M, N] = (a * a_scale) @ (b * b_scale).T (+ bias); see the module docstring.
    deterministic (Triton): one tile config for every M, no swap, no split-K (batch-invariant rows).
    split_k (Triton): K splits of the decode path (None: `split_k_for`; benchmarks sweep it); the fp32
    partials are summed in a fixed order. Not allowed above 1 with deterministic=True."""
    a_layout, b_layout = _check_args(a, b, a_scale, b_scale, out_dtype, bias)
    if not use_triton(a):
        if cpu_kernels.available():  # our C++ kernel (kernels/cpu), batch-invariant
            return cpu_kernels.fp8_gemm(a, b, a_scale, b_scale, out_dtype, bias)
        return fp8_gemm_reference(a, b, a_scale, b_scale, out_dtype, bias)
    if PER_GROUP in (a_layout[0], b_layout[0]):
        return fp8_gemm_reference(a, b, a_scale, b_scale, out_dtype, bias)
    return _fp8_gemm_triton(a, b, a_scale.float(), b_scale.float(), a_layout, b_layout, out_dtype, bias,
                            split_k=split_k, deterministic=deterministic)


def fp8_weight_only_gemm_reference(x, b, b_scale, bias=None) -> torch.Tensor:
    """fp32 torch path of W8A16: the exactly dequantized weight, one fp32 matmul, out in x.dtype."""
    c = x.float() @ dequantize_fp8(b, b_scale).T
    if bias is not None:
        c = c + bias.float()
    return c.to(x.dtype)


@torch.inference_mode()
def fp8_weight_only_gemm(
    x: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    deterministic: bool = False,
) -> torch.Tensor:
    """W8A16: c [M, N] = x @ (b * b_scale).T (+ bias) in x.dtype; x [M, K] bf16/fp16/fp32 activations,
    b [N, K] e4m3 with any b_scale layout of fp8_gemm. Triton dequantizes each weight tile in registers
    inside the K loop (never the whole weight), so a decode step reads the weight once, as 1 byte."""
    if x.dtype not in OUT_DTYPES:
        raise ValueError(f"fp8_weight_only_gemm: x.dtype={x.dtype}; allowed: {OUT_DTYPES}")
    if b.dtype != FP8_DTYPE or x.dim() != 2 or b.dim() != 2 or x.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_weight_only_gemm: need x [M, K] and an e4m3 b [N, K], got {tuple(x.shape)} "
                         f"and {tuple(b.shape)} {b.dtype}")
    n, k = b.shape
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fp8_weight_only_gemm: bias of shape {tuple(bias.shape)}, expected [{n}]")
    b_layout = _scale_layout(b_scale, n, k, "b_scale")
    if not use_triton(x):
        if x.dtype != torch.float16 and cpu_kernels.available():  # our C++ kernel (kernels/cpu)
            return cpu_kernels.fp8_linear(x, b, b_scale, None, bias=bias)
        return fp8_weight_only_gemm_reference(x, b, b_scale, bias)
    if b_layout[0] == PER_GROUP:
        return fp8_weight_only_gemm_reference(x, b, b_scale, bias)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _fp8_gemm_triton(x, b, _unit_scale(x.device), b_scale.float(), (PER_TENSOR, 1), b_layout, x.dtype, bias,
                            deterministic=deterministic)
