"""CPU paged attention benchmark: our C++ kernel (fp8_turbo/kernels/cpu/attention.py) vs the torch reference.

    .venv/bin/python bench/attention_cpu.py                     # SmolLM2 decode shapes, torch's threads
    .venv/bin/python bench/attention_cpu.py --threads 1 --batch 1 32 --context 64 512

Shape: one SmolLM2-135M layer (9 query heads, 3 KV heads, head_dim 64), block size 16, fp32 queries,
sequences in shuffled blocks; KV cache fp32 (the CPU default, kv_cache_dtype "auto") and e4m3 ("fp8").
Decode: B sequences, one token each, all at the same context length L. Prefill: one chunk of 128 new
tokens after L cached ones. The reference is kernels.paged_attention's torch path (gather + SDPA),
the CPU path before this kernel. Times: median of --reps calls, both measured in the same run.

Writes bench/out/attention_cpu.{json,md,png} and prints the markdown table. Run it alone on the
machine (`flock /tmp/fp8turbo-bench.lock ...` where several people share one).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fp8_turbo.kernels.cpu import attention as cpu_attention  # noqa: E402
from fp8_turbo.kernels.fp8 import FP8_DTYPE  # noqa: E402
from fp8_turbo.kernels.paged_attention import paged_attention_decode_reference, paged_attention_prefill_reference  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
H, KVH, D, BLOCK = 9, 3, 64, 16
PREFILL_CHUNK = 128
CACHES = {"fp32": torch.float32, "fp8": FP8_DTYPE}


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def case(mode: str, batch: int, context: int, cache: str, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    length = context + (PREFILL_CHUNK if mode == "prefill" else 0)
    per_seq = -(-length // BLOCK)
    num_blocks = batch * per_seq + 1
    k = torch.randn(num_blocks, BLOCK, KVH, D, generator=g).to(CACHES[cache])
    v = torch.randn(num_blocks, BLOCK, KVH, D, generator=g).to(CACHES[cache])
    tables = torch.randperm(num_blocks, generator=g)[: batch * per_seq].view(batch, per_seq).int()
    lens = torch.full((batch,), length, dtype=torch.int32)
    scale = D**-0.5
    if mode == "decode":
        q = torch.randn(batch, H, D, generator=g)
        args = (q, k, v, tables, lens, scale)
        ours, ref = cpu_attention.paged_attention_decode, paged_attention_decode_reference
    else:
        q = torch.randn(batch * PREFILL_CHUNK, H, D, generator=g)
        cu = torch.arange(0, batch + 1, dtype=torch.int32) * PREFILL_CHUNK
        args = (q, k, v, tables, cu, lens, scale)
        ours, ref = cpu_attention.paged_attention_prefill, paged_attention_prefill_reference
    ours_ms = median_ms(lambda: ours(*args), reps)
    ref_ms = median_ms(lambda: ref(*args), max(3, reps // 3))
    return dict(mode=mode, batch=batch, context=context, cache=cache, ours_ms=ours_ms, ref_ms=ref_ms,
                speedup=ref_ms / ours_ms)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = [f"{r['mode']} B{r['batch']} L{r['context']} {r['cache']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["ours_ms"] for r in rows], 0.4, label="ours (C++)")
    ax.bar([i + 0.2 for i in x], [r["ref_ms"] for r in rows], 0.4, label="torch reference")
    ax.set(yscale="log", ylabel="ms per call", title=title)
    ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, nargs="+", default=[64, 512])
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not cpu_attention.available():
        sys.exit("the CPU attention kernel is not available (build failed); nothing to benchmark")
    torch.set_num_threads(args.threads)
    rows = [case(mode, b, ctx, cache, args.reps) for mode in ("decode", "prefill") for cache in CACHES
            for b in (args.batch if mode == "decode" else [1]) for ctx in args.context]
    name = f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    lines = [f"CPU paged attention, SmolLM2 layer (H={H}, KVH={KVH}, D={D}), {name}", "",
             "| mode | batch | context | cache | ours ms | reference ms | speedup |", "|---|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['batch']} | {r['context']} | {r['cache']} | {r['ours_ms']:.3f} | {r['ref_ms']:.3f} | "
              f"{r['speedup']:.1f}x |" for r in rows]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_cpu.json").write_text(json.dumps(dict(machine=name, reps=args.reps, rows=rows), indent=1))
    (args.out / "attention_cpu.md").write_text(table + "\n")
    plot(rows, args.out / "attention_cpu.png", f"CPU paged attention, {name}")
    print(f"\nwrote {args.out}/attention_cpu.json, attention_cpu.md, attention_cpu.png")


if __name__ == "__main__":
    main()
