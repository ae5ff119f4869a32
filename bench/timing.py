"""Kernel timing shared by the kernel benchmarks: triton.testing.do_bench (L2 flushed, median) on a GPU,
the median of 3 wall-clock runs after a warm-up on the CPU (interpreter smoke runs)."""
from __future__ import annotations

import statistics
import time


def time_ms(fn, gpu: bool) -> float:
    if gpu:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up (and, in the interpreter, the one-off parse of the kernel)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
