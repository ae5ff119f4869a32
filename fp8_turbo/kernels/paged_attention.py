"""Paged attention over the block-table KV cache: decode (one query token per sequence) and prefill
(packed variable-length query chunks attending causally to their cached prefix plus themselves).

KV layout (pinned in design.md): k_cache, v_cache [num_blocks, block_size, KVH, D], model dtype or
float8_e4m3fn (dequantized as x * k_scale / x * v_scale). GQA: query head h reads KV head h // (H // KVH).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fp8_turbo.kernels.backend import interpreting, use_triton
from fp8_turbo.kernels.cpu import attention as cpu_attention
from fp8_turbo.kernels.fp8 import FP8_DTYPE

# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _upcast(x, DOT_DTYPE: tl.constexpr, VIA_F32: tl.constexpr):
    """Cache tile -> the dot's input type. VIA_F32: e4m3 -> f32 -> bf16 (exact), for sm_89 under triton
    3.6, which lowers e4m3 -> bf16 through a cvt.bf16.f16 that only sm_90 has."""
    if VIA_F32:
        x = x.to(tl.float32)
    return x.to(DOT_DTYPE)


@triton.jit
def _attend_kv_tile(q, k_cache_ptr, v_cache_ptr, kv_offs, kv_mask, valid, qk_scale, m_i, l_i, acc,
                    DOT_DTYPE: tl.constexpr, VIA_F32: tl.constexpr):
    """One online-softmax step (exp2, fp32 running max/sum) of q [ROWS, D] over a K/V tile
    [BLOCK_N, D] gathered at kv_offs; `valid` [ROWS | 1, BLOCK_N] masks scores. Shared by decode and prefill."""
    k = _upcast(tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0), DOT_DTYPE, VIA_F32)
    qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [ROWS, BLOCK_N], log2 units
    qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _upcast(tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0), DOT_DTYPE, VIA_F32)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
    return m_new, l_i, acc

@triton.jit
def paged_attention_decode_kernel(
    # q [B, H, D]
    q_ptr, stride_qb, stride_qh,
    # out [B, H, D] when SPLIT is False, else fp32 partial outputs [B, H, num_splits, D] and their
    # log2-sum-exp lse [B, H, num_splits], combined by paged_attention_reduce_kernel
    out_ptr, stride_ob, stride_oh, stride_os,
    lse_ptr, stride_lb, stride_lh,
    # caches [num_blocks, BLOCK_SIZE, KVH, D] (D contiguous), block tables [B, max_blocks], seq_lens [B]
    k_cache_ptr, v_cache_ptr, stride_cb, stride_cs, stride_ch,
    block_tables_ptr, stride_btb, seq_lens_ptr,
    # softmax scale; fp32 [1] KV-cache scales on the device (read here, so a CUDA graph sees updates)
    sm_scale, k_scale_ptr, v_scale_ptr,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    KV_STAGES: tl.constexpr, MIN_PARTITION: tl.constexpr, VIA_F32: tl.constexpr = False,
):
    """One program per (sequence, KV head, split): the GROUP query heads sharing the KV head are the
    rows of one tile, so each K/V token is loaded once for the whole group (rows padded to BLOCK_G >= 16
    for tl.dot). Online softmax in fp32 with exp2 over the split's tokens. Each sequence divides its own
    length among the splits (whole BLOCK_N tiles, at least MIN_PARTITION tokens each; later splits may
    be empty), so no host-side bound on the lengths is baked into the launch (CUDA graphs)."""
    pid_b = tl.program_id(0)
    pid_kvh = tl.program_id(1)
    pid_s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + pid_b)
    partition = tl.maximum(tl.cdiv(tl.cdiv(seq_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N, MIN_PARTITION)
    start = pid_s * partition
    end = tl.minimum(start + partition, seq_len)
    k_scale = tl.load(k_scale_ptr)
    v_scale = tl.load(v_scale_ptr)
    qk_scale = sm_scale * k_scale * 1.4426950408889634  # log2(e): exp2 softmax

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = pid_kvh * GROUP + offs_g  # [BLOCK_G] query heads of this KV head
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    # upcast right after every load (exact; the interpreter computes bf16 on bit patterns), then cast
    # to the dot's input type: bf16/fp16 on the GPU (exact for bf16 and e4m3 values), fp32 in the interpreter
    q = tl.load(q_ptr + pid_b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + pid_b * stride_btb
    for n0 in tl.range(start, end, BLOCK_N, num_stages=KV_STAGES):  # explicit: cp.async pipelining
        pos = n0 + offs_n  # [BLOCK_N] token positions
        mask_n = pos < end
        block_ids = tl.load(table_row + pos // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        kv_offs = (block_ids[:, None] * stride_cb + (pos % BLOCK_SIZE)[:, None] * stride_cs
                   + pid_kvh * stride_ch + offs_d[None, :])  # [BLOCK_N, BLOCK_D]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        m_i, l_i, acc = _attend_kv_tile(q, k_cache_ptr, v_cache_ptr, kv_offs, kv_mask, mask_n[None, :], qk_scale,
                                        m_i, l_i, acc, DOT_DTYPE, VIA_F32)

    # an empty split (start >= seq_len) leaves l_i = 0 and acc = 0: write zeros and lse = -inf
    out = acc * (v_scale / tl.maximum(l_i, 1e-30))[:, None]
    out_offs = pid_b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if SPLIT:
        tl.store(out_ptr + out_offs + pid_s * stride_os, out, mask=mask_g[:, None] & mask_d[None, :])
        tl.store(lse_ptr + pid_b * stride_lb + heads * stride_lh + pid_s, m_i + tl.log2(tl.maximum(l_i, 1e-30)), mask=mask_g)
    else:
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])


@triton.jit
def paged_attention_reduce_kernel(
    # partial outputs [B, H, num_splits, D] fp32 and lse [B, H, num_splits] (log2 units) -> out [B, H, D]
    partial_ptr, stride_pb, stride_ph, stride_ps,
    lse_ptr, stride_lb, stride_lh,
    out_ptr, stride_ob, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    lse = tl.load(lse_ptr + pid_b * stride_lb + pid_h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (seq_len 0): zeros, not NaN
    w = tl.exp2(lse - m)  # [BLOCK_S]
    partial = tl.load(partial_ptr + pid_b * stride_pb + pid_h * stride_ph + offs_s[:, None] * stride_ps
                      + offs_d[None, :], mask=mask_s[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(partial * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)  # [BLOCK_D]
    tl.store(out_ptr + pid_b * stride_ob + pid_h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@triton.jit
def paged_attention_prefill_kernel(
    # q, out [T, H, D]: new tokens of all sequences packed; cu_seqlens_q [B + 1]
    q_ptr, stride_qt, stride_qh,
    out_ptr, stride_ot, stride_oh,
    cu_seqlens_q_ptr,
    # caches [num_blocks, BLOCK_SIZE, KVH, D] (D contiguous), block tables [B, max_blocks], seq_lens [B]
    k_cache_ptr, v_cache_ptr, stride_cb, stride_cs, stride_ch,
    block_tables_ptr, stride_btb, seq_lens_ptr,
    sm_scale, k_scale_ptr, v_scale_ptr,  # softmax scale; fp32 [1] KV-cache scales on the device
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
    KV_STAGES: tl.constexpr, VIA_F32: tl.constexpr = False,
):
    """One program per (sequence, tile of BLOCK_T new tokens, KV head). The tile's rows are the
    (token, query head of the group) pairs, BLOCK_M >= BLOCK_T * GROUP, so each K/V token is loaded once
    for the group. New token i sits at position seq_len - n_new + i and attends to positions <= its own:
    the cached prefix (earlier chunks, shared prefix blocks) and the new tokens before it."""
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_kvh = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + pid_b)
    n_new = tl.load(cu_seqlens_q_ptr + pid_b + 1) - q_start
    if pid_m * BLOCK_T >= n_new:  # the grid covers the longest chunk of the batch
        return
    seq_len = tl.load(seq_lens_ptr + pid_b)
    ctx_len = seq_len - n_new  # tokens cached before this chunk
    v_scale = tl.load(v_scale_ptr)
    qk_scale = sm_scale * tl.load(k_scale_ptr) * 1.4426950408889634  # log2(e): exp2 softmax

    offs_r = tl.arange(0, BLOCK_M)
    offs_i = pid_m * BLOCK_T + offs_r // GROUP  # [BLOCK_M] new-token index of each row
    offs_g = offs_r % GROUP  # [BLOCK_M] query head within the group
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = (offs_r < BLOCK_T * GROUP) & (offs_i < n_new)
    mask_d = offs_d < HEAD_DIM
    q_pos = ctx_len + offs_i  # [BLOCK_M]; rows past the chunk get positions >= seq_len (masked at store)
    q_offs = (q_start + offs_i)[:, None] * stride_qt + (pid_kvh * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + pid_b * stride_btb
    kv_end = tl.minimum(seq_len, ctx_len + (pid_m + 1) * BLOCK_T)  # causal: up to the tile's last token
    for n0 in tl.range(0, kv_end, BLOCK_N, num_stages=KV_STAGES):  # explicit: cp.async pipelining
        pos = n0 + offs_n  # [BLOCK_N]
        mask_n = pos < kv_end
        block_ids = tl.load(table_row + pos // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        kv_offs = (block_ids[:, None] * stride_cb + (pos % BLOCK_SIZE)[:, None] * stride_cs
                   + pid_kvh * stride_ch + offs_d[None, :])  # [BLOCK_N, BLOCK_D]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        # causal: tile 0 always holds position 0 <= q_pos, so every row's running max is finite from then on
        causal = (pos[None, :] <= q_pos[:, None]) & mask_n[None, :]  # [BLOCK_M, BLOCK_N]
        m_i, l_i, acc = _attend_kv_tile(q, k_cache_ptr, v_cache_ptr, kv_offs, kv_mask, causal, qk_scale,
                                        m_i, l_i, acc, DOT_DTYPE, VIA_F32)

    out = acc * (v_scale / tl.maximum(l_i, 1e-30))[:, None]  # a padding sequence (no tokens): zeros
    o_offs = (q_start + offs_i)[:, None] * stride_ot + (pid_kvh * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------------
# torch reference (the CPU path where our C++ kernel (fp8_turbo/kernels/cpu/attention.py) does not take the call:
# gather blocks, then batched attention in fp32)
# ----------------------------------------------------------------------------------------------------
def _gather_kv(cache: torch.Tensor, block_ids: torch.Tensor, scale: float) -> torch.Tensor:
    """cache [num_blocks, bs, KVH, D], block_ids [..., nb] -> fp32 [..., nb * bs, KVH, D] (dequantized)."""
    ids = block_ids.long().clamp(min=0)  # unused table entries may be -1
    blocks = cache.index_select(0, ids.flatten())  # [n, bs, KVH, D]; faster than cache[ids] on CPU
    blocks = blocks.view(*ids.shape[:-1], ids.shape[-1] * cache.shape[1], *cache.shape[2:])
    if cache.dtype == FP8_DTYPE:
        return blocks.float() * (scale.float() if isinstance(scale, torch.Tensor) else float(scale))
    return blocks.float()


def paged_attention_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                     k_scale=1.0, v_scale=1.0) -> torch.Tensor:
    b, h, d = q.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    group = h // kvh
    max_len = int(seq_lens.max()) if b else 0
    nb = max(1, -(-max_len // block_size))
    tables = block_tables[:, :nb]
    k = _gather_kv(k_cache, tables, k_scale).transpose(1, 2)  # [B, KVH, L, D]
    v = _gather_kv(v_cache, tables, v_scale).transpose(1, 2)
    qg = q.float().view(b, kvh, group, d)  # [B, KVH, G, D]
    pos = torch.arange(k.shape[2], device=q.device)
    mask = (pos[None, :] < seq_lens.to(q.device).long()[:, None])[:, None, None, :]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [B, KVH, G, D]
    return out.reshape(b, h, d).to(q.dtype)


def paged_attention_prefill_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                      k_scale=1.0, v_scale=1.0) -> torch.Tensor:
    t, h, d = q.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    group = h // kvh
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):  # one batched SDPA per sequence
        start, end = cu[b], cu[b + 1]
        n_new = end - start
        if n_new == 0:
            continue
        nb = -(-seq_len // block_size)
        k = _gather_kv(k_cache, block_tables[b, :nb], k_scale)[:seq_len].transpose(0, 1)  # [KVH, L, D]
        v = _gather_kv(v_cache, block_tables[b, :nb], v_scale)[:seq_len].transpose(0, 1)
        # queries of one KV head's group stacked as rows (g, i): [KVH, G * n_new, D]
        qg = q[start:end].float().view(n_new, kvh, group, d).permute(1, 2, 0, 3).reshape(kvh, group * n_new, d)
        q_pos = torch.arange(seq_len - n_new, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [n_new, L]
        mask = mask.repeat(group, 1)  # [G * n_new, L]
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
        out[start:end] = o.view(kvh, group, n_new, d).permute(2, 0, 1, 3).reshape(n_new, h, d).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------
# One fixed config per kernel (also compiled ahead of time by tests/test_aot_attention.py). Decode is
# memory bound: 64 tokens per step, the group's query heads padded to 16 rows; prefill tiles 64 rows of
# (token, head) pairs against 64 cached tokens.
DECODE_BLOCK_N = 64
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
NUM_WARPS = 4
# Software-pipelining depth of the K/V loop. The block ids of a tile are loaded a stage before its K/V
# (their addresses depend on them), so K/V get num_stages - 3 buffers: 5 stages keep two K/V tiles in
# flight (cp.async into 2 x [64, D] buffers each; 3 or 4 stages gave one). tests/test_aot_attention.py
# checks the buffers in the compiled kernel's shared-memory allocations.
KV_STAGES = 5
MIN_PARTITION = 256  # fewest tokens per split worth a reduce step (a multiple of DECODE_BLOCK_N)
MAX_SPLITS = 64


def _dot_dtype(q: torch.Tensor):
    """tl.dot input type: the model's 16-bit type on the GPU (exact for bf16 and e4m3 values); fp32 in
    the interpreter, where bf16 arithmetic is wrong (design.md pitfall 1), and for fp32 inputs."""
    if interpreting() or q.dtype == torch.float32:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[q.dtype]


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@functools.cache
def _upcast_via_f32(device: torch.device, cache_dtype: torch.dtype) -> bool:
    """e4m3 caches on pre-Hopper GPUs upcast through fp32 (see _upcast)."""
    return (cache_dtype == FP8_DTYPE and device.type == "cuda"
            and torch.cuda.get_device_capability(device) < (9, 0))


def scale_tensor(scale, device: torch.device) -> torch.Tensor:
    """A KV-cache scale as the fp32 [1] device tensor the kernels read: a tensor is used as it is (no copy,
    no sync: the model keeps its scales on the device, and a CUDA graph then sees later updates); a float
    becomes a one-element fill (a kernel launch, never a host-to-device copy)."""
    if isinstance(scale, torch.Tensor):
        assert scale.numel() == 1 and scale.dtype == torch.float32 and scale.device == device, (
            f"KV scale {tuple(scale.shape)} {scale.dtype} on {scale.device}: want fp32 [1] on {device}")
        return scale.reshape(1)
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


def decode_num_splits(batch: int, kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Split-KV (flash-decoding) only when (sequence, KV head) programs cannot fill the GPU: aim at two
    programs per SM, each split holding at least MIN_PARTITION tokens of the longest sequence."""
    want = triton.cdiv(2 * _num_sms(device), batch * kv_heads)
    return max(1, min(want, triton.cdiv(max_seq_len, MIN_PARTITION), MAX_SPLITS))


def _check_triton(q, k_cache, block_tables, seq_lens):
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1, f"q {q.stride()} / cache {k_cache.stride()}: D contiguous"
    assert block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32, (
        f"block_tables {block_tables.dtype}, seq_lens {seq_lens.dtype}: want int32")
    assert k_cache.dtype in (FP8_DTYPE, torch.bfloat16, torch.float16, torch.float32), f"cache dtype {k_cache.dtype}"


def paged_attention_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=1.0, v_scale=1.0,
                                  max_seq_len: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """max_seq_len: a host-side bound on seq_lens that caps the split count (no device sync; default: the
    block table's capacity); num_splits: override the split-KV heuristic (tests)."""
    _check_triton(q, k_cache, block_tables, seq_lens)
    assert k_cache.stride() == v_cache.stride(), f"k_cache {k_cache.stride()} != v_cache {v_cache.stride()}"
    b, h, d = q.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    group = h // kvh
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = decode_num_splits(b, kvh, max_seq_len, q.device)
    out = torch.empty_like(q)
    if num_splits > 1:
        partial = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, h, num_splits, dtype=torch.float32, device=q.device)
        dst, stride_os, lse_strides = partial, partial.stride(2), (lse.stride(0), lse.stride(1))
    else:
        dst, stride_os, lse, lse_strides = out, 0, out, (0, 0)
    meta = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d))
    paged_attention_decode_kernel[(b, kvh, num_splits)](
        q, q.stride(0), q.stride(1),
        dst, dst.stride(0), dst.stride(1), stride_os,
        lse, *lse_strides,
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables, block_tables.stride(0), seq_lens,
        float(scale), scale_tensor(k_scale, q.device), scale_tensor(v_scale, q.device),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        BLOCK_N=DECODE_BLOCK_N, SPLIT=num_splits > 1, DOT_DTYPE=_dot_dtype(q), **meta,
        KV_STAGES=KV_STAGES, MIN_PARTITION=MIN_PARTITION, VIA_F32=_upcast_via_f32(q.device, k_cache.dtype),
        num_warps=NUM_WARPS, num_stages=KV_STAGES,
    )
    if num_splits > 1:
        paged_attention_reduce_kernel[(b, h)](
            partial, partial.stride(0), partial.stride(1), partial.stride(2),
            lse, lse.stride(0), lse.stride(1),
            out, out.stride(0), out.stride(1),
            num_splits, BLOCK_S=triton.next_power_of_2(num_splits), **meta, num_warps=NUM_WARPS,
        )
    return out


def paged_attention_prefill_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                   k_scale=1.0, v_scale=1.0, max_query_len: int | None = None) -> torch.Tensor:
    """max_query_len: a host-side bound on the chunk lengths (default: read from cu_seqlens_q, one sync)."""
    _check_triton(q, k_cache, block_tables, seq_lens)
    assert k_cache.stride() == v_cache.stride(), f"k_cache {k_cache.stride()} != v_cache {v_cache.stride()}"
    assert cu_seqlens_q.dtype == torch.int32, f"cu_seqlens_q {cu_seqlens_q.dtype}: want int32"
    t, h, d = q.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    group = h // kvh
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    assert group <= PREFILL_BLOCK_M, f"GQA group {group} > PREFILL_BLOCK_M {PREFILL_BLOCK_M}"
    block_t = PREFILL_BLOCK_M // group  # new tokens per program
    out = torch.empty_like(q)
    grid = (seq_lens.shape[0], triton.cdiv(max_query_len, block_t), kvh)
    paged_attention_prefill_kernel[grid](
        q, q.stride(0), q.stride(1),
        out, out.stride(0), out.stride(1),
        cu_seqlens_q,
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables, block_tables.stride(0), seq_lens,
        float(scale), scale_tensor(k_scale, q.device), scale_tensor(v_scale, q.device),
        GROUP=group, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_SIZE=block_size,
        BLOCK_T=block_t, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, DOT_DTYPE=_dot_dtype(q),
        KV_STAGES=KV_STAGES, VIA_F32=_upcast_via_f32(q.device, k_cache.dtype), num_warps=NUM_WARPS,
        num_stages=KV_STAGES,
    )
    return out


# ----------------------------------------------------------------------------------------------------
# public launchers
# ----------------------------------------------------------------------------------------------------
def _check(q, k_cache, v_cache, block_tables, seq_lens):
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (
        f"k_cache {tuple(k_cache.shape)} v_cache {tuple(v_cache.shape)}: want [num_blocks, block_size, KVH, D]")
    h, d = q.shape[-2:]
    kvh = k_cache.shape[2]
    assert k_cache.shape[3] == d, f"head dim: q {d} vs cache {k_cache.shape[3]}"
    assert h % kvh == 0, f"query heads {h} not a multiple of KV heads {kvh}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == seq_lens.shape[0], (
        f"block_tables {tuple(block_tables.shape)} vs seq_lens {tuple(seq_lens.shape)}")


@torch.inference_mode()
def paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale,
                           k_scale=1.0, v_scale=1.0, *, max_seq_len: int | None = None) -> torch.Tensor:
    """q [B, H, D] (one token per sequence) -> out [B, H, D]; seq_lens [B] counts the current token.
    max_seq_len (optional, Triton only): a host-side bound on seq_lens that sizes the split-KV partitions
    without a device sync; default: the block table's capacity."""
    assert q.dim() == 3, f"q {tuple(q.shape)}: want [B, H, D]"
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    if use_triton(q) and q.shape[0] > 0:
        return paged_attention_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale,
                                             max_seq_len=max_seq_len)
    if not use_triton(q) and cpu_attention.supports(q, k_cache):  # batch-invariant C++ kernel
        return cpu_attention.paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)
    return paged_attention_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)


@torch.inference_mode()
def paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                            k_scale=1.0, v_scale=1.0, *, max_query_len: int | None = None) -> torch.Tensor:
    """q [T, H, D] new tokens of all sequences packed by cu_seqlens_q [B + 1]; seq_lens [B] counts each
    sequence's cached tokens including the new ones -> out [T, H, D], causal over the whole cache.
    max_query_len (optional, Triton only): the longest chunk, known on the host; default: one sync."""
    assert q.dim() == 3, f"q {tuple(q.shape)}: want [T, H, D]"
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    assert cu_seqlens_q.shape == (seq_lens.shape[0] + 1,), (
        f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} vs seq_lens {tuple(seq_lens.shape)}")
    if use_triton(q) and q.shape[0] > 0:
        return paged_attention_prefill_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                              k_scale, v_scale, max_query_len=max_query_len)
    if not use_triton(q) and cpu_attention.supports(q, k_cache):
        return cpu_attention.paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                                     k_scale, v_scale)
    return paged_attention_prefill_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                             k_scale, v_scale)
