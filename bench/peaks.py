"""The machine's own ceilings, measured in a few seconds: device-to-device copy bandwidth and the bf16 and
FP8 matrix-product rates, which the kernel benchmarks divide by (a datasheet's 4.8 TB/s is not what an
H200 copies: ~4.3 TB/s was measured there).

    python3 bench/peaks.py [--out DIR]

copy: `dst.copy_(src)` of 1 GiB, bytes read + written over the median of CUDA-event timings (20 runs after
3 warm-ups). bf16: torch.matmul 8192^3 on random data (zeros run faster and are not what a model
multiplies); FP8: torch._scaled_mm 8192^3 e4m3 with per-tensor scales (cuBLASLt); TFLOP/s = 2MNK / t,
median of 10 timed products after 3 warm-ups. Writes peaks.json. Without a GPU it says so and writes
the CPU's copy bandwidth and fp32 matmul rate at small sizes, to prove the script works.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"


def _median_ms(fn, reps: int, warmup: int = 3) -> float:
    gpu = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_gbps(device: str, nbytes: int) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), reps=20)
    return 2 * nbytes / ms / 1e6


def matmul_tflops(device: str, n: int, fp8: bool) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    if fp8:
        a = torch.randn(n, n, generator=gen, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, generator=gen, device=device).to(torch.float8_e4m3fn).T  # column-major operand
        one = torch.ones((), device=device)
        fn = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        a = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
        fn = lambda: torch.matmul(a, b)  # noqa: E731
    ms = _median_ms(fn, reps=10)
    return 2 * n**3 / ms / 1e9


def measure() -> dict:
    """{"device", "copy_gbps", "bf16_tflops", "fp8_tflops", "seconds"} (the matrix rates on a GPU only)."""
    t0 = time.perf_counter()
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    name = torch.cuda.get_device_name() if gpu else f"{platform.machine()} CPU"
    out = dict(device=name, copy_gbps=copy_gbps(device, 1 << 30 if gpu else 1 << 24))
    if gpu:
        for key, fp8 in (("bf16_tflops", False), ("fp8_tflops", True)):
            try:
                out[key] = matmul_tflops(device, 8192, fp8)
            except RuntimeError as err:  # e.g. a torch without _scaled_mm for this GPU
                out[key] = None
                out[f"{key}_error"] = str(err)[:200]
    else:
        out["fp32_tflops_cpu"] = matmul_tflops(device, 256, False)
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    result = measure()
    for key, value in result.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peaks.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
