"""Paged attention: the torch reference against dense attention computed token by token; the Triton
kernels (interpreter, and the GPU when there is one) against the reference.

The interpreter tests run in a fresh process with TRITON_INTERPRET=1 (test_interpreter_subprocess):
the variable must be set before triton is imported and must not leak into other test modules; see
tests/test_kv_write.py.
"""

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from interpreter import in_interpreter, rerun_in_interpreter
from fp8_turbo.kernels.backend import interpreting
from fp8_turbo.kernels.kv_write import write_kv
from fp8_turbo.kernels.paged_attention import (
    paged_attention_decode,
    paged_attention_decode_reference,
    paged_attention_decode_triton,
    paged_attention_prefill,
    paged_attention_prefill_reference,
)

FP8 = torch.float8_e4m3fn


@pytest.mark.skipif(interpreting(), reason="already in the interpreter")
def test_interpreter_subprocess():
    rerun_in_interpreter(__file__)


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


# ----------------------------------------------------------------------------------------------------
# Triton kernels against the reference
# ----------------------------------------------------------------------------------------------------
def _random_cache(seq_lens, block_size, kvh, d, kv_dtype, gen, device="cpu"):
    """Random caches and block tables: each sequence's blocks are a random (shuffled, non-contiguous)
    subset of the pool; unused table entries are -1. Values ~ N(0, 1) / the fp8 scale, so that the
    dequantized fp8 KV is ~ N(0, 1) too."""
    nbs = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(nbs) + 4
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(seq_lens), max(nbs) + 2), -1, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(nbs):
        tables[b, :nb] = perm[used:used + nb].int()
        used += nb
    shape = (num_blocks, block_size, kvh, d)
    scale = 1 / 16 if kv_dtype == FP8 else 1.0
    caches = [(torch.randn(shape, generator=gen) / scale).to(kv_dtype).to(device) for _ in range(2)]
    return *caches, tables.to(device), scale


def _tolerance(q_dtype):
    """fp32 out: the kernel and SDPA sum in different orders (exp2 online softmax vs exp), ~1e-6 apart.
    fp8 KV adds nothing: both read the same e4m3 values times the same scale. bf16 out: both results are
    rounded to bf16 (the interpreter truncates on store instead of rounding): up to 2 bf16 ulps."""
    return dict(atol=1e-4, rtol=1e-4) if q_dtype == torch.float32 else dict(atol=2e-2, rtol=1.6e-2)


# (KV dtype, q dtype): high-precision KV in the model dtype, or fp8 KV under either model dtype
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (FP8, torch.float32), (FP8, torch.bfloat16)]
shapes = dict(
    block_size=st.sampled_from([16, 32]), group=st.sampled_from([1, 4, 8]), kvh=st.sampled_from([1, 2]),
    d=st.sampled_from([64, 128]), dtypes=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
)


@in_interpreter
@settings(max_examples=16, deadline=None, derandomize=True)
@given(seq_lens=st.lists(st.integers(1, 300), min_size=1, max_size=3),
       num_splits=st.sampled_from([None, 1, 2, 5]), **shapes)
@example(seq_lens=[300, 1, 16], num_splits=None, block_size=16, group=8, kvh=2, d=128,
         dtypes=(torch.bfloat16, torch.bfloat16), seed=1)  # the 70B shape, bf16 KV
def test_triton_decode_matches_reference(seq_lens, num_splits, block_size, group, kvh, d, dtypes, seed):
    kv_dtype, q_dtype = dtypes
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables, kv_scale = _random_cache(seq_lens, block_size, kvh, d, kv_dtype, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(len(seq_lens), kvh * group, d, generator=gen).to(q_dtype)
    args = (q, k_cache, v_cache, tables, lens, d ** -0.5, kv_scale, kv_scale)
    if num_splits is None:
        out = paged_attention_decode(*args)  # public launcher, default split heuristic
    else:  # forced flash-decoding splits (with 300 tokens the heuristic rarely splits)
        out = paged_attention_decode_triton(*args, num_splits=num_splits)
    ref = paged_attention_decode_reference(*args)
    assert out.dtype == q_dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), **_tolerance(q_dtype))


@in_interpreter
@settings(max_examples=12, deadline=None, derandomize=True)
@given(chunks=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 100)), min_size=1, max_size=3), **shapes)
@example(chunks=[(0, 100), (250, 50), (0, 1)], block_size=32, group=8, kvh=1, d=128,
         dtypes=(torch.bfloat16, torch.bfloat16), seed=1)  # plain prefills beside a chunk, bf16 KV
@example(chunks=[(17, 60)], block_size=16, group=3, kvh=3, d=64, dtypes=(FP8, torch.float32), seed=2)  # SmolLM2
def test_triton_prefill_matches_reference(chunks, block_size, group, kvh, d, dtypes, seed):
    """chunks: (cached prefix, new tokens) per sequence -- chunked prefill / prefix caching on top of a
    cached prefix, or a plain prefill when the prefix is 0."""
    kv_dtype, q_dtype = dtypes
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [ctx + n for ctx, n in chunks]
    k_cache, v_cache, tables, kv_scale = _random_cache(seq_lens, block_size, kvh, d, kv_dtype, gen)
    cu = torch.tensor([0] + torch.tensor([n for _, n in chunks]).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), kvh * group, d, generator=gen).to(q_dtype)
    args = (q, k_cache, v_cache, tables, cu, torch.tensor(seq_lens, dtype=torch.int32), d ** -0.5, kv_scale, kv_scale)
    out = paged_attention_prefill(*args)
    ref = paged_attention_prefill_reference(*args)
    assert out.dtype == q_dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), **_tolerance(q_dtype))


@in_interpreter
def test_triton_prefill_skips_sequences_without_new_tokens():
    """A batch may hold sequences with no new tokens (cu_seqlens_q repeats): nothing is written for them."""
    gen = torch.Generator().manual_seed(1)
    seq_lens = [40, 7, 33]
    k_cache, v_cache, tables, _ = _random_cache(seq_lens, 16, 2, 64, torch.float32, gen)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    q = torch.randn(12, 8, 64, generator=gen)
    args = (q, k_cache, v_cache, tables, cu, torch.tensor(seq_lens, dtype=torch.int32), 0.125)
    torch.testing.assert_close(paged_attention_prefill(*args), paged_attention_prefill_reference(*args),
                               **_tolerance(torch.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("batch,seq_len", [(1, 4097), (8, 1000), (64, 300)])
def test_gpu_matches_reference(kv_dtype, batch, seq_len):
    """Real GPU, Llama-3.3-70B attention shape (8 KV heads, group 8, D 128): decode (split and not) and a
    chunked prefill over a cached prefix, bf16 activations. bf16 tolerance as above."""
    gen = torch.Generator().manual_seed(0)
    seq_lens = [seq_len - i % 7 for i in range(batch)]
    k_cache, v_cache, tables, kv_scale = _random_cache(seq_lens, 16, 8, 128, kv_dtype, gen, device="cuda")
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, 64, 128, generator=gen).bfloat16().cuda()
    args = (q, k_cache, v_cache, tables, lens, 128 ** -0.5, kv_scale, kv_scale)
    torch.testing.assert_close(paged_attention_decode(*args).float(),
                               paged_attention_decode_reference(*args).float(), **_tolerance(torch.bfloat16))
    n_new = [min(n, 100) for n in seq_lens]
    cu = torch.tensor([0] + torch.tensor(n_new).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(n_new), 64, 128, generator=gen).bfloat16().cuda()
    args = (q, k_cache, v_cache, tables, cu, lens, 128 ** -0.5, kv_scale, kv_scale)
    torch.testing.assert_close(paged_attention_prefill(*args).float(),
                               paged_attention_prefill_reference(*args).float(), **_tolerance(torch.bfloat16))
