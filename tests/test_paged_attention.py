"""Paged attention: the torch reference against dense attention computed token by token; the Triton
kernels (interpreter) against the reference."""
import torch

from kernels.kv_write import write_kv
from kernels.paged_attention import paged_attention_decode, paged_attention_prefill


def _scatter(seq_lens, block_size, kvh, d, dtype, k_scale, v_scale, gen):
    """Random K/V per sequence written into shuffled (non-contiguous) blocks; returns the caches, block
    table and the per-sequence K/V as the cache holds them (fp32, dequantized)."""
    nbs = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(nbs) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(seq_lens), max(nbs) + 1), -1, dtype=torch.int32)
    k_cache = torch.zeros(num_blocks, block_size, kvh, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    kvs, used = [], 0
    for b, n in enumerate(seq_lens):
        tables[b, :nbs[b]] = perm[used:used + nbs[b]].int()
        used += nbs[b]
        k, v = torch.randn(n, kvh, d, generator=gen), torch.randn(n, kvh, d, generator=gen)
        pos = torch.arange(n)
        slots = tables[b, pos // block_size].long() * block_size + pos % block_size
        write_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale)
        if dtype == torch.float8_e4m3fn:
            k = (k / k_scale).to(dtype).float() * k_scale
            v = (v / v_scale).to(dtype).float() * v_scale
        kvs.append((k, v))
    return k_cache, v_cache, tables, kvs


def _dense(q, k, v, q_pos, scale):
    """q [n, H, D] at positions q_pos [n]; k, v [L, KVH, D] -> [n, H, D], one token at a time."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        kk = k[: q_pos[i] + 1].repeat_interleave(group, dim=1)  # [l, H, D]
        vv = v[: q_pos[i] + 1].repeat_interleave(group, dim=1)
        p = torch.softmax(torch.einsum("hd,lhd->hl", q[i], kk) * scale, dim=-1)
        out[i] = torch.einsum("hl,lhd->hd", p, vv)
    return out


def test_reference_decode_and_prefill_match_dense():
    gen = torch.Generator().manual_seed(0)
    kvh, group, d, bs = 2, 4, 32, 16
    seq_lens = [1, 17, 40, 5]
    for dtype, ks, vs in ((torch.float32, 1.0, 1.0), (torch.float8_e4m3fn, 0.05, 0.02)):
        k_cache, v_cache, tables, kvs = _scatter(seq_lens, bs, kvh, d, dtype, ks, vs, gen)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        # decode: the last token of each sequence
        q = torch.randn(len(seq_lens), kvh * group, d, generator=gen)
        out = paged_attention_decode(q, k_cache, v_cache, tables, lens, 0.2, ks, vs)
        for b, n in enumerate(seq_lens):
            ref = _dense(q[b:b + 1], *kvs[b], [n - 1], 0.2)
            torch.testing.assert_close(out[b:b + 1], ref, atol=1e-5, rtol=1e-5)
        # prefill: the last n_new tokens of each sequence, packed
        n_new = [1, 9, 40, 2]
        cu = torch.tensor([0] + torch.tensor(n_new).cumsum(0).tolist(), dtype=torch.int32)
        q = torch.randn(sum(n_new), kvh * group, d, generator=gen)
        out = paged_attention_prefill(q, k_cache, v_cache, tables, cu, lens, 0.2, ks, vs)
        for b, n in enumerate(seq_lens):
            s, e = cu[b].item(), cu[b + 1].item()
            ref = _dense(q[s:e], *kvs[b], list(range(n - n_new[b], n)), 0.2)
            torch.testing.assert_close(out[s:e], ref, atol=1e-5, rtol=1e-5)
