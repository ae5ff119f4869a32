"""Store new keys/values into the paged KV cache (quantizing to FP8 e4m3 for fp8 caches).

Cache layout (pinned in design.md): k_cache, v_cache [num_blocks, block_size, KVH, D]; a token's slot is
block_id * block_size + offset, and a negative slot means "skip" (padding tokens).
"""
from __future__ import annotations

import torch

from kernels.backend import use_triton

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _check(k, v, k_cache, v_cache, slot_mapping):
    assert k.dim() == 3 and k.shape == v.shape, f"k {tuple(k.shape)} v {tuple(v.shape)}: want [T, KVH, D]"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (
        f"k_cache {tuple(k_cache.shape)} v_cache {tuple(v_cache.shape)}: want [num_blocks, block_size, KVH, D]")
    assert k_cache.shape[2:] == k.shape[1:], f"cache {tuple(k_cache.shape)} vs new {tuple(k.shape)}: KVH, D differ"
    assert k_cache.dtype == v_cache.dtype, f"k_cache {k_cache.dtype} != v_cache {v_cache.dtype}"
    assert slot_mapping.shape == (k.shape[0],), f"slot_mapping {tuple(slot_mapping.shape)} vs T={k.shape[0]}"


def write_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
    """Torch reference (and the CPU production path): scatter rows of k/v into their cache slots."""
    num_blocks, block_size, kvh, d = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for new, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        rows = new[keep]  # [T', KVH, D]
        if cache.dtype == torch.float8_e4m3fn:
            # torch's cast rounds half-to-even; clamp first so out-of-range values saturate to +-448
            rows = (rows.float() / float(scale)).clamp_(-FP8_MAX, FP8_MAX)
        cache.view(num_blocks * block_size, kvh, d)[slots] = rows.to(cache.dtype)


@torch.inference_mode()
def write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
    """Store k, v [T, KVH, D] into k_cache, v_cache [num_blocks, block_size, KVH, D] at slot_mapping [T]
    (negative slots are skipped). FP8 caches get round-half-even(k / k_scale) saturated to +-448."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    if use_triton(k) and k.shape[0] > 0:
        return write_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return write_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def write_kv_triton(*args, **kwargs):  # replaced below once the Triton kernel lands
    return write_kv_reference(*args, **kwargs)
