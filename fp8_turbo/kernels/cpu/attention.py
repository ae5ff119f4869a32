"""CPU paged attention (C++ in attention.cpp / attention_kernel.h), batch-invariant, and its launchers.

Entry points (CPU tensors; the contracts of fp8_turbo/kernels/paged_attention.py's reference functions):

    paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=1.0, v_scale=1.0)
        q [B, H, D] one token per sequence, at causal length seq_lens[b] -> out [B, H, D]
    paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, k_scale, v_scale)
        q [T, H, D] packed by cu_seqlens_q [B + 1]; token i of sequence b's n_new new tokens sits at
        causal length seq_lens[b] - n_new + i + 1 -> out [T, H, D]

    q fp32 | bf16 (out: q's dtype); caches [num_blocks, block_size, KVH, D] fp32 | bf16 | e4m3, D a
    multiple of 8, unit stride along D; e4m3 caches read as x * k_scale / x * v_scale (floats or
    one-element tensors; ignored for other caches, as in the reference); block_tables [B, max_blocks];
    GQA: query head h reads KV head h // (H // KVH).

Guarantees:
  - Every query row (token, head) is computed by one function over keys 0..L-1 of its own causal length
    L, in a fixed order (attention_kernel.h): 8 fp32 lanes over D for each score with a fixed tree,
    an exact max, p = exp2(s - max) by one polynomial, the softmax sum in 8 fixed lanes, the values
    accumulated in key order with one FMA each. Its result depends only on its q, L and the cache
    contents: bit-identical alone or in any batch, decode or inside a prefill chunk of any size, with
    any thread count and on AVX-512, AVX2 or the portable path.
  - Against the torch reference (SDPA in fp32) the difference is fp32 rounding only
    (tests/test_cpu_attention.py derives the bound).
  - Threads (torch.get_num_threads()) split the (token, KV head) pairs.

    write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0)
        kernels.write_kv on CPU, bit for bit the reference's cache contents (e4m3: x / scale rounded
        half to even onto the grid, saturating), without its masks, gathers and scatters.

`supports(q, k_cache)` says whether these kernels take a call (built, and dtypes / head dim they handle);
fp8_turbo/kernels/paged_attention.py falls back to the torch reference otherwise.
"""
from __future__ import annotations

import torch

from fp8_turbo.kernels.cpu import build
from fp8_turbo.kernels.cpu.gemm import _isa as isa_index  # the ISA selection shared by every CPU kernel

_EXT = None
_Q_DTYPES = (torch.float32, torch.bfloat16)
_KV_DTYPES = (torch.float32, torch.bfloat16, torch.float8_e4m3fn)


def extension():
    global _EXT
    if _EXT is None:
        _EXT = build.load("fp8t_cpu_attention", ["attention.cpp"],
                          ["attention_kernel.h", "attention_types.h", "common.h", "vec8.h", "vec8_math.h"])
    return _EXT


def available() -> bool:
    return extension() is not None


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in _Q_DTYPES and k_cache.dtype in _KV_DTYPES
            and q.shape[-1] % 8 == 0 and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and available())


def supports_write(k: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (k.device.type == "cpu" and k.dtype in _Q_DTYPES and k_cache.dtype in _KV_DTYPES
            and k_cache.stride(-1) == 1 and available())


def _scale(s) -> float:
    return float(s.item()) if isinstance(s, torch.Tensor) else float(s)


def paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=1.0, v_scale=1.0,
                           *, isa: str | None = None) -> torch.Tensor:
    return extension().attention(q, k_cache, v_cache, block_tables, seq_lens, None, float(scale), _scale(k_scale),
                                 _scale(v_scale), isa_index(isa))


def paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, k_scale=1.0,
                            v_scale=1.0, *, isa: str | None = None) -> torch.Tensor:
    return extension().attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, float(scale),
                                 _scale(k_scale), _scale(v_scale), isa_index(isa))


def write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
    extension().write_kv(k, v, k_cache, v_cache, slot_mapping, _scale(k_scale), _scale(v_scale))
