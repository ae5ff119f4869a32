"""FP8 GEMM microbenchmark: fp8_gemm vs torch._scaled_mm (cuBLASLt) vs bf16 torch.matmul, and a split-K sweep.

    python3 bench/gemm.py                    # GPU: Llama-3.3-70B layer shapes, TP=1/2/4/8
    python3 bench/gemm.py --tp 1 --m 1 16 4096 --schemes channel block --split-k 1 2 4

Shapes (N x K, TP=1): qkv 10240x8192, o 8192x8192, gate_up 57344x8192, down 8192x28672; TP slices split
N of the column-parallel layers (qkv, gate_up) and K of the row-parallel ones (o, down). M (tokens) in
{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 8192}. Default scheme: per-channel weight scales,
per-token activation scales (`fp8`), compared with _scaled_mm's row-wise scaling; `block` (128x128 /
1x128) has no peer. TFLOP/s = 2MNK / t; GB/s = bytes of a, b, scales and c / t.

Timing (bench/timing.py): CUDA-graph replay over >= 4 rotating copies of the weight (>= 3x the L2 in
all), so a small-M call is timed as a decode step runs it (weights cold, launches from a graph); every
row names its method. The goals (bench/GPU.md) are read as they are written: the geomean speed-up over
_scaled_mm at M >= 512, and the share of the measured copy bandwidth (bench/peaks.py, or --copy-gbps)
at M <= 16. `--split-k 1 2 4` times the decode path with each split count at --split-k-m (default
M = 1, 16) and logs the split the heuristic picks and the autotuner's winning tile per key.

Without a GPU it runs tiny shapes (the Llama shapes / 128) on whatever the CPU path is (Triton
interpreter under TRITON_INTERPRET=1, else our C++ kernel or the torch reference), to prove the script
works: those times say nothing about performance.

Writes gemm.json (after every shape, so a killed run keeps its rows), and at the end gemm.png, gemm.md
and gemm.csv (--artefacts picks which) under --out; prints the tables.
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
from bench import compile_stats  # noqa: E402
from bench.timing import copies_for, time_calls  # noqa: E402
from fp8_turbo.kernels import gemm as gemm_kernels  # noqa: E402
from fp8_turbo.kernels.backend import interpreting  # noqa: E402
from fp8_turbo.kernels.fp8 import quantize_weight  # noqa: E402
from fp8_turbo.kernels.gemm import fp8_gemm, split_k_for  # noqa: E402
from fp8_turbo.kernels.quantize import quantize_fp8  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
LAYERS = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}
COLUMN_PARALLEL = {"qkv", "gate_up"}  # TP splits N; the others (row-parallel) split K
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 8192]
TP_VALUES = [1, 2, 4, 8]
NUM_LAYERS = 80
SCHEMES = {  # name -> (activation granularity, weight granularity)
    "channel": ("token", "channel"),
    "tensor": ("tensor", "tensor"),
    "block": ("group", "block"),
}
PEER, BF16 = "torch._scaled_mm", "bf16 matmul"
PEERS = {"scaled_mm": PEER, "bf16": BF16}
GOAL_PREFILL_M = 512  # geomean vs _scaled_mm over M >= this
GOAL_DECODE_M = 16  # share of copy bandwidth over M <= this
ARTEFACTS = ("json", "png", "md", "csv")


def machine_name() -> str:
    if GPU:
        return torch.cuda.get_device_name()
    from fp8_turbo.kernels import cpu as cpu_kernels

    path = ("Triton interpreter" if interpreting() else
            "C++ CPU kernels" if cpu_kernels.available() else "torch reference path")
    return f"{platform.processor() or platform.machine()} CPU, {path}"


def layer_shapes(tps: list[int], shrink: int = 1):
    """(layer, tp, N, K) of each layer's GEMM on one GPU."""
    for tp in tps:
        for layer, (n, k) in LAYERS.items():
            n, k = (n // tp, k) if layer in COLUMN_PARALLEL else (n, k // tp)
            yield layer, tp, n // shrink, k // shrink


def _weight_copies(w: torch.Tensor, scheme: str, count: int):
    b, b_scale = quantize_weight(w, SCHEMES[scheme][1])
    return [(b, b_scale)] + [(b.clone(), b_scale.clone()) for _ in range(count - 1)]


def bench_shape(layer, tp, n, k, m_values, schemes, peers, splits, split_m, device):
    """(rows, split-K rows) for one layer shape; the peers run with the first scheme's operands."""
    torch.manual_seed(0)
    w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
    copies = copies_for(n * k) if GPU else 1
    weights = {scheme: _weight_copies(w, scheme, copies) for scheme in schemes}
    w_copies = [w] + [w.clone() for _ in range(copies - 1)] if BF16 in peers else []
    rows, split_rows = [], []
    for m in sorted(set(m_values) | (set(split_m) if splits else set())):
        x = torch.randn(m, k, device=device).to(torch.bfloat16)
        impls = {}  # name -> (calls, bytes moved)
        for scheme in schemes:
            a, a_scale = quantize_fp8(x, SCHEMES[scheme][0])
            b0, s0 = weights[scheme][0]
            nbytes = m * k + n * k + 2 * m * n + 4 * (a_scale.numel() + s0.numel())
            if m in m_values:
                impls[f"fp8_gemm[{scheme}]"] = (
                    [partial(fp8_gemm, a, b, a_scale, s, torch.bfloat16) for b, s in weights[scheme]], nbytes)
            if scheme == schemes[0] and splits and m in split_m:
                split_rows += _split_sweep(layer, tp, n, k, m, a, a_scale, weights[scheme], splits, nbytes, scheme)
            if scheme == schemes[0] and PEER in peers and scheme in ("channel", "tensor") and m in m_values:
                # cuBLASLt row-wise (scale_a [M, 1], scale_b [1, N]) or tensor-wise scaling; b.T is
                # the column-major operand it wants
                def peer(b, s, a=a, a_scale=a_scale, scheme=scheme):
                    sa, sb = ((a_scale.reshape(-1, 1), s.reshape(1, -1)) if scheme == "channel"
                              else (a_scale.reshape(()), s.reshape(())))
                    return torch._scaled_mm(a, b.T, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

                impls[PEER] = ([partial(peer, b, s) for b, s in weights[scheme]], nbytes)
        if BF16 in peers and m in m_values:
            impls[BF16] = ([partial(torch.matmul, x, wc.T) for wc in w_copies], 2 * (m * k + n * k + m * n))
        for impl, (calls, nbytes) in impls.items():
            try:
                ms, method = time_calls(calls, GPU)
            except (RuntimeError, ValueError) as err:  # e.g. a shape _scaled_mm does not take
                print(f"  {impl} {layer} tp{tp} M={m}: {type(err).__name__}: {str(err)[:160]}", file=sys.stderr)
                continue
            rows.append(dict(layer=layer, tp=tp, m=m, n=n, k=k, impl=impl, ms=ms, method=method, copies=len(calls),
                             tflops=2.0 * m * n * k / ms / 1e9, gbps=nbytes / ms / 1e6))
        print(f"  done {layer} tp{tp} M={m}", file=sys.stderr)
    return rows, split_rows


def _split_sweep(layer, tp, n, k, m, a, a_scale, copies, splits, nbytes, scheme):
    """The decode GEMM with each split-K count (fp8_gemm(..., split_k=s)); the heuristic's pick named."""
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count if GPU else 132
    default = split_k_for(m, n, k, num_sms)
    out = []
    for split in splits:
        calls = [partial(fp8_gemm, a, b, a_scale, s, torch.bfloat16, split_k=split) for b, s in copies]
        try:
            ms, method = time_calls(calls, GPU)
        except (RuntimeError, ValueError) as err:
            print(f"  split_k={split} {layer} M={m}: {type(err).__name__}: {str(err)[:160]}", file=sys.stderr)
            continue
        out.append(dict(layer=layer, tp=tp, m=m, n=n, k=k, scheme=scheme, split_k=split, default_split=default,
                        ms=ms, method=method, gbps=nbytes / ms / 1e6, tflops=2.0 * m * n * k / ms / 1e9))
    return out


def autotune_winners() -> dict:
    """The tile each autotune key settled on (key -> config), from both autotuners' caches."""
    winners = {}
    for name in ("_fp8_gemm_autotuned", "_w8a16_gemm_autotuned"):
        tuner = getattr(gemm_kernels, name)
        for key, config in getattr(tuner, "cache", {}).items():
            winners[f"{name[1:-10]} {dict(zip(tuner.keys, key))}"] = str(config)
    return winners


def summarize(rows, split_rows, copy_gbps) -> dict:
    ours = next((r["impl"] for r in rows if r["impl"].startswith("fp8_gemm")), None)
    by_case = {}
    for r in rows:
        by_case.setdefault((r["layer"], r["tp"], r["m"]), {})[r["impl"]] = r
    ratios_prefill, ratios_all, bw = [], [], []
    for (_, _, m), case in by_case.items():
        if ours in case and PEER in case:
            ratio = case[PEER]["ms"] / case[ours]["ms"]
            ratios_all.append(ratio)
            if m >= GOAL_PREFILL_M:
                ratios_prefill.append(ratio)
        if ours in case and m <= GOAL_DECODE_M and copy_gbps:
            bw.append(case[ours]["gbps"] / copy_gbps)
    summary = dict(copy_gbps=copy_gbps)
    geo = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs))  # noqa: E731
    if ratios_prefill:
        summary[f"geomean_vs_scaled_mm_m_ge_{GOAL_PREFILL_M}"] = geo(ratios_prefill)
    if ratios_all:
        summary["geomean_vs_scaled_mm_all_m"] = geo(ratios_all)
    if bw:
        summary[f"copy_bw_fraction_m_le_{GOAL_DECODE_M}_median"] = statistics.median(bw)
        summary[f"copy_bw_fraction_m_le_{GOAL_DECODE_M}_min"] = min(bw)
    best = {}
    for r in split_rows:
        key = (r["layer"], r["tp"], r["m"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    if best:
        summary["split_k_best"] = {f"{layer} tp{tp} M={m}": dict(best=r["split_k"], default=r["default_split"])
                                   for (layer, tp, m), r in best.items()}
        summary["split_k_default_is_best"] = all(r["split_k"] == r["default_split"] for r in best.values())
    return summary


def markdown(rows, split_rows, summary):
    """Tables: one line per (layer, TP, M), one column per implementation; the split-K sweep; the goals."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["layer"], r["tp"], r["m"], r["n"], r["k"]), {})[r["impl"]] = r
    found = list(dict.fromkeys(r["impl"] for r in rows))  # in run order: the first scheme first
    impls = [i for i in found if i.startswith("fp8_gemm")] + [i for i in (PEER, BF16) if i in found]
    ours = next((i for i in impls if i.startswith("fp8_gemm")), None)
    copy = summary.get("copy_gbps")
    num = "{:.1f}" if GPU else "{:.3g}"
    head = "| layer | TP | M | N x K | " + " | ".join(f"{i} TFLOP/s (GB/s)" for i in impls)
    head += f" | {ours} / _scaled_mm | {ours} % of copy BW |"
    lines = [head, "|" + "---|" * (6 + len(impls))]
    for (layer, tp, m, n, k), case in by_case.items():
        cells = [f"{num.format(case[i]['tflops'])} ({num.format(case[i]['gbps'])})" if i in case else "-"
                 for i in impls]
        ratio = f"{case[PEER]['ms'] / case[ours]['ms']:.2f}x" if ours in case and PEER in case else "-"
        share = f"{100 * case[ours]['gbps'] / copy:.0f}%" if ours in case and copy else "-"
        lines.append(f"| {layer} | {tp} | {m} | {n}x{k} | " + " | ".join(cells) + f" | {ratio} | {share} |")
    if split_rows:
        splits = sorted({r["split_k"] for r in split_rows})
        lines += ["", "Split-K sweep (decode path; us per call, % of copy bandwidth; * = the heuristic's pick)", "",
                  "| layer | TP | M | N x K | " + " | ".join(f"split {s}" for s in splits) + " | best |",
                  "|" + "---|" * (5 + len(splits))]
        cases = {}
        for r in split_rows:
            cases.setdefault((r["layer"], r["tp"], r["m"], r["n"], r["k"]), {})[r["split_k"]] = r
        for (layer, tp, m, n, k), case in cases.items():
            cells = []
            for s in splits:
                r = case.get(s)
                if r is None:
                    cells.append("-")
                    continue
                share = f", {100 * r['gbps'] / copy:.0f}%" if copy else ""
                cells.append(f"{r['ms'] * 1e3:.1f}{share}{' *' if s == r['default_split'] else ''}")
            best = min(case.values(), key=lambda r: r["ms"])["split_k"]
            lines.append(f"| {layer} | {tp} | {m} | {n}x{k} | " + " | ".join(cells) + f" | {best} |")
    goals = []
    key = f"geomean_vs_scaled_mm_m_ge_{GOAL_PREFILL_M}"
    if key in summary:
        goals.append(f"geomean vs _scaled_mm at M >= {GOAL_PREFILL_M}: {summary[key]:.2f}x (goal >= 1.0x)")
    key = f"copy_bw_fraction_m_le_{GOAL_DECODE_M}_median"
    if key in summary:
        goals.append(f"share of measured copy bandwidth ({copy:.0f} GB/s) at M <= {GOAL_DECODE_M}: median "
                     f"{100 * summary[key]:.0f}%, min {100 * summary[key.replace('median', 'min')]:.0f}% (goal >= 70%)")
    if goals:
        lines += ["", *[f"- {g}" for g in goals]]
    return "\n".join(lines)


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
    p.add_argument("--peers", nargs="*", choices=list(PEERS), default=list(PEERS))
    p.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    p.add_argument("--split-k", type=int, nargs="*", default=[], help="sweep these split-K counts (decode path)")
    p.add_argument("--split-k-m", type=int, nargs="+", default=[1, 16], help="M values of the split-K sweep")
    p.add_argument("--copy-gbps", type=float, default=None, help="measured copy bandwidth (default: measure it)")
    p.add_argument("--artefacts", nargs="+", choices=ARTEFACTS, default=list(ARTEFACTS))
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    device = "cuda" if GPU else "cpu"
    machine = machine_name()
    copy = args.copy_gbps
    if copy is None and GPU:
        from bench.peaks import copy_gbps

        copy = copy_gbps("cuda", 1 << 30)
    shrink = 1 if GPU else 128
    peers = [PEERS[p] for p in args.peers]
    print(f"# FP8 GEMM on {machine}" + ("" if GPU else " (tiny shapes = Llama / 128; times are not performance)")
          + (f"; copy bandwidth {copy:.0f} GB/s" if copy else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=machine, gpu=GPU, torch=torch.__version__, copy_gbps=copy, m_values=args.m, tp=args.tp,
                schemes=args.schemes, peers=peers, split_k=args.split_k, split_k_m=args.split_k_m)
    rows, split_rows = [], []

    def write_json(done: bool):
        summary = summarize(rows, split_rows, copy)
        doc = dict(meta=meta, done=done, summary=summary, rows=rows, split_k=split_rows,
                   autotune=autotune_winners(), compiles=compile_stats.snapshot(),
                   markdown=markdown(rows, split_rows, summary) if rows or split_rows else "")
        if done:
            doc["weight_bytes"] = {s or "bf16": weight_memory(s) for s in (None, *SCHEMES)}
        tmp = args.out / "gemm.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, args.out / "gemm.json")
        return doc

    for layer, tp, n, k in layer_shapes(args.tp, shrink):
        if layer in args.layers:
            new, new_split = bench_shape(layer, tp, n, k, args.m, args.schemes, peers, args.split_k,
                                         args.split_k_m, device)
            rows += new
            split_rows += new_split
            if "json" in args.artefacts:
                write_json(done=False)
    doc = write_json(done=True) if "json" in args.artefacts else dict(
        summary=summarize(rows, split_rows, copy), compiles=compile_stats.snapshot())
    table = markdown(rows, split_rows, doc["summary"])
    print(table)
    print(f"\ncompiles in this process: {doc['compiles']['count']} ({doc['compiles']['seconds']:.1f}s)")
    for key, config in autotune_winners().items():
        print(f"autotune {key}: {config}")

    print("\n# Weight memory, Llama-3.3-70B linear layers (80 layers, TP=1)")
    print("| scheme | GB | vs bf16 |\n|---|---|---|")
    bf16 = weight_memory(None)
    for scheme in (None, *SCHEMES):
        nbytes = weight_memory(scheme)
        print(f"| {scheme or 'bf16'} | {nbytes / 1e9:.2f} | {nbytes / bf16:.3f}x |")

    written = ["gemm.json"] if "json" in args.artefacts else []
    if "csv" in args.artefacts and rows:
        with open(args.out / "gemm.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        written.append("gemm.csv")
    if "md" in args.artefacts:
        (args.out / "gemm.md").write_text(f"FP8 GEMM on {machine}\n\n{table}\n")
        written.append("gemm.md")
    if "png" in args.artefacts and rows:
        plot(rows, args.out / "gemm.png", f"FP8 GEMM, {machine}")
        written.append("gemm.png")
    print(f"\nwrote {', '.join(f'{args.out}/{w}' for w in written)}")


if __name__ == "__main__":
    main()
