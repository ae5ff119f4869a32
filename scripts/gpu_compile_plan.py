"""Estimate, on a CPU, the Triton compiles each part of scripts/gpu_check.py triggers on the GPU, and time them.

    python scripts/gpu_compile_plan.py --tier quick             # variants per part (no compiling)
    python scripts/gpu_compile_plan.py --tier quick --compile   # and compile each for sm_90a, timed

A GPU run compiles a kernel variant the first time it launches a new combination of constexprs, tile
config (every candidate the autotuner's prune leaves, for each new autotune key) and argument
specialization (pointer dtypes; integers equal to 1 or divisible by 16). This walks the launches each
part makes for the tier in scripts/gpu_check_tiers.py, through the launchers' own decision functions
(kernels.gemm.gemm_launch; the attention split rule with the GPU's 132 SMs), and counts the variants
each part adds that no earlier part compiled. It follows the parts' loops by hand: keep it beside them.
Not counted: the GEMM autotuner's benchmark runs (~0.2 s per candidate per key, on the GPU), pytest's
attention and KV tests (small kernels), anything torch compiles itself.

--compile builds each variant with fp8_turbo.kernels.aot (sm_90a, a fresh cache) and prints the seconds per
part: on the GPU host the count should match what gpu_check.py prints per part ("Triton compiles: N"),
and the seconds scale with that machine's CPU (16 cores; each compile is one process, single-threaded).
It also proves that every variant the run needs compiles under the installed triton (3.6 in
.gpu-venv: scripts/gpu_venv.sh).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fp8_turbo.kernels import gemm, kv_write, paged_attention as pa, quantize as quant  # noqa: E402
from gpu_check_tiers import ORDER, TIERS, Tier  # noqa: E402

SMS = 132  # H100 SXM and H200
LAYERS = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}
KVH, HEADS, D, BLOCK = 8, 64, 128, 16
LAYOUT = {"token": (gemm.PER_ROW, 1), "channel": (gemm.PER_ROW, 1), "tensor": (gemm.PER_TENSOR, 1),
          "group": (gemm.PER_BLOCK, 1), "block": (gemm.PER_BLOCK, gemm.SCALE_BLOCK)}
TL = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv", torch.float16: "fp16"}
GEMM_INTS = ["M", "N", "K", "M_BUCKET", "N_KEY", "stride_am", "stride_ak", "stride_bn", "stride_bk",
             "stride_cs", "stride_cm", "stride_cn", "stride_asm", "stride_ask", "stride_bsn", "stride_bsk"]


@dataclass(frozen=True)
class Variant:
    kernel: str  # name of the @triton.jit function in KERNELS
    types: tuple  # (arg, element type) of the pointer arguments (*_ptr), (arg, type) of typed scalars
    constexprs: tuple  # (name, value), sorted
    num_warps: int
    num_stages: int
    spec: tuple = ()  # integer specializations that split variants (e.g. K % 16 == 0)

    def label(self) -> str:
        c = dict(self.constexprs)
        tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c)
        return f"{self.kernel}{'[' + tile + ']' if tile else ''} w{self.num_warps}s{self.num_stages}"


KERNELS = {"fp8_gemm": gemm._fp8_gemm_kernel, "quantize_row": quant._quantize_row_kernel,
           "quantize_group": quant._quantize_group_kernel, "write_kv": kv_write.write_kv_kernel,
           "decode": pa.paged_attention_decode_kernel, "reduce": pa.paged_attention_reduce_kernel,
           "prefill": pa.paged_attention_prefill_kernel}


@dataclass
class Plan:
    seen: set = field(default_factory=set)
    parts: dict = field(default_factory=dict)  # part -> [Variant] it adds
    keys: dict = field(default_factory=dict)  # part -> autotune keys it tunes first
    part: str = ""

    def add(self, v: Variant) -> None:
        if v not in self.seen:
            self.seen.add(v)
            self.parts.setdefault(self.part, []).append(v)

    # ---- launches -------------------------------------------------------------------------------------
    def gemm(self, m, n, k, act, weight, *, w8a16=None, split_k=None, deterministic=False, bias=None):
        a_layout = (gemm.PER_TENSOR, 1) if w8a16 is not None else LAYOUT[act]
        launch = gemm.gemm_launch(m, n, k, a_layout, LAYOUT[weight], has_bias=bias is not None, w8a16_dtype=w8a16,
                                  split_k=split_k, deterministic=deterministic, num_sms=SMS)
        act_t = TL[w8a16] if w8a16 is not None else "fp8e4nv"
        a_t, b_t = ("fp8e4nv", act_t) if launch.swap else (act_t, "fp8e4nv")
        c_t = "fp32" if launch.split_k > 1 else ("bf16" if w8a16 is None else act_t)
        types = (("a_ptr", a_t), ("b_ptr", b_t), ("c_ptr", c_t), ("a_scale_ptr", "fp32"), ("b_scale_ptr", "fp32"),
                 ("bias_ptr", TL[bias] if bias is not None else "fp32"))
        spec = (("K%16", k % 16 == 0), ("N%16", n % 16 == 0))
        if launch.autotuned:
            key = (gemm.m_bucket(m), n, k, launch.meta)
            if key not in self.seen:
                self.seen.add(key)
                self.keys.setdefault(self.part, []).append(key)
        for cfg in launch.configs:
            self.add(Variant("fp8_gemm", types, tuple(sorted(launch.constexprs(cfg).items(), key=str)),
                             cfg.num_warps, cfg.num_stages, spec))

    def linear(self, m, n, k, *, x_dtype=torch.bfloat16, deterministic=False):
        """A Linear layer of scheme fp8 on CUDA: per-token quantize, then the GEMM."""
        self.quantize("token", x_dtype)
        self.gemm(m, n, k, "token", "channel", deterministic=deterministic)

    def quantize(self, granularity, x_dtype):
        types = (("x_ptr", TL[x_dtype]), ("q_ptr", "fp8e4nv"), ("scale_ptr", "fp32"))
        if granularity == "group":
            self.add(Variant("quantize_group", types, (("BLOCK_G", 128), ("GROUPS_PER_PROG", quant.GROUPS_PER_PROG),
                                                      ("GROUP_SIZE", 128)), 4, 3))
        else:
            static = 1 if granularity == "tensor" else 0
            self.add(Variant("quantize_row", types, (("BLOCK_K", quant.ROW_BLOCK_K), ("STATIC_SCALE", static)), 4, 3))

    def write_kv(self, cache_dtype, x_dtype=torch.bfloat16):
        types = (("k_ptr", TL[x_dtype]), ("v_ptr", TL[x_dtype]), ("k_cache_ptr", TL[cache_dtype]),
                 ("v_cache_ptr", TL[cache_dtype]), ("slot_ptr", "i64"), ("k_scale_ptr", "fp32"), ("v_scale_ptr", "fp32"))
        self.add(Variant("write_kv", types, (("BLOCK_HD", KVH * D), ("BLOCK_SIZE", BLOCK), ("FP8", cache_dtype == torch.float8_e4m3fn),
                                            ("HEAD_DIM", D), ("KVH", KVH)), 4, 3))

    def decode(self, batch, max_seq_len, cache_dtype, q_dtype=torch.bfloat16):
        with mock.patch.object(pa, "_num_sms", lambda device: SMS):
            splits = pa.decode_num_splits(batch, KVH, max_seq_len, torch.device("cuda"))
        split = splits > 1
        types = (("q_ptr", TL[q_dtype]), ("out_ptr", "fp32" if split else TL[q_dtype]), ("lse_ptr", "fp32" if split else TL[q_dtype]),
                 ("k_cache_ptr", TL[cache_dtype]), ("v_cache_ptr", TL[cache_dtype]), ("block_tables_ptr", "i32"),
                 ("seq_lens_ptr", "i32"), ("sm_scale", "fp32"), ("k_scale_ptr", "fp32"), ("v_scale_ptr", "fp32"))
        self.add(Variant("decode", types, tuple(sorted(dict(
            GROUP=HEADS // KVH, BLOCK_G=16, HEAD_DIM=D, BLOCK_D=D, BLOCK_SIZE=BLOCK, BLOCK_N=pa.DECODE_BLOCK_N,
            SPLIT=split, DOT_DTYPE=tl.bfloat16, KV_STAGES=pa.KV_STAGES, MIN_PARTITION=pa.MIN_PARTITION,
            VIA_F32=False).items(), key=str)), pa.NUM_WARPS, pa.KV_STAGES))
        if split:
            types = (("partial_ptr", "fp32"), ("lse_ptr", "fp32"), ("out_ptr", TL[q_dtype]))
            self.add(Variant("reduce", types, (("BLOCK_D", D), ("BLOCK_S", triton.next_power_of_2(splits)),
                                              ("HEAD_DIM", D)), pa.NUM_WARPS, 3))

    def prefill(self, cache_dtype, q_dtype=torch.bfloat16):
        types = (("q_ptr", TL[q_dtype]), ("out_ptr", TL[q_dtype]), ("cu_seqlens_q_ptr", "i32"),
                 ("k_cache_ptr", TL[cache_dtype]), ("v_cache_ptr", TL[cache_dtype]), ("block_tables_ptr", "i32"),
                 ("seq_lens_ptr", "i32"), ("sm_scale", "fp32"), ("k_scale_ptr", "fp32"), ("v_scale_ptr", "fp32"))
        self.add(Variant("prefill", types, tuple(sorted(dict(
            GROUP=HEADS // KVH, HEAD_DIM=D, BLOCK_D=D, BLOCK_SIZE=BLOCK, BLOCK_T=pa.PREFILL_BLOCK_M // (HEADS // KVH),
            BLOCK_M=pa.PREFILL_BLOCK_M, BLOCK_N=pa.PREFILL_BLOCK_N, DOT_DTYPE=tl.bfloat16, KV_STAGES=pa.KV_STAGES,
            VIA_F32=False).items(), key=str)), pa.NUM_WARPS, pa.KV_STAGES))

    def model_step(self, batch, max_seq_len, layers=("qkv", "o", "gate_up", "down"), deterministic=False):
        """One decode step of the 70B-shaped model (FP8 linears; the bf16 MLP and lm_head run in torch)."""
        for name in layers:
            n, k = LAYERS[name]
            self.linear(batch, n, k, deterministic=deterministic)
        self.write_kv(torch.float8_e4m3fn)
        if deterministic:
            self.prefill(torch.float8_e4m3fn)
        else:
            self.decode(batch, max_seq_len, torch.float8_e4m3fn)


def _arg(args: tuple, flag: str, cast=int) -> list:
    """Values after `flag` in a bench command line, up to the next flag."""
    if flag not in args:
        return []
    out = []
    for a in args[args.index(flag) + 1:]:
        if a.startswith("--"):
            break
        out.append(cast(a))
    return out


def plan_tier(tier: Tier) -> Plan:
    """The parts' launches, in run order (keep in step with scripts/gpu_check_parts.py and the benches)."""
    plan = Plan()
    plan.part = "kernels_70b"
    for name, (n, k) in LAYERS.items():
        for m in tier.kernels_m:
            for act, weight in (("token", "channel"), ("group", "block")):
                plan.quantize(act, torch.float32)  # the part's activations are fp32 randn
                plan.gemm(m, n, k, act, weight)
            if m in tier.w8a16_m:
                plan.gemm(m, n, k, "token", "channel", w8a16=torch.bfloat16)
    for _ in tier.quantize_shapes:
        for gran in ("token", "group", "tensor"):
            plan.quantize(gran, torch.float32)
    plan.quantize("token", torch.float32)
    for m in (300, 1, 16, 200):
        plan.gemm(m, 8192, 8192, "token", "channel", deterministic=True)

    plan.part = "cuda_graph"
    max_len = -(-tier.graph_context // BLOCK) * BLOCK
    for bucket in tier.graph_buckets:  # warm-up and capture: layer 0 FP8, layer 1's MLP bf16
        plan.model_step(bucket, max_len)
        plan.model_step(bucket, max_len, layers=("qkv", "o"))
    for batch in tier.graph_batches:  # the eager step at the unpadded batch size
        plan.model_step(batch, tier.graph_context)

    plan.part = "bench_gemm"
    ms, split_ks, split_ms = _arg(tier.gemm_args, "--m"), _arg(tier.gemm_args, "--split-k"), _arg(tier.gemm_args, "--split-k-m")
    for name, (n, k) in LAYERS.items():
        for m in sorted(set(ms) | set(split_ms if split_ks else ())):
            plan.quantize("token", torch.bfloat16)
            if m in ms:
                plan.gemm(m, n, k, "token", "channel")
            if m in split_ms:
                for s in split_ks:
                    plan.gemm(m, n, k, "token", "channel", split_k=s)

    plan.part = "bench_attention"
    for kv in _arg(tier.attention_args, "--kv", str):
        cache = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}[kv]
        for batch in _arg(tier.attention_args, "--batch"):
            for context in _arg(tier.attention_args, "--context"):
                if batch * context <= 1 << 20:
                    plan.decode(batch, context, cache)

    plan.part = "bench_decode_step"
    batches = _arg(tier.decode_args, "--batch")
    context = (_arg(tier.decode_args, "--context") or [1024])[0]
    max_len = -(-context // BLOCK) * BLOCK
    deterministic = "--deterministic" in tier.decode_args
    for det in (False, True) if deterministic else (False,):
        for batch in batches:
            plan.model_step(batch, max_len, deterministic=det)
            plan.model_step(batch, context, deterministic=det)

    plan.part = "kv_offsets"
    plan.write_kv(torch.float8_e4m3fn)
    plan.decode(3, 1008, torch.float8_e4m3fn)
    plan.prefill(torch.float8_e4m3fn)

    plan.part = "decode_256"
    batch, context = tier.decode256
    for cache in (torch.bfloat16, torch.float8_e4m3fn):
        plan.decode(batch, context, cache)

    plan.part = "pytest"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    if tier.pytest_k is None or "test_gpu_gemm_matches_reference" not in tier.pytest_k:
        for act in ("tensor", "token", "group"):  # tests/test_fp8_gemm.py's ACT x WEIGHT at N=1000, K=1100
            for weight in ("tensor", "channel", "block", "group"):
                for m in (1, 16, 64, 65, 300):
                    plan.gemm(m, 1000, 1100, act, weight, bias=torch.bfloat16)
        for weight in ("tensor", "channel", "block", "group"):
            for m in (1, 16, 300):
                plan.gemm(m, 1000, 1100, "token", weight, w8a16=torch.bfloat16, bias=torch.bfloat16)
    plan.gemm(300, 1000, 1100, "token", "channel", deterministic=True)
    for gran in ("token", "tensor", "group"):
        plan.quantize(gran, torch.float32)
    return plan


def aot(v: Variant) -> float:
    """Compile one variant for sm_90a; seconds."""
    from fp8_turbo.kernels.aot import aot_compile

    fn = KERNELS[v.kernel]
    constexprs = dict(v.constexprs)
    types = {name: f"*{t}" if name.endswith("_ptr") else t for name, t in v.types}  # element type -> pointer
    if v.kernel == "fp8_gemm":  # unit K strides and the transposed (or not) output, as the JIT specializes them
        constexprs.update(stride_ak=1, stride_bk=1, **({"stride_cm": 1} if constexprs["BIAS_ALONG_M"] else {"stride_cn": 1}))
        types.update({name: "i32" for name in GEMM_INTS if name not in constexprs})
    t0 = time.perf_counter()
    aot_compile(fn, types, constexprs, arch=90, num_warps=v.num_warps, num_stages=v.num_stages,
                aligned=("K",) if dict(v.spec).get("K%16") else ())
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tier", choices=[t for t in TIERS if t != "dry-run"], default="quick")
    p.add_argument("--compile", action="store_true", help="compile every variant for sm_90a and time it")
    p.add_argument("--parts", nargs="+", choices=ORDER, default=None, help="compile only these parts' variants")
    p.add_argument("--json", type=Path, default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    tier = TIERS[args.tier]
    plan = plan_tier(tier)
    if args.compile:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpu_compile_plan_")  # compile for real
    print(f"# Triton compiles per part, {tier.name} tier (triton {triton.__version__}, sm_90a, {SMS} SMs)")
    print("| part | new variants | new autotune keys | kernels | compile s here |\n|---|---|---|---|---|")
    rows, total, total_s = [], 0, 0.0
    for part in ORDER:
        variants = plan.parts.get(part, [])
        kinds = {}
        for v in variants:
            kinds[v.kernel] = kinds.get(v.kernel, 0) + 1
        seconds = None
        if args.compile and variants and (args.parts is None or part in args.parts):
            seconds = 0.0
            for v in variants:
                s = aot(v)
                seconds += s
                print(f"  {part}: {v.label()} {s:.1f}s", file=sys.stderr, flush=True)
            total_s += seconds
        total += len(variants)
        rows.append(dict(part=part, variants=len(variants), autotune_keys=len(plan.keys.get(part, [])), kernels=kinds,
                         compile_s=seconds))
        print(f"| {part} | {len(variants)} | {len(plan.keys.get(part, []))} | "
              f"{', '.join(f'{k} {n}' for k, n in kinds.items()) or '-'} | "
              f"{'-' if seconds is None else f'{seconds:.1f}'} |", flush=True)
    print(f"| total | {total} | {sum(len(k) for k in plan.keys.values())} | | "
          f"{'-' if not args.compile else f'{total_s:.1f}'} |")
    if args.compile and total:
        compiled = sum(r["variants"] for r in rows if r["compile_s"] is not None)
        print(f"\nmean {total_s / max(compiled, 1):.2f}s per variant here "
              f"({os.cpu_count()} CPUs, {math.ceil(total_s)}s for {compiled} variants)")
    if args.json:
        args.json.write_text(json.dumps(dict(tier=tier.name, triton=triton.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
