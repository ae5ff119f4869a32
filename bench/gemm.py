"""FP8 GEMM microbenchmark: fp8_gemm vs torch._scaled_mm (cuBLASLt) vs bf16 torch.matmul.

    .venv/bin/python bench/gemm.py                    # GPU: Llama-3.3-70B layer shapes, TP=1/2/4/8
    .venv/bin/python bench/gemm.py --tp 1 --m 1 16 4096 --schemes channel block

Shapes (N x K, TP=1): qkv 10240x8192, o 8192x8192, gate_up 57344x8192, down 8192x28672; TP slices split
N of the column-parallel layers (qkv, gate_up) and K of the row-parallel ones (o, down). M (tokens) in
{1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192}. Times are medians of triton.testing.do_bench,
which flushes L2 before every run. Default scheme: per-channel weight scales, per-token activation
scales (`fp8`), compared with _scaled_mm's row-wise scaling; `block` (128x128 / 1x128) has no peer.
TFLOP/s = 2MNK / t; GB/s = bytes of a, b, scales and c / t.

Without a GPU it runs tiny shapes (the Llama shapes / 128) with the Triton kernel in the interpreter,
to prove the script works: those times say nothing about performance.

Writes bench/out/gemm.{json,csv,png} and prints a markdown table, the geomean speed-up over
_scaled_mm, the share of HBM bandwidth at M <= 16, and the weight memory of each scheme vs bf16.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels (and triton.jit) are imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import time_ms  # noqa: E402
from fp8_turbo.kernels.fp8 import quantize_weight  # noqa: E402
from fp8_turbo.kernels.gemm import fp8_gemm  # noqa: E402
from fp8_turbo.kernels.quantize import quantize_fp8  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
LAYERS = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}
COLUMN_PARALLEL = {"qkv", "gate_up"}  # TP splits N; the others (row-parallel) split K
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192]
TP_VALUES = [1, 2, 4, 8]
NUM_LAYERS = 80
SCHEMES = {  # name -> (activation granularity, weight granularity)
    "channel": ("token", "channel"),
    "tensor": ("tensor", "tensor"),
    "block": ("group", "block"),
}
HBM_TBPS = {"H100": 3.35, "H200": 4.8}
PEER, BF16 = "torch._scaled_mm", "bf16 matmul"


def layer_shapes(tps: list[int], shrink: int = 1):
    """(layer, tp, N, K) of each layer's GEMM on one GPU."""
    for tp in tps:
        for layer, (n, k) in LAYERS.items():
            n, k = (n // tp, k) if layer in COLUMN_PARALLEL else (n, k // tp)
            yield layer, tp, n // shrink, k // shrink


def bench_shape(layer, tp, n, k, m_values, schemes, device):
    """Rows (one per implementation and M) for one layer shape; the peers run with the first scheme."""
    torch.manual_seed(0)
    w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
    weights = {scheme: quantize_weight(w, SCHEMES[scheme][1]) for scheme in schemes}
    rows = []
    for m in m_values:
        x = torch.randn(m, k, device=device).to(torch.bfloat16)
        impls = {}  # name -> (fn, bytes moved)
        for scheme in schemes:
            a, a_scale = quantize_fp8(x, SCHEMES[scheme][0])
            b, b_scale = weights[scheme]
            nbytes = m * k + n * k + 2 * m * n + 4 * (a_scale.numel() + b_scale.numel())
            impls[f"fp8_gemm[{scheme}]"] = (partial(fp8_gemm, a, b, a_scale, b_scale, torch.bfloat16), nbytes)
            if scheme == schemes[0] and scheme in ("channel", "tensor"):
                # cuBLASLt row-wise (scale_a [M, 1], scale_b [1, N]) or tensor-wise scaling; b.T is
                # the column-major operand it wants
                sa, sb = (a_scale.reshape(-1, 1), b_scale.reshape(1, -1)) if scheme == "channel" else (
                    a_scale.reshape(()), b_scale.reshape(()))
                impls[PEER] = (partial(torch._scaled_mm, a, b.T, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
                               nbytes)
        impls[BF16] = (partial(torch.matmul, x, w.T), 2 * (m * k + n * k + m * n))
        for impl, (fn, nbytes) in impls.items():
            try:
                ms = time_ms(fn, device == "cuda")
            except (RuntimeError, ValueError) as err:  # e.g. a shape _scaled_mm does not take
                print(f"  {impl} {layer} tp{tp} M={m}: {type(err).__name__}: {str(err)[:160]}", file=sys.stderr)
                continue
            rows.append(dict(layer=layer, tp=tp, m=m, n=n, k=k, impl=impl, ms=ms,
                             tflops=2.0 * m * n * k / ms / 1e9, gbps=nbytes / ms / 1e6))
        print(f"  done {layer} tp{tp} M={m}", file=sys.stderr)
    return rows


def weight_memory(scheme: str | None) -> int:
    """Bytes of the 80 layers' linear weights of Llama-3.3-70B (TP=1) under a scheme (None: bf16)."""
    total = 0
    for _, _, n, k in layer_shapes([1]):
        if scheme is None:
            total += 2 * n * k
        elif scheme == "channel":
            total += n * k + 4 * n
        elif scheme == "tensor":
            total += n * k + 4
        else:
            total += n * k + 4 * math.ceil(n / 128) * math.ceil(k / 128)
    return total * NUM_LAYERS


def markdown(rows, hbm_tbps, gpu: bool):
    """Table: one line per (layer, TP, M), one column per implementation; and the summary numbers."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["layer"], r["tp"], r["m"], r["n"], r["k"]), {})[r["impl"]] = r
    found = list(dict.fromkeys(r["impl"] for r in rows))  # in run order: the first scheme first
    impls = [i for i in found if i.startswith("fp8_gemm")] + [i for i in (PEER, BF16) if i in found]
    ours = next((i for i in impls if i.startswith("fp8_gemm")), None)
    num = "{:.1f}" if gpu else "{:.3g}"
    head = "| layer | TP | M | N x K | " + " | ".join(f"{i} TFLOP/s (GB/s)" for i in impls)
    lines = [head + f" | {ours} / _scaled_mm |", "|" + "---|" * (5 + len(impls))]
    ratios, bw = [], []
    for (layer, tp, m, n, k), case in by_case.items():
        cells = [f"{num.format(case[i]['tflops'])} ({num.format(case[i]['gbps'])})" if i in case else "-"
                 for i in impls]
        ratio = case[PEER]["ms"] / case[ours]["ms"] if ours in case and PEER in case else None
        if ratio:
            ratios.append(ratio)
        if ours in case and m <= 16 and hbm_tbps:
            bw.append(case[ours]["gbps"] / (hbm_tbps * 1e3))
        lines.append(f"| {layer} | {tp} | {m} | {n}x{k} | " + " | ".join(cells) + (f" | {ratio:.2f}x |" if ratio else " | - |"))
    summary = {}
    if ratios:
        summary["geomean_vs_scaled_mm"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    if bw:
        summary["hbm_fraction_m_le_16_median"] = statistics.median(bw)
        summary["hbm_fraction_m_le_16_min"] = min(bw)
    return "\n".join(lines), summary


def plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 4), squeeze=False)
    tp0 = min(r["tp"] for r in rows)
    for ax, layer in zip(axes[0], layers):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["m"], r["tflops"]) for r in rows if r["layer"] == layer and r["impl"] == impl and r["tp"] == tp0)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        n, k = next((r["n"], r["k"]) for r in rows if r["layer"] == layer and r["tp"] == tp0)
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="TFLOP/s", title=f"{layer} {n}x{k} (TP={tp0})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, nargs="+", default=TP_VALUES if GPU else [1])
    p.add_argument("--m", type=int, nargs="+", default=M_VALUES if GPU else [1, 16, 64])
    p.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=["channel"])
    p.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    device = "cuda" if GPU else "cpu"
    machine = torch.cuda.get_device_name() if GPU else f"{platform.processor() or platform.machine()} CPU, Triton interpreter"
    hbm = next((v for key, v in HBM_TBPS.items() if key in machine), None) if GPU else None
    shrink = 1 if GPU else 128
    print(f"# FP8 GEMM on {machine}" + ("" if GPU else " (tiny shapes = Llama / 128; times are not performance)"))
    rows = []
    for layer, tp, n, k in layer_shapes(args.tp, shrink):
        if layer in args.layers:
            rows += bench_shape(layer, tp, n, k, args.m, args.schemes, device)
    table, summary = markdown(rows, hbm, GPU)
    print(table)
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")

    print("\n# Weight memory, Llama-3.3-70B linear layers (80 layers, TP=1)")
    print("| scheme | GB | vs bf16 |\n|---|---|---|")
    bf16 = weight_memory(None)
    memory = {"bf16": bf16}
    for scheme in (None, *SCHEMES):
        nbytes = weight_memory(scheme)
        memory[scheme or "bf16"] = nbytes
        print(f"| {scheme or 'bf16'} | {nbytes / 1e9:.2f} | {nbytes / bf16:.3f}x |")

    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=machine, gpu=GPU, torch=torch.__version__, hbm_tbps=hbm, m_values=args.m, tp=args.tp)
    (args.out / "gemm.json").write_text(json.dumps(dict(meta=meta, summary=summary, weight_bytes=memory, rows=rows), indent=1))
    with open(args.out / "gemm.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "gemm.md").write_text(f"FP8 GEMM on {machine}\n\n{table}\n")
    plot(rows, args.out / "gemm.png", f"FP8 GEMM, {machine}")
    print(f"\nwrote {args.out}/gemm.json, gemm.csv, gemm.md, gemm.png")


if __name__ == "__main__":
    main()
