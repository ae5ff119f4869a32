"""GPU check: run on a machine with a CUDA GPU to check every Triton kernel against its torch reference
and run the benchmarks.

    .venv/bin/python scripts/gpu_check.py            # checks + GPU tests + bench/gemm.py
    .venv/bin/python scripts/gpu_check.py --no-bench

1. FP8 kernels on CUDA vs their CPU references: quantize_fp8 bit-exact (every granularity, fp32/bf16
   input, edge values); fp8_gemm within 2^-11 * (|A| @ |B|.T) (Hopper's fp8 MMA keeps ~14 bits inside
   a BLOCK_K step, tests/test_fp8_gemm.py) for every scale combination (weights also in per-row 1x128 groups), decode and prefill sizes,
   split-K shapes, bias, every output dtype.
2. `pytest -m gpu tests`: the GPU tests of every kernel family (paged attention, KV writes, FP8).
3. bench/gemm.py (and bench/attention.py where it exists).
Exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels.fp8 import FP8_DTYPE, dequantize_fp8, quantize_weight  # noqa: E402
from kernels.gemm import fp8_gemm, fp8_gemm_reference  # noqa: E402
from kernels.quantize import quantize_fp8  # noqa: E402

GPU_MMA_REL = 2.0**-11
OUT_RTOL = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def check_quantize(failures: list[str]) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for m, k in [(1, 8192), (7, 300), (300, 1000), (64, 28672)]:
            x = (torch.randn(m, k) * torch.logspace(-4, 4, m)[:, None]).to(dtype)
            x[0, :6] = torch.tensor([448.0, -448.0, 500.0, 2.0**-9, 2.0**-10, 0.0])
            if m > 3:
                x[3] = 0
            for granularity in ("token", "tensor", "group"):
                q, scale = quantize_fp8(x.cuda(), granularity)
                q_ref, scale_ref = quantize_fp8(x, granularity)
                same = torch.equal(scale.cpu(), scale_ref) and torch.equal(
                    q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
                name = f"quantize_fp8 {granularity} {dtype} [{m}, {k}]"
                print(f"{'ok  ' if same else 'FAIL'} {name}: bit-exact={same}")
                if not same:
                    failures.append(name)


def check_gemm(failures: list[str]) -> None:
    combos = [(a, w) for a in ("tensor", "token", "group") for w in ("tensor", "channel", "block", "group")]
    shapes = [(1, 1280, 8192), (3, 1000, 1100), (16, 8192, 1024), (64, 4096, 4096), (65, 1000, 1100),
              (300, 3000, 2000), (512, 4096, 8192)]
    for m, n, k in shapes:
        x = torch.randn(m, k) * torch.logspace(-2, 2, m)[:, None]
        w = torch.randn(n, k) * 0.05
        x[::7] = 0
        bias = torch.randn(n)
        for act, weight in combos:
            a, a_scale = quantize_fp8(x, act)
            b, b_scale = quantize_fp8(w, "group") if weight == "group" else quantize_weight(w, weight)
            mag = dequantize_fp8(a, a_scale).abs() @ dequantize_fp8(b, b_scale).abs().T
            for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
                bias_d = bias.to(out_dtype)
                c = fp8_gemm(a.cuda(), b.cuda(), a_scale.cuda(), b_scale.cuda(), out_dtype, bias_d.cuda()).float().cpu()
                ref = fp8_gemm_reference(a, b, a_scale, b_scale, torch.float32, bias_d)
                tol = GPU_MMA_REL * mag + OUT_RTOL[out_dtype] * ref.abs() + 1e-6 + 2.0**-20 * bias.abs()
                worst = ((c - ref).abs() / tol).max().item()
                ok = worst <= 1.0 and torch.isfinite(c).all()
                name = f"fp8_gemm a={act} b={weight} {out_dtype} M={m} N={n} K={k}"
                print(f"{'ok  ' if ok else 'FAIL'} {name}: worst err/tol {worst:.3f}")
                if not ok:
                    failures.append(name)


def run(cmd: list[str], failures: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        failures.append(" ".join(cmd))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-bench", action="store_true", help="checks and GPU tests only")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check here (the CPU suite is `make test`)")
        return 1
    print(f"# GPU check on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    assert FP8_DTYPE == torch.float8_e4m3fn
    failures: list[str] = []
    check_quantize(failures)
    check_gemm(failures)
    run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], failures)
    if not args.no_bench:
        for script in ("bench/gemm.py", "bench/attention.py"):
            if (REPO / script).exists():
                run([sys.executable, script], failures)
    print("\n" + ("all checks passed" if not failures else f"{len(failures)} FAILED:\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
