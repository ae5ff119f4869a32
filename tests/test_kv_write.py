"""write_kv: the reference against a plain per-token loop; the Triton kernel (interpreter) against the
reference, bit for bit (the kernel rounds to the e4m3 grid exactly as kernels/fp8.round_to_e4m3 does).

TRITON_INTERPRET must be set before triton is imported (triton.language's own jit'd helpers are bound to
the compiler or the interpreter at import), so setting it inside a test is too late and setting it at
module top would leak into the other modules of the xdist worker. The interpreter tests therefore run in a
fresh process: test_interpreter_subprocess re-runs this file with TRITON_INTERPRET=1, where they execute.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from interpreter import in_interpreter, rerun_in_interpreter
from fp8_turbo.kernels.backend import interpreting
from fp8_turbo.kernels.kv_write import write_kv, write_kv_reference, write_kv_triton



@pytest.mark.skipif(interpreting(), reason="already in the interpreter")
def test_interpreter_subprocess():
    rerun_in_interpreter(__file__)


def _caches(num_blocks, block_size, kvh, d, dtype):
    shape = (num_blocks, block_size, kvh, d)
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def test_reference_matches_loop_and_skips_padding():
    torch.manual_seed(0)
    t, kvh, d, bs = 7, 2, 16, 4
    k, v = torch.randn(t, kvh, d) * 100, torch.randn(t, kvh, d)
    slots = torch.tensor([13, -1, 2, 0, 7, -1, 30], dtype=torch.int64)
    for dtype in (torch.float32, torch.float8_e4m3fn):
        k_cache, v_cache = _caches(8, bs, kvh, d, dtype)
        write_kv(k, v, k_cache, v_cache, slots, k_scale=0.5, v_scale=2.0)
        expect_k, expect_v = _caches(8, bs, kvh, d, torch.float32)
        for i, s in enumerate(slots.tolist()):
            if s < 0:
                continue
            if dtype == torch.float8_e4m3fn:
                expect_k[s // bs, s % bs] = (k[i] / 0.5).clamp(-448, 448).to(dtype).float()
                expect_v[s // bs, s % bs] = (v[i] / 2.0).clamp(-448, 448).to(dtype).float()
            else:
                expect_k[s // bs, s % bs], expect_v[s // bs, s % bs] = k[i], v[i]
        assert torch.equal(k_cache.float(), expect_k)
        assert torch.equal(v_cache.float(), expect_v)
    # saturation: |k / k_scale| > 448 stores +-448, never NaN
    assert k_cache.float().abs().max() == 448.0


# ----------------------------------------------------------------------------------------------------
# Triton kernel in the interpreter: bit-exact against the reference
# ----------------------------------------------------------------------------------------------------
def _fp8_edge_values():
    """Every e4m3 value, the midpoints between neighbours (ties round to even), values just off the
    midpoints, subnormals, and values beyond +-448 (saturate)."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()  # sorted, -448 .. 448
    mid = (grid[1:] + grid[:-1]) / 2
    extra = torch.tensor([449.0, 464.0, 480.0, 1e4, 2.0 ** -10, 2.0 ** -11, 3 * 2.0 ** -11, -0.0])
    return torch.cat([grid, mid, mid * (1 + 2.0 ** -20), mid * (1 - 2.0 ** -20), extra, -extra])


@in_interpreter
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_triton_fp8_rounding_matches_torch(scale):
    d = 64
    vals = _fp8_edge_values() * scale
    vals = torch.cat([vals, torch.zeros(-vals.numel() % d)]).view(-1, 1, d)  # [T, 1, 64]
    t = vals.shape[0]
    slots = torch.arange(t, dtype=torch.int64)
    got = [torch.zeros(t, 1, 1, d, dtype=torch.float8_e4m3fn) for _ in range(2)]
    want = [torch.zeros_like(got[0]) for _ in range(2)]
    write_kv_triton(vals, -vals, *got, slots, scale, scale)
    write_kv_reference(vals, -vals, *want, slots, scale, scale)
    for g, w in zip(got, want):
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8))  # bits: -0 stays -0


@in_interpreter
@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    t=st.integers(1, 40), kvh=st.sampled_from([1, 3, 8]), d=st.sampled_from([64, 128]),
    block_size=st.sampled_from([16, 32]),
    dtypes=st.sampled_from([(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                            (torch.float32, torch.float8_e4m3fn), (torch.bfloat16, torch.float8_e4m3fn)]),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference(t, kvh, d, block_size, dtypes, seed):
    in_dtype, cache_dtype = dtypes
    gen = torch.Generator().manual_seed(seed)
    num_blocks = -(-t // block_size) + 2
    k = (torch.randn(t, kvh, d, generator=gen) * 4).to(in_dtype)
    v = torch.randn(t, kvh, d, generator=gen).to(in_dtype)
    # distinct scattered slots, some tokens padding (-1)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[torch.rand(t, generator=gen) < 0.2] = -1
    shape = (num_blocks, block_size, kvh, d)
    got = [torch.zeros(shape, dtype=cache_dtype) for _ in range(2)]
    want = [torch.zeros(shape, dtype=cache_dtype) for _ in range(2)]
    write_kv(k, v, *got, slots, 0.03, 0.01)  # public launcher: Triton when interpreting
    write_kv_reference(k, v, *want, slots, 0.03, 0.01)
    for g, w in zip(got, want):
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_matches_reference(cache_dtype):
    gen = torch.Generator().manual_seed(0)
    t, kvh, d, block_size, num_blocks = 300, 8, 128, 16, 64
    k = (torch.randn(t, kvh, d, generator=gen) * 4).bfloat16()
    v = torch.randn(t, kvh, d, generator=gen).bfloat16()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[::7] = -1
    shape = (num_blocks, block_size, kvh, d)
    got = [torch.zeros(shape, dtype=cache_dtype, device="cuda") for _ in range(2)]
    want = [torch.zeros(shape, dtype=cache_dtype) for _ in range(2)]
    write_kv(k.cuda(), v.cuda(), *got, slots.cuda(), 0.03, 0.01)
    write_kv_reference(k, v, *want, slots, 0.03, 0.01)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu().view(torch.uint8), w.view(torch.uint8))
