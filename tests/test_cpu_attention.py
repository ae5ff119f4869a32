"""Our CPU paged attention (fp8_turbo/kernels/cpu/attention.py): against the torch reference, and bit-identical rows
whatever the batch, the prompt's chunking, decode vs prefill, the thread count and the ISA.

Tolerance (vs kernels.paged_attention's SDPA reference, fp32). Per query row with keys j < L, scores
s_j = scale q.k_j and weights w_j = softmax(s)_j, both sides round differently:
  - each score's dot product: within (D + 4) 2^-24 scale sum_d |q_d| |k_jd| on each side (+ the
    scale multiplications and our log2(e) factor, and the subtraction of the max: a few 2^-24 (|s_j| + |max s|)),
    an absolute error in the exponent, i.e. a relative error of p_j = exp(s_j - max);
  - our exp2 polynomial: <= 4 2^-24 relative;
  - the normalized weights p_j / l then carry the error of p_j plus the largest one (through l);
  - the value sums and l: (L + 8) 2^-24 relative to sum_j w_j |v_jd| on each side.
So with delta = max_j [2 (D + 4) 2^-24 scale sum_d |q_d k_jd| + 8 2^-24 (|s_j| + |max s|) + 4 2^-24]:
    |ours_d - ref_d| <= (2 delta + 2 (L + 8) 2^-24) sum_j w_j |v_jd|
plus, for bf16 outputs, one bf16 rounding on each side (up to 2^-7 |ref| apart). Computed per element in fp64.
Invariance needs no tolerance: those comparisons are bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fp8_turbo.kernels import cpu
from fp8_turbo.kernels.cpu import attention as cpu_attention
from fp8_turbo.kernels.fp8 import FP8_DTYPE
from fp8_turbo.kernels.paged_attention import (paged_attention_decode, paged_attention_decode_reference, paged_attention_prefill,
                                     paged_attention_prefill_reference)

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="the CPU kernels could not be built")

ISAS = cpu.supported_isas()
CACHE_DTYPES = [torch.float32, torch.bfloat16, FP8_DTYPE]
HEADS = [(9, 3), (4, 1), (2, 2), (8, 2)]  # (H, KVH): SmolLM2's GQA, MQA, MHA, groups of 4
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


class Paged:
    """A KV cache of num_blocks blocks with sequences of the given lengths in shuffled blocks."""

    def __init__(self, lens, kvh, d, cache_dtype, block_size=16, seed=0, kv_scales=(1.0, 1.0)):
        g = torch.Generator().manual_seed(seed)
        self.block_size, self.kvh, self.d = block_size, kvh, d
        per_seq = max(1, -(-max(lens) // block_size))
        num_blocks = len(lens) * per_seq + 3
        self.k_scale, self.v_scale = kv_scales if cache_dtype == FP8_DTYPE else (1.0, 1.0)
        k = torch.randn(num_blocks, block_size, kvh, d, generator=g) * 2
        v = torch.randn(num_blocks, block_size, kvh, d, generator=g)
        v[:, ::5] *= 30  # a spread of magnitudes
        if cache_dtype == FP8_DTYPE:
            k, v = k / self.k_scale, v / self.v_scale
        self.k_cache, self.v_cache = k.to(cache_dtype), v.to(cache_dtype)
        self.tables = torch.randperm(num_blocks, generator=g)[: len(lens) * per_seq].view(len(lens), per_seq).int()
        self.lens = torch.tensor(lens, dtype=torch.int32)

    def decode(self, q, rows=None, fn=paged_attention_decode, **kw):
        rows = list(range(len(self.lens))) if rows is None else rows
        return fn(q, self.k_cache, self.v_cache, self.tables[rows], self.lens[rows], self.d**-0.5,
                  self.k_scale, self.v_scale, **kw)

    def prefill(self, q, seqs, n_new, lens=None, fn=paged_attention_prefill, **kw):
        """q [sum(n_new), H, D]: the last n_new[i] tokens (up to lens[i]) of sequence seqs[i]."""
        cu = torch.tensor([0] + list(torch.tensor(n_new).cumsum(0)), dtype=torch.int32)
        lens = self.lens[seqs] if lens is None else torch.tensor(lens, dtype=torch.int32)
        return fn(q, self.k_cache, self.v_cache, self.tables[seqs], cu, lens, self.d**-0.5,
                  self.k_scale, self.v_scale, **kw)

    def dense(self, seq, length):
        """fp64 K, V [L, KVH, D] of a sequence, dequantized as the reference does."""
        def gather(cache, scale):
            blocks = cache[self.tables[seq].long()].double().reshape(-1, self.kvh, self.d)[:length]
            return blocks * scale

        return gather(self.k_cache, self.k_scale), gather(self.v_cache, self.v_scale)


def tolerance(paged, q, seq, length, ref):
    """The bound of the module docstring for one token's rows: q [H, D] at causal length `length`."""
    k, v = paged.dense(seq, length)  # [L, KVH, D]
    h, d = q.shape
    group = h // paged.kvh
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [L, H, D]
    scale = d**-0.5
    qd = q.double()
    s = scale * torch.einsum("hd,lhd->hl", qd, k)  # [H, L]
    dot_mag = scale * torch.einsum("hd,lhd->hl", qd.abs(), k.abs())
    u = 2.0**-24
    delta = (2 * (d + 4) * u * dot_mag + 8 * u * (s.abs() + s.amax(1, keepdim=True).abs()) + 4 * u).amax(1)  # [H]
    w = torch.softmax(s, dim=1)
    mag = torch.einsum("hl,lhd->hd", w, v.abs())  # [H, D]
    tol = (2 * delta[:, None] + 2 * (length + 8) * u) * mag * 1.01 + 2.0**-126
    if ref.dtype == torch.bfloat16:
        tol = tol + 2.0**-7 * ref.double().abs()
    return tol


def assert_close(out, ref, tols):
    err = (out.double() - ref.double()).abs()
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (err <= tols).all(), f"max err {err.max():.3g}, worst err/tol {(err / tols).max():.3g}"


# ------------------------------------------------------------------------------------ vs reference


@SETTINGS
@given(lens=st.lists(st.integers(1, 200), min_size=1, max_size=5), heads=st.sampled_from(HEADS),
       d=st.sampled_from([8, 64, 128]), block_size=st.sampled_from([1, 5, 16]),
       cache_dtype=st.sampled_from(CACHE_DTYPES), q_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_decode_matches_reference(lens, heads, d, block_size, cache_dtype, q_dtype, seed):
    h, kvh = heads
    paged = Paged(lens, kvh, d, cache_dtype, block_size, seed, kv_scales=(0.05, 0.2))
    q = (torch.randn(len(lens), h, d, generator=torch.Generator().manual_seed(seed)) * 3).to(q_dtype)
    out = paged.decode(q)  # dispatches to our kernel for CPU tensors
    ref = paged.decode(q, fn=paged_attention_decode_reference)
    tols = torch.stack([tolerance(paged, q[b], b, n, ref[b]) for b, n in enumerate(lens)])
    assert_close(out, ref, tols)


@SETTINGS
@given(chunks=st.lists(st.tuples(st.integers(1, 150), st.integers(0, 40)), min_size=1, max_size=4),
       heads=st.sampled_from(HEADS), cache_dtype=st.sampled_from(CACHE_DTYPES),
       q_dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_prefill_matches_reference(chunks, heads, cache_dtype, q_dtype, seed):
    """Chunks (n_new, cached before it) of several sequences in one call, causal over the cache."""
    h, kvh = heads
    d = 64
    lens = [n + ctx for n, ctx in chunks]
    paged = Paged(lens, kvh, d, cache_dtype, 16, seed, kv_scales=(0.05, 0.2))
    n_new = [n for n, _ in chunks]
    q = (torch.randn(sum(n_new), h, d, generator=torch.Generator().manual_seed(seed)) * 3).to(q_dtype)
    seqs = list(range(len(lens)))
    out = paged.prefill(q, seqs, n_new)
    ref = paged.prefill(q, seqs, n_new, fn=paged_attention_prefill_reference)
    tols, t = [], 0
    for b, (n, ctx) in enumerate(chunks):
        for i in range(n):
            tols.append(tolerance(paged, q[t], b, ctx + i + 1, ref[t]))
            t += 1
    assert_close(out, ref, torch.stack(tols))


def test_zero_length_and_empty_chunks():
    """A padding sequence (seq_len 0) decodes to zeros; an empty chunk contributes no tokens."""
    paged = Paged([0 + 1, 20], 3, 64, torch.float32)
    paged.lens[0] = 0
    q = torch.randn(2, 9, 64)
    out = paged.decode(q)
    assert torch.equal(out[0], torch.zeros(9, 64))
    assert torch.equal(out[1], paged.decode(q[1:], rows=[1])[0])
    out = paged.prefill(q[1:], [0, 1], [0, 1])
    assert torch.equal(out, paged.decode(q[1:], rows=[1]))


# ------------------------------------------------------------------------------------ invariance


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_row_alone_equals_row_in_any_batch(cache_dtype, threads):
    """Sequence 0's decode row, alone vs inside batches of 2..16 at every position (the other sequences
    of other lengths), bit for bit; with 1 and 2 threads."""
    lens = [37] + [int(x) for x in torch.randint(1, 300, (15,), generator=torch.Generator().manual_seed(1))]
    paged = Paged(lens, 3, 64, cache_dtype, kv_scales=(0.05, 0.2))
    q = torch.randn(16, 9, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone = paged.decode(q[:1], rows=[0])
        for size in range(2, 17):
            for pos in {0, size // 2, size - 1}:
                rows = list(range(1, size))
                rows.insert(pos, 0)
                out = paged.decode(q[rows], rows=rows)
                assert torch.equal(bits(out[pos]), bits(alone[0])), (size, pos)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_decode_equals_prefill_in_any_chunking(cache_dtype):
    """Each token of a 70-token sequence: decoded at its position == inside a prefill of the whole prompt
    == inside chunks of 1, 7, 16 (each chunk attending to the earlier ones in the cache), also packed
    beside another sequence's chunk: bit for bit. This is what makes chunked prefill and prefix-cache
    hits batch invariant."""
    n = 70
    paged = Paged([n, 50], 3, 64, cache_dtype, kv_scales=(0.05, 0.2))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(n, 9, 64, generator=g)
    other = torch.randn(50, 9, 64, generator=g)
    decoded = torch.cat([paged.prefill(q[i:i + 1], [0], [1], lens=[i + 1]) for i in range(n)])  # one token each
    whole = paged.prefill(q, [0], [n])
    assert torch.equal(bits(whole), bits(decoded))
    for chunk in (1, 7, 16):
        parts = []
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            # the chunk packed after 5 tokens of sequence 1
            out = paged.prefill(torch.cat([other[:5], q[start:end]]), [1, 0], [5, end - start], lens=[50, end])
            parts.append(out[5:])
        assert torch.equal(bits(torch.cat(parts)), bits(decoded)), chunk
    # and each decode position against the same token of the whole prefill
    for i in (0, 15, 16, 17, n - 2):
        paged.lens[0] = i + 1
        assert torch.equal(bits(paged.decode(q[i:i + 1], rows=[0])[0]), bits(whole[i])), i
    paged.lens[0] = n


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_isas_and_threads_agree(cache_dtype):
    """portable == AVX2 (== AVX-512 where the CPU has it), 1 thread == 2 threads, bit for bit, decode and
    prefill, fp32 and bf16 queries."""
    lens = [1, 9, 64, 130, 300]
    paged = Paged(lens, 3, 64, cache_dtype, kv_scales=(0.05, 0.2))
    g = torch.Generator().manual_seed(4)
    qd = torch.randn(len(lens), 9, 64, generator=g)
    qp = torch.randn(40, 9, 64, generator=g).to(torch.bfloat16)
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for isa in ISAS:
                results[(isa, threads)] = (
                    bits(paged.decode(qd, fn=cpu_attention.paged_attention_decode, isa=isa)),
                    bits(paged.prefill(qp, [2, 4], [20, 20], fn=cpu_attention.paged_attention_prefill, isa=isa)))
    finally:
        torch.set_num_threads(before)
    first = next(iter(results.values()))
    for key, (dec, pre) in results.items():
        assert torch.equal(dec, first[0]) and torch.equal(pre, first[1]), key
    assert "avx2" in ISAS or "avx2" not in open("/proc/cpuinfo").read(), "AVX2 CPU but no AVX2 path"


def test_dispatch_and_fallback(monkeypatch):
    """CPU tensors run our kernel when it takes the call; dtypes it does not handle (fp16) and a failed
    build run the torch reference."""
    import fp8_turbo.kernels.paged_attention as pa

    paged = Paged([20], 1, 64, torch.float32)
    q = torch.randn(1, 4, 64)
    assert torch.equal(paged.decode(q), paged.decode(q, fn=cpu_attention.paged_attention_decode))
    q16 = q.half()
    paged.k_cache, paged.v_cache = paged.k_cache.half(), paged.v_cache.half()
    assert torch.equal(paged.decode(q16), paged.decode(q16, fn=paged_attention_decode_reference))
    paged.k_cache, paged.v_cache = paged.k_cache.float(), paged.v_cache.float()
    monkeypatch.setattr(pa.cpu_attention, "available", lambda: False)
    assert torch.equal(paged.decode(q), paged.decode(q, fn=paged_attention_decode_reference))


@SETTINGS
@given(t=st.integers(1, 40), kvh=st.integers(1, 4), d=st.sampled_from([8, 64]), src_dtype=st.sampled_from(
       [torch.float32, torch.bfloat16]), cache_dtype=st.sampled_from(CACHE_DTYPES),
       k_scale=st.floats(1e-3, 10.0), seed=st.integers(0, 2**16))
def test_write_kv_is_the_reference_bit_for_bit(t, kvh, d, src_dtype, cache_dtype, k_scale, seed):
    """kernels.write_kv on CPU (our loop) leaves the caches byte for byte as the reference does: strided
    k, v views of a fused projection, skipped (negative) slots, saturating e4m3 values."""
    from fp8_turbo.kernels.kv_write import write_kv, write_kv_reference

    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(t, 3 * kvh * d, generator=g) * torch.logspace(-4, 4, t)[:, None]).to(src_dtype)
    k, v = qkv[:, kvh * d: 2 * kvh * d].view(t, kvh, d), qkv[:, 2 * kvh * d:].view(t, kvh, d)
    num_blocks, block_size = t // 4 + 2, 4
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slots[::3] = -1
    caches = [torch.zeros(num_blocks, block_size, kvh, d).to(cache_dtype) for _ in range(4)]
    write_kv(k, v, caches[0], caches[1], slots, k_scale, 0.5)
    write_kv_reference(k, v, caches[2], caches[3], slots, k_scale, 0.5)
    for ours, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(ours.view(torch.uint8), ref.view(torch.uint8))
