"""Ahead-of-time compile of every FP8 kernel configuration for Hopper (sm_90a) and Ada (sm_89): no GPU.

The interpreter accepts tiles the GPU rejects (design.md pitfall 3); this is the check that the real
compiler takes them. Each case compiles one kernel (~1-3 s on 2 cores) with the specializations the
JIT would see at run time (16-byte aligned pointers and strides, unit K strides), then checks:
  - sm_90a: the GEMM's MMA is `wgmma.mma_async ... e4m3.e4m3` (prefill and the swapped decode tiles);
    sm_89: `mma.sync ... e4m3.e4m3`;
  - shared memory fits an H100 (<= 227 KB per block);
  - register spills, read from ptxas -v, are reported (printed; `pytest -rA` shows them) and bounded
    by MAX_SPILL_BYTES;
  - the split-K decode tiles (fp32 partials, what `bench/gemm.py --split-k` sweeps) compile the same way.
"""
from __future__ import annotations

import re

import pytest
import triton
import triton.language as tl

import fp8_turbo.kernels.gemm as gemm
from fp8_turbo.kernels import quantize as quant
from fp8_turbo.kernels.aot import aot_compile

H100_MAX_SHARED = 227 * 1024  # opt-in shared memory per block on H100 (228 KB per SM)
MAX_SPILL_BYTES = 256  # a few spilled registers are tolerable; more means the tile is too big
ARCHS = {90: "sm_90a", 89: "sm_89"}
GEMM_INTS = [
    "M", "N", "K", "M_BUCKET", "N_KEY", "stride_am", "stride_ak", "stride_bn", "stride_bk",
    "stride_cs", "stride_cm", "stride_cn", "stride_asm", "stride_ask", "stride_bsn", "stride_bsk",
]


def _compile(fn, signature: dict, constexprs: dict, aligned: list[str], num_warps: int, num_stages: int, arch: int):
    """aot_compile for cuda:arch with exactly the `aligned` arguments 16-byte aligned; (kernel, ptxas log)."""
    return aot_compile(fn, signature, constexprs, arch=arch, num_warps=num_warps, num_stages=num_stages,
                       aligned=tuple(aligned), align_strides=False, capture_ptxas=True)


def _spills(ptxas_log: str) -> int:
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas_log))


@pytest.fixture(autouse=True)
def _fresh_compile(tmp_path, monkeypatch):
    """Compile for real (a cache hit would skip ptxas and its log) and capture the ptxas log."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(triton.knobs.nvidia, "dump_ptxas_log", True)


def _gemm_cases():
    for cfg in gemm.GEMM_CONFIGS:
        decode = cfg in gemm.DECODE_CONFIGS
        name = "decode" if decode else "prefill"
        tile = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        tag = f"{name}-{tile}-w{cfg.num_warps}s{cfg.num_stages}"
        for arch in ARCHS:
            yield pytest.param(cfg, arch, "channel", id=f"{tag}-{ARCHS[arch]}-channel")
        yield pytest.param(cfg, 90, "block", id=f"{tag}-sm_90a-block")


@pytest.mark.parametrize("cfg, arch, scales", list(_gemm_cases()))
def test_gemm_config_compiles(cfg, arch, scales):
    decode = cfg in gemm.DECODE_CONFIGS
    sig = {
        "a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16",
        "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32", "bias_ptr": "*bf16",
        **{name: "i32" for name in GEMM_INTS},
    }
    # Decode runs swapped (c.T = w @ x.T): the kernel's a is the weight and c is written transposed.
    weight_rows, act_rows = gemm.SCALE_BLOCK, 1
    a_rows, b_rows = (weight_rows, act_rows) if decode else (act_rows, weight_rows)
    block = scales == "block"
    constexprs = dict(
        stride_ak=1, stride_bk=1, **({"stride_cm": 1} if decode else {"stride_cn": 1}),
        A_SCALE_ROWS=a_rows if block else 1, A_SCALE_K=block,
        B_SCALE_ROWS=b_rows if block else 1, B_SCALE_K=block,
        HAS_BIAS=True, BIAS_ALONG_M=decode, SPLIT_K=1, **cfg.kwargs,
    )
    for name in constexprs:
        sig.pop(name, None)
    aligned = ["a_ptr", "b_ptr", "c_ptr", "K", "stride_am", "stride_bn", "stride_cn" if decode else "stride_cm"]
    kernel, log = _compile(gemm._fp8_gemm_kernel, sig, constexprs, aligned, cfg.num_warps, cfg.num_stages, arch)

    ptx = kernel.asm["ptx"]
    mma = sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)[\w.]*", ptx)))
    shared = kernel.metadata.shared
    spills = _spills(log)
    print(f"{ARCHS[arch]} {cfg} {scales}: mma={mma} shared={shared} B spills={spills} B")
    if arch == 90:
        assert any(m.startswith("wgmma.mma_async") and "e4m3.e4m3" in m for m in mma), mma
    else:
        assert any(m.startswith("mma.sync") and "e4m3.e4m3" in m for m in mma), mma
    assert shared <= H100_MAX_SHARED, (cfg, shared)
    assert spills <= MAX_SPILL_BYTES, f"{cfg}: {spills} bytes of register spills\n{log}"


@pytest.mark.parametrize("arch", list(ARCHS), ids=list(ARCHS.values()))
def test_quantize_kernels_compile(arch):
    row_sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
               "M": "i32", "K": "i32", "stride_xm": "i32", "stride_qm": "i32"}
    for static in (False, True):
        kernel, log = _compile(
            quant._quantize_row_kernel, row_sig, dict(STATIC_SCALE=static, BLOCK_K=quant.ROW_BLOCK_K),
            ["x_ptr", "q_ptr", "stride_xm", "stride_qm"], 4, 2, arch,
        )
        # the e4m3 cast in hardware: from f32, or (triton 3.6 on sm_89) from f16 after an f32 -> f16 cvt.
        # Both are exact here: the kernel rounds to the e4m3 grid in fp32 first, and every e4m3 value
        # (at most 4 significant bits, 2^-9 .. 448) is exact in f16, so the result is bit-identical.
        assert re.search(r"cvt\.rn\.satfinite\.e4m3x2\.(f32|f16x2)", kernel.asm["ptx"]), arch
        assert _spills(log) == 0, log
    group_sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
                 "M": "i32", "K": "i32", "G": "i32", "stride_xm": "i32", "stride_qm": "i32", "stride_sm": "i32"}
    kernel, log = _compile(
        quant._quantize_group_kernel, group_sig,
        dict(GROUP_SIZE=128, BLOCK_G=128, GROUPS_PER_PROG=quant.GROUPS_PER_PROG),
        ["x_ptr", "q_ptr", "stride_xm", "stride_qm"], 4, 2, arch,
    )
    assert _spills(log) == 0, log


@pytest.mark.parametrize("cfg", gemm.W8A16_CONFIGS, ids=lambda c: "x".join(str(c.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")))
def test_w8a16_config_compiles(cfg):
    """fp8-weight-only (W8A16): the e4m3 weight tile upcast to bf16 in registers, then bf16 wgmma on sm_90a."""
    decode = cfg in gemm.W8A16_DECODE_CONFIGS
    # decode runs swapped: the kernel's a is the e4m3 weight, b the bf16 activations; prefill the reverse
    a_t, b_t = ("*fp8e4nv", "*bf16") if decode else ("*bf16", "*fp8e4nv")
    sig = {"a_ptr": a_t, "b_ptr": b_t, "c_ptr": "*bf16", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
           "bias_ptr": "*bf16", **{name: "i32" for name in GEMM_INTS}}
    constexprs = dict(
        stride_ak=1, stride_bk=1, **({"stride_cm": 1} if decode else {"stride_cn": 1}),
        A_SCALE_ROWS=1, A_SCALE_K=False, B_SCALE_ROWS=1, B_SCALE_K=False,
        HAS_BIAS=False, BIAS_ALONG_M=decode, SPLIT_K=1, UPCAST=True, DOT_DTYPE=tl.bfloat16, **cfg.kwargs,
    )
    for name in constexprs:
        sig.pop(name, None)
    aligned = ["a_ptr", "b_ptr", "c_ptr", "K", "stride_am", "stride_bn", "stride_cn" if decode else "stride_cm"]
    kernel, log = _compile(gemm._fp8_gemm_kernel, sig, constexprs, aligned, cfg.num_warps, cfg.num_stages, 90)
    mma = sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)[\w.]*", kernel.asm["ptx"])))
    print(f"sm_90a W8A16 {cfg}: mma={mma} shared={kernel.metadata.shared} B spills={_spills(log)} B")
    assert any(m.startswith("wgmma.mma_async") and "bf16.bf16" in m for m in mma), mma
    assert kernel.metadata.shared <= H100_MAX_SHARED
    assert _spills(log) <= MAX_SPILL_BYTES, log


@pytest.mark.parametrize("cfg", [c for c in gemm.DECODE_CONFIGS if c.kwargs["BLOCK_N"] == gemm.MIN_DECODE_TILE],
                         ids=lambda c: "x".join(str(c.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")))
def test_split_k_decode_config_compiles(cfg):
    """Split-K (SPLIT_K=2) on the swapped decode path at M <= 16: fp32 partials [SPLIT_K, M, N], e4m3 wgmma."""
    launch = gemm.gemm_launch(1, 8192, 8192, (gemm.PER_ROW, 1), (gemm.PER_ROW, 1), has_bias=False, split_k=2)
    assert launch.swap and launch.split_k == 2 and cfg in launch.configs
    sig = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*fp32", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
           "bias_ptr": "*fp32", **{name: "i32" for name in GEMM_INTS}}
    constexprs = dict(stride_ak=1, stride_bk=1, stride_cm=1, **launch.constexprs(cfg))
    for name in constexprs:
        sig.pop(name, None)
    aligned = ["a_ptr", "b_ptr", "c_ptr", "K", "stride_am", "stride_bn", "stride_cn", "stride_cs"]
    kernel, log = _compile(gemm._fp8_gemm_kernel, sig, constexprs, aligned, cfg.num_warps, cfg.num_stages, 90)
    mma = sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", kernel.asm["ptx"])))
    print(f"sm_90a split-K 2 {cfg}: mma={mma} shared={kernel.metadata.shared} B spills={_spills(log)} B")
    assert any("e4m3.e4m3" in m for m in mma), mma
    assert kernel.metadata.shared <= H100_MAX_SHARED
    assert _spills(log) <= MAX_SPILL_BYTES, log
