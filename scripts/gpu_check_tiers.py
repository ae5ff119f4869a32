"""What each tier of scripts/gpu_check.py runs: the parts in order, their time caps, and every shape.

One table for the run and for its compile estimate (scripts/gpu_compile_plan.py), so the estimate
counts what the run launches. Parts run in this order: numbers first (the window may close early),
then the heavier correctness checks, then pytest, capped at 30% of the budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ORDER = ["env", "kernels_70b", "cuda_graph", "bench_gemm", "bench_attention", "bench_decode_step",
         "kv_offsets", "decode_256", "pytest"]
PYTEST_SHARE = 0.3  # of the budget, at most
# quick: the GEMM reference matrix of tests/test_fp8_gemm.py (12 scale combinations x 5 sizes at K=1100,
# ~84 compiles nothing else reuses) is left out; kernels_70b checks the two combinations the engine runs
QUICK_PYTEST = "not test_gpu_gemm_matches_reference and not test_gpu_weight_only_matches_reference"


@dataclass(frozen=True)
class Tier:
    name: str
    budget: float  # seconds from process start
    caps: dict[str, float]  # the most seconds a part may take
    # kernels_70b: fp8_gemm at the 70B layer shapes over M, W8A16 at some M, quantize shapes
    kernels_m: tuple[int, ...]
    w8a16_m: tuple[int, ...]
    quantize_shapes: tuple[tuple[int, int], ...]
    shrink: int = 1  # layer shapes divided by this (the dry run's tiny shapes)
    # cuda_graph: a 2-layer 70B-shaped model, graphs for `graph_buckets`, replayed at `graph_batches`
    graph_batches: tuple[int, ...] = (1, 5, 64, 256)
    graph_buckets: tuple[int, ...] = (1, 8, 64, 256)
    graph_context: int = 512
    # benchmarks: their command-line arguments
    gemm_args: tuple[str, ...] = ()
    attention_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    # correctness at scale
    decode256: tuple[int, int] = (256, 2048)  # batch, context
    pytest_k: str | None = None
    extra: dict = field(default_factory=dict)


FULL = Tier(
    name="full", budget=470.0,
    caps=dict(env=30, kernels_70b=100, cuda_graph=45, bench_gemm=120, bench_attention=60, bench_decode_step=80,
              kv_offsets=30, decode_256=30),
    kernels_m=(1, 8, 16, 64, 128, 1024, 8192), w8a16_m=(1, 16, 512, 8192),
    quantize_shapes=((1, 8192), (64, 28672), (1024, 8192)),
    gemm_args=("--tp", "1", "--m", "1", "4", "16", "64", "128", "512", "1024", "4096", "8192",
               "--peers", "scaled_mm", "bf16", "--split-k", "1", "2", "4", "--split-k-m", "1", "16"),
    attention_args=("--batch", "1", "8", "64", "256", "--context", "1024", "4096", "16384", "--kv", "fp8", "bf16"),
    decode_args=("--batch", "1", "8", "64", "256", "--context", "1024", "--deterministic"),
)
QUICK = Tier(
    name="quick", budget=200.0,
    # the caps up to the last benchmark add up to 150 s: the numbers are in by then, partial at worst
    caps=dict(env=15, kernels_70b=35, cuda_graph=20, bench_gemm=35, bench_attention=15, bench_decode_step=30,
              kv_offsets=15, decode_256=15),
    kernels_m=(1, 16, 1024), w8a16_m=(), quantize_shapes=((1, 8192), (1024, 8192)),
    graph_batches=(1, 5, 64), graph_buckets=(1, 8, 64),
    gemm_args=("--tp", "1", "--m", "1", "16", "512", "4096", "--peers", "scaled_mm",
               "--split-k", "1", "2", "4", "--split-k-m", "1", "16"),
    attention_args=("--batch", "1", "64", "--context", "4096", "--kv", "fp8", "bf16"),
    decode_args=("--batch", "1", "64", "--context", "1024"),
    decode256=(256, 1024), pytest_k=QUICK_PYTEST,
)
# No GPU: every part at tiny shapes on the CPU path (tests/test_gpu_check.py runs it in the suite)
DRY = Tier(
    name="dry-run", budget=400.0,
    caps=dict(env=30, kernels_70b=60, cuda_graph=60, bench_gemm=90, bench_attention=90, bench_decode_step=90,
              kv_offsets=30, decode_256=30),
    kernels_m=(1, 16, 65), w8a16_m=(1, 16, 65), quantize_shapes=((3, 300),), shrink=64,
    graph_batches=(1, 3), graph_buckets=(1, 4), graph_context=48,
    gemm_args=("--tp", "1", "--m", "1", "16", "--layers", "qkv", "--split-k", "1", "2", "--split-k-m", "1"),
    attention_args=("--batch", "1", "--context", "64", "--kv", "bf16"),
    decode_args=("--batch", "1", "2", "--context", "32", "--reps", "1", "--deterministic"),
    decode256=(8, 100),
)
TIERS = {t.name: t for t in (FULL, QUICK, DRY)}
