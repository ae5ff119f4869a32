"""Store new keys/values into the paged KV cache (quantizing to FP8 e4m3 for fp8 caches).

Cache layout (pinned in design.md): k_cache, v_cache [num_blocks, block_size, KVH, D]; a token's slot is
block_id * block_size + offset, and a negative slot means "skip" (padding tokens).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8_turbo.kernels.backend import use_triton
from fp8_turbo.kernels.cpu import attention as cpu_attention
from fp8_turbo.kernels.fp8 import FP8_DTYPE, round_to_e4m3
from fp8_turbo.kernels.paged_attention import scale_tensor
from fp8_turbo.kernels.quantize import round_to_e4m3_tl

# ----------------------------------------------------------------------------------------------------
# Triton kernel: one program per new token, all KV heads at once
# ----------------------------------------------------------------------------------------------------
@triton.jit
def write_kv_kernel(
    # new keys/values [T, KVH, D]
    k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
    # caches [num_blocks, BLOCK_SIZE, KVH, D]
    k_cache_ptr, v_cache_ptr, stride_cb, stride_cs, stride_ch,
    slot_ptr,  # int64 [T]; negative = padding, skipped
    k_scale_ptr, v_scale_ptr,  # fp32 [1] on the device; only read for fp8 caches
    KVH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_HD: tl.constexpr,
    FP8: tl.constexpr,
):
    pid_t = tl.program_id(0)
    slot = tl.load(slot_ptr + pid_t)
    if slot < 0:  # padding token
        return
    offs = tl.arange(0, BLOCK_HD)  # flattened (kv head, d) of one token
    offs_h = offs // HEAD_DIM
    offs_d = offs % HEAD_DIM
    mask = offs < KVH * HEAD_DIM
    # upcast right after the load: exact, and the interpreter gets bf16 arithmetic wrong
    k = tl.load(k_ptr + pid_t * stride_kt + offs_h * stride_kh + offs_d, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + pid_t * stride_vt + offs_h * stride_vh + offs_d, mask=mask, other=0.0).to(tl.float32)
    block_id = slot // BLOCK_SIZE
    cache_offs = block_id * stride_cb + (slot % BLOCK_SIZE) * stride_cs + offs_h * stride_ch + offs_d
    if FP8:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
        # round to the e4m3 grid in fp32 first (saturating, half to even): the cast of an on-grid value is
        # exact on the GPU and in the interpreter, which mis-rounds off-grid values (design.md pitfall 2)
        k = round_to_e4m3_tl(tl.math.div_rn(k, k_scale))
        v = round_to_e4m3_tl(tl.math.div_rn(v, v_scale))
    tl.store(k_cache_ptr + cache_offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
    t, kvh, d = k.shape
    assert k.stride(2) == 1 and v.stride(2) == 1, f"k, v must be contiguous in D: {k.stride()} {v.stride()}"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, (
        f"caches must share strides, contiguous in D: {k_cache.stride()} {v_cache.stride()}")
    assert slot_mapping.dtype == torch.int64, f"slot_mapping dtype {slot_mapping.dtype}, want int64"
    fp8 = k_cache.dtype == FP8_DTYPE
    write_kv_kernel[(t,)](
        k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        slot_mapping, scale_tensor(k_scale, k.device), scale_tensor(v_scale, k.device),
        KVH=kvh, HEAD_DIM=d, BLOCK_SIZE=k_cache.shape[1], BLOCK_HD=triton.next_power_of_2(kvh * d), FP8=fp8,
        num_warps=4,
    )


def _check(k, v, k_cache, v_cache, slot_mapping):
    assert k.dim() == 3 and k.shape == v.shape, f"k {tuple(k.shape)} v {tuple(v.shape)}: want [T, KVH, D]"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (
        f"k_cache {tuple(k_cache.shape)} v_cache {tuple(v_cache.shape)}: want [num_blocks, block_size, KVH, D]")
    assert k_cache.shape[2:] == k.shape[1:], f"cache {tuple(k_cache.shape)} vs new {tuple(k.shape)}: KVH, D differ"
    assert k_cache.dtype == v_cache.dtype, f"k_cache {k_cache.dtype} != v_cache {v_cache.dtype}"
    assert slot_mapping.shape == (k.shape[0],), f"slot_mapping {tuple(slot_mapping.shape)} vs T={k.shape[0]}"


def write_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
    """Torch reference (the CPU path where kernels/cpu does not take the call): scatter rows of k/v into their cache slots."""
    num_blocks, block_size, kvh, d = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for new, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        rows = new[keep]  # [T', KVH, D]
        if cache.dtype == FP8_DTYPE:
            scale = scale.float() if isinstance(scale, torch.Tensor) else float(scale)
            rows = round_to_e4m3(rows.float() / scale)  # saturating, half to even (fp8_turbo/kernels/fp8.py)
        cache.view(num_blocks * block_size, kvh, d)[slots] = rows.to(cache.dtype)


@torch.inference_mode()
def write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
    """Store k, v [T, KVH, D] into k_cache, v_cache [num_blocks, block_size, KVH, D] at slot_mapping [T]
    (negative slots are skipped). FP8 caches get round-half-even(k / k_scale) saturated to +-448.
    k_scale, v_scale: floats or fp32 [1] tensors on k's device (read by the kernel: no sync)."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    if use_triton(k) and k.shape[0] > 0:
        return write_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if not use_triton(k) and cpu_attention.supports_write(k, k_cache):  # our C++ loop: no masks or scatters
        return cpu_attention.write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return write_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
