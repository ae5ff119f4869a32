"""Ahead-of-time compile of every attention kernel config for Hopper (sm_90a) and Ada (sm_89), on a
machine without a GPU (ptxas ships in the triton wheel): catches what the interpreter accepts and the GPU
rejects (tl.dot shapes, fp8 casts, early returns) and checks shared memory. One config per kernel and
model shape (SmolLM2: D 64, group 3; Llama-3.3-70B: D 128, group 8), a few seconds each.

The compiles see what the JIT sees at run time: pointers and the strides the engine passes (all
multiples of 16) carry `tt.divisibility = 16`. Without it the compiler cannot prove 16-byte alignment,
issues 1-byte loads and pipelines nothing, which is what an earlier version of this test measured
("KV_STAGES=3 adds 512 B of shared memory"). With it, the K/V loop's shared-memory buffers are read
from the compiled TTGIR: two per K and V tile at KV_STAGES = 5 (tests below).
"""
import re

import pytest
import triton
import triton.language as tl

from fp8_turbo.kernels import kv_write, paged_attention as pa
from fp8_turbo.kernels.aot import aot_compile
from fp8_turbo.kernels.backend import interpreting

pytestmark = pytest.mark.skipif(interpreting(), reason="AOT compile needs the compiled (not interpreted) kernels")

SHARED_LIMIT = 227 * 1024  # H100 / H200 max shared memory per block; sm_89 allows 99 KB (checked below)
TARGETS = {"sm90": 90, "sm89": 89}  # cuda arch
SMEM = {"sm90": SHARED_LIMIT, "sm89": 99 * 1024}


def _compile(kernel, types, constexprs, target, num_warps, num_stages):
    # pointers and strides 16-byte aligned, as the JIT specializes them; FMA contraction on (the default)
    k, _ = aot_compile(kernel, types, constexprs, arch=TARGETS[target], num_warps=num_warps, num_stages=num_stages)
    return k


def _kv_types(kv_dtype):
    return {"k_cache_ptr": f"*{kv_dtype}", "v_cache_ptr": f"*{kv_dtype}", "block_tables_ptr": "*i32",
            "seq_lens_ptr": "*i32", "sm_scale": "fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}


def kv_buffers(ttgir: str, kv_dtype: str) -> list[int]:
    """Leading dims of the shared-memory buffers of the [BLOCK_N, D] K/V tiles in compiled TTGIR
    (e.g. `ttg.local_alloc : () -> !ttg.memdesc<2x64x128xf8E4M3FN, ...>` -> 2)."""
    elem = {"fp8e4nv": "f8E4M3FN", "bf16": "bf16"}[kv_dtype]
    return [int(n) for n in re.findall(rf"local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x{elem}", ttgir)]


def _via_f32(target, kv):
    """As the launcher decides (kernels/paged_attention._upcast_via_f32): e4m3 caches before sm_90."""
    return kv == "fp8e4nv" and target == "sm89"


# (name, head_dim, group, kv dtype, q dtype) -- the two flagship shapes, fp8 and bf16 KV
SHAPES = [("llama70b-fp8kv", 128, 8, "fp8e4nv", "bf16"), ("smollm2-bf16kv", 64, 3, "bf16", "bf16")]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name,d,group,kv,qd", SHAPES)
def test_decode_compiles(target, name, d, group, kv, qd):
    split = name.startswith("llama")  # the 70B shape at small batch splits; SmolLM2 writes out directly
    types = {"q_ptr": f"*{qd}", "out_ptr": "*fp32" if split else f"*{qd}", "lse_ptr": "*fp32", **_kv_types(kv)}
    constexprs = dict(GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_D=d,
                      BLOCK_SIZE=16, BLOCK_N=pa.DECODE_BLOCK_N, SPLIT=split, DOT_DTYPE=tl.bfloat16,
                      KV_STAGES=pa.KV_STAGES, MIN_PARTITION=pa.MIN_PARTITION, VIA_F32=_via_f32(target, kv))
    k = _compile(pa.paged_attention_decode_kernel, types, constexprs, target, pa.NUM_WARPS, pa.KV_STAGES)
    assert k.metadata.shared <= SMEM[target], k.metadata.shared
    buffers = kv_buffers(k.asm["ttgir"], kv)
    tile = pa.DECODE_BLOCK_N * d * (1 if kv == "fp8e4nv" else 2)
    print(f"decode {name} {target}: shared={k.metadata.shared} B, K/V tile buffers {buffers} of {tile} B")
    assert len(buffers) == 2 and min(buffers) >= 2, f"K and V tiles not multi-buffered: {buffers}"
    assert k.metadata.shared >= 2 * 2 * tile, k.metadata.shared
    ptx = k.asm["ptx"]
    assert "mma" in ptx  # tensor-core dot for q.k and p.v
    assert "cp.async" in ptx  # K/V tiles pipelined
    assert "ex2.approx" in ptx  # exp2 softmax
    if kv == "fp8e4nv":
        assert "cvt.rn.bf16x2.e4m3x2" in ptx or "cvt.rn.f16x2.e4m3x2" in ptx, "fp8 KV upcast in hardware"
    if split:
        r = _compile(pa.paged_attention_reduce_kernel, {"partial_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": f"*{qd}"},
                     dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_S=16), target, pa.NUM_WARPS, 1)
        assert r.metadata.shared <= SMEM[target]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name,d,group,kv,qd", SHAPES)
def test_prefill_compiles(target, name, d, group, kv, qd):
    types = {"q_ptr": f"*{qd}", "out_ptr": f"*{qd}", "cu_seqlens_q_ptr": "*i32", **_kv_types(kv)}
    constexprs = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=d, BLOCK_SIZE=16, BLOCK_T=pa.PREFILL_BLOCK_M // group,
                      BLOCK_M=pa.PREFILL_BLOCK_M, BLOCK_N=pa.PREFILL_BLOCK_N, DOT_DTYPE=tl.bfloat16,
                      KV_STAGES=pa.KV_STAGES, VIA_F32=_via_f32(target, kv))
    k = _compile(pa.paged_attention_prefill_kernel, types, constexprs, target, pa.NUM_WARPS, pa.KV_STAGES)
    assert k.metadata.shared <= SMEM[target], k.metadata.shared
    assert "mma" in k.asm["ptx"] and "cp.async" in k.asm["ptx"]
    buffers = kv_buffers(k.asm["ttgir"], kv)
    print(f"prefill {name} {target}: shared={k.metadata.shared} B, K/V tile buffers {buffers}")
    assert len(buffers) == 2 and min(buffers) >= 2, f"K and V tiles not multi-buffered: {buffers}"


@pytest.mark.parametrize("target", TARGETS)
def test_write_kv_compiles(target):
    types = {"k_ptr": "*bf16", "v_ptr": "*bf16", "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv",
             "slot_ptr": "*i64", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
    constexprs = dict(KVH=8, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_HD=1024, FP8=True)
    k = _compile(kv_write.write_kv_kernel, types, constexprs, target, 4, 1)
    ptx = k.asm["ptx"]
    assert "div.rn.f32" in ptx  # correctly rounded k / k_scale, as the reference
    assert "e4m3" in ptx
