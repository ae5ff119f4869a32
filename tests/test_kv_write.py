"""write_kv: the reference against a plain per-token loop; the Triton kernel (interpreter) against the reference."""
import torch

from kernels.kv_write import write_kv, write_kv_reference


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
