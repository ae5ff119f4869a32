"""Kernel timing shared by the benchmarks; every result says which method measured it.

GPU, `graph_ms(fns)` (method "graph"): the calls are captured into one CUDA graph that cycles through
`fns` (each reading its own copy of the operands) and is replayed; the result is the median over
replays of the time per call. Launches cost what a graph replay costs (the engine's decode steps are
graphs too), not Python's launch overhead, which at decode sizes (a ~10-20 us GEMM) was a large part
of what a launch-per-call timing measured. `copies_for(nbytes)` sizes the rotation: at least 4 copies
and together at least 3x the L2, so every call reads its operands from HBM, as a decode step reads
each layer's weights once.
GPU, `bench_ms(fn)` (method "do_bench"): triton.testing.do_bench (L2 flushed before each run, median),
the fallback when a call cannot be captured.
CPU (method "cpu-wall"): the median of 3 wall-clock runs after a warm-up (dry runs and interpreter
smoke runs: those times say nothing about a GPU).

Importing this module also counts the process's Triton compiles (bench/compile_stats.py).
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import compile_stats  # noqa: E402

compile_stats.install()

MIN_COPIES = 4
L2_MULTIPLE = 3  # the copies together span this many L2s
MAX_GRAPH_CALLS = 1000  # calls captured in one graph (instantiation cost grows with the nodes)


def l2_bytes() -> int:
    import torch

    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))


def copies_for(nbytes: int, min_copies: int = MIN_COPIES, memory_budget: float = 4e9) -> int:
    """Operand copies for a cold-L2 rotation: >= min_copies and >= L2_MULTIPLE x L2 in all, but no more
    than `memory_budget` bytes (never fewer than min_copies)."""
    want = max(min_copies, math.ceil(L2_MULTIPLE * l2_bytes() / max(nbytes, 1)))
    return max(min_copies, min(want, int(memory_budget // max(nbytes, 1))))


def cpu_ms(fn) -> float:
    fn()  # warm-up (and, in the interpreter, the one-off parse of the kernel)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fns: list, target_ms: float = 10.0, replays: int = 7) -> float:
    """Median time per call of one CUDA graph cycling through `fns` (see the module docstring)."""
    import torch

    side = torch.cuda.Stream()  # warm-up and capture on one side stream: autotuning, compiles and the
    side.wait_stream(torch.cuda.current_stream())  # libraries' per-stream handles all happen before capture
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for fn in fns:
        fn()
    end.record()
    end.synchronize()
    eager_per_call = max(start.elapsed_time(end) / len(fns), 1e-3)  # an over-estimate (launch overhead)
    rounds = max(1, min(MAX_GRAPH_CALLS // len(fns), math.ceil(target_ms / (eager_per_call * len(fns)))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for _ in range(rounds):
            for fn in fns:
                fn()  # outputs are dropped at once: the graph's pool reuses their memory
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (rounds * len(fns)))
    del graph
    return statistics.median(times)


def time_calls(fns: list, gpu: bool) -> tuple[float, str]:
    """(ms per call, method): graph replay over `fns` on a GPU (do_bench on the first if capture fails),
    wall clock on the CPU."""
    if not gpu:
        return cpu_ms(fns[0]), "cpu-wall"
    try:
        return graph_ms(fns), "graph"
    except RuntimeError as err:  # a call that cannot be captured: say so, time it launch by launch
        print(f"  graph capture failed ({str(err)[:160]}); timing with do_bench", file=sys.stderr)
        import torch

        torch.cuda.synchronize()
        return bench_ms(fns[0]), "do_bench"


def time_ms(fn, gpu: bool) -> float:
    """One call, no operand rotation: do_bench on a GPU (L2 flushed), wall clock on the CPU."""
    return bench_ms(fn) if gpu else cpu_ms(fn)
