"""Paged attention over the block-table KV cache: decode (one query token per sequence) and prefill
(packed variable-length query chunks attending causally to their cached prefix plus themselves).

KV layout (pinned in design.md): k_cache, v_cache [num_blocks, block_size, KVH, D], model dtype or
float8_e4m3fn (dequantized as x * k_scale / x * v_scale). GQA: query head h reads KV head h // (H // KVH).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import use_triton


# ----------------------------------------------------------------------------------------------------
# torch reference (the CPU production path: gather blocks, then batched attention in fp32)
# ----------------------------------------------------------------------------------------------------
def _gather_kv(cache: torch.Tensor, block_ids: torch.Tensor, scale: float) -> torch.Tensor:
    """cache [num_blocks, bs, KVH, D], block_ids [..., nb] -> fp32 [..., nb * bs, KVH, D] (dequantized)."""
    blocks = cache[block_ids.long().clamp(min=0)]  # [..., nb, bs, KVH, D]; unused entries may be -1
    blocks = blocks.flatten(-4, -3)
    if cache.dtype == torch.float8_e4m3fn:
        return blocks.float() * float(scale)
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
                           k_scale=1.0, v_scale=1.0) -> torch.Tensor:
    """q [B, H, D] (one token per sequence) -> out [B, H, D]; seq_lens [B] counts the current token."""
    assert q.dim() == 3, f"q {tuple(q.shape)}: want [B, H, D]"
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    if use_triton(q) and q.shape[0] > 0:
        return paged_attention_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)
    return paged_attention_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)


@torch.inference_mode()
def paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                            k_scale=1.0, v_scale=1.0) -> torch.Tensor:
    """q [T, H, D] new tokens of all sequences packed by cu_seqlens_q [B + 1]; seq_lens [B] counts each
    sequence's cached tokens including the new ones -> out [T, H, D], causal over the whole cache."""
    assert q.dim() == 3, f"q {tuple(q.shape)}: want [T, H, D]"
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    assert cu_seqlens_q.shape == (seq_lens.shape[0] + 1,), (
        f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} vs seq_lens {tuple(seq_lens.shape)}")
    if use_triton(q) and q.shape[0] > 0:
        return paged_attention_prefill_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                              k_scale, v_scale)
    return paged_attention_prefill_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                             k_scale, v_scale)


def paged_attention_decode_triton(*args):  # replaced once the Triton kernel lands
    return paged_attention_decode_reference(*args)


def paged_attention_prefill_triton(*args):  # replaced once the Triton kernel lands
    return paged_attention_prefill_reference(*args)
