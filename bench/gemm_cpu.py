"""CPU GEMM benchmark: our C++ FP8 kernels (kernels/cpu) vs fp32 torch.matmul vs the torch reference.

    .venv/bin/python bench/gemm_cpu.py                 # SmolLM2 shapes, M = 1 ... 256, torch's threads
    .venv/bin/python bench/gemm_cpu.py --threads 1 --m 1 8 --layers lm_head

Shapes (N x K): SmolLM2-135M's qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536 and the tied
lm_head 49152x576; M (tokens) 1, 2, 4, 8, 16, 32, 64, 256. Implementations, one linear layer each:
  fp8 (ours)       kernels.cpu.fp8_linear: fp32 activations quantized per token inside the call, e4m3
                   weights with per-channel scales (the engine's `fp8` scheme), fp32 out
  fp32 matmul      x @ W.T with the fp32 weight (what `none` and today's CPU `fp8` path read)
  reference        kernels.gemm.fp8_gemm_reference on quantize_fp8(x): the tests' torch reference
  lm_head only:    bf16 dense (ours) kernels.cpu.dense_linear with a bf16 weight; fp8 weight-only (ours)
Weights are cold, as in a decode step that streams ~220 MB per token: every call reads another copy
of the weight, enough copies to exceed the last-level cache. Times: median of --reps calls.
Read bandwidth: the median rate of a 256 MB fp32 torch.sum with the same threads; at M <= 8 the
table gives our GEMV's weight-read rate as a share of it.

Writes bench/out/gemm_cpu.{json,md,png} and prints the markdown table. Run it alone on the machine
(`flock /tmp/fp8turbo-bench.lock ...` where several people share one).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fp8_turbo.kernels import cpu  # noqa: E402
from fp8_turbo.kernels.cpu import gemm as cpu_gemm  # noqa: E402
from fp8_turbo.kernels.fp8 import quantize_weight  # noqa: E402
from fp8_turbo.kernels.gemm import fp8_gemm_reference  # noqa: E402
from fp8_turbo.kernels.quantize import quantize_fp8  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
LAYERS = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 256]
OURS, FP32, REF, BF16, WO = "fp8 (ours)", "fp32 matmul", "reference", "bf16 dense (ours)", "fp8 weight-only (ours)"
COLD_BYTES = 160 * 2**20  # > any last-level cache here: every call finds its weight in DRAM


def machine() -> dict:
    info = {"processor": platform.processor() or platform.machine()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["model"] = fields.get("Model name", "").strip()
        flags = fields.get("Flags", "").split()
        info["isa_flags"] = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
        info["l3"] = fields.get("L3 cache", "").strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    info["threads"] = torch.get_num_threads()
    info["kernel_isa"] = cpu_gemm.ISAS[cpu.selected_isa()] if cpu.available() else None
    info["torch"] = torch.__version__
    return info


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def read_bandwidth_gbps(reps: int = 9) -> float:
    x = torch.ones(64 * 2**20)  # 256 MB
    return x.numel() * 4 / median_ms(x.sum, reps) / 1e3


def cold(make, nbytes: int) -> callable:
    """Copies of a weight (from make()) totalling > COLD_BYTES, handed out round-robin."""
    copies = [make() for _ in range(max(2, -(-COLD_BYTES // nbytes)))]
    state = {"i": 0}

    def next_copy():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    return next_copy


def bench_layer(layer, n, k, m_values, reps):
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    w8 = cold(lambda: quantize_weight(w, "channel"), n * k)
    w32 = cold(lambda: w.clone(), 4 * n * k)
    wb = cold(lambda: w.bfloat16(), 2 * n * k) if layer == "lm_head" else None
    rows = []
    for m in m_values:
        x = torch.randn(m, k)
        a, a_scale = quantize_fp8(x, "token")
        impls = {
            OURS: (lambda: cpu.fp8_linear(x, *w8(), "token", out_dtype=torch.float32), n * k),
            FP32: (lambda: x @ w32().T, 4 * n * k),
            REF: (lambda: fp8_gemm_reference(*_pair(w8(), a, a_scale), torch.float32), n * k),
        }
        if wb is not None:
            impls[BF16] = (lambda: cpu.dense_linear(x, wb(), out_dtype=torch.float32), 2 * n * k)
            impls[WO] = (lambda: cpu.fp8_linear(x, *w8(), None, out_dtype=torch.float32), n * k)
        for impl, (fn, weight_bytes) in impls.items():
            ms = median_ms(fn, reps if impl != REF or m * n < 2**22 else max(3, reps // 3))
            rows.append(dict(layer=layer, n=n, k=k, m=m, impl=impl, ms=ms, gflops=2.0 * m * n * k / ms / 1e6,
                             weight_gbps=weight_bytes / ms / 1e6))
        print(f"  done {layer} M={m}", file=sys.stderr)
    return rows


def _pair(weight, a, a_scale):
    b, b_scale = weight
    return a, b, a_scale, b_scale


def markdown(rows, bandwidth):
    by_case = {}
    for r in rows:
        by_case.setdefault((r["layer"], r["n"], r["k"], r["m"]), {})[r["impl"]] = r
    head = ("| layer | N x K | M | fp8 (ours) ms | weight GB/s | % of read BW | fp32 matmul ms | reference ms "
            "| vs fp32 | vs reference | bf16 dense (ours) ms | fp8 weight-only (ours) ms |")
    lines = [head, "|" + "---|" * 12]
    summary = {"speedup_vs_fp32": {}, "speedup_vs_reference": {}, "gemv_bw_share": {}}
    for (layer, n, k, m), case in by_case.items():
        ours, fp32, ref = case[OURS], case[FP32], case[REF]
        share = ours["weight_gbps"] / bandwidth if m <= 8 else None
        vs32, vsref = fp32["ms"] / ours["ms"], ref["ms"] / ours["ms"]
        summary["speedup_vs_fp32"][f"{layer}/M{m}"] = vs32
        summary["speedup_vs_reference"][f"{layer}/M{m}"] = vsref
        if share is not None:
            summary["gemv_bw_share"][f"{layer}/M{m}"] = share
        extra = [f"{case[i]['ms']:.3f}" if i in case else "-" for i in (BF16, WO)]
        lines.append(f"| {layer} | {n}x{k} | {m} | {ours['ms']:.3f} | {ours['weight_gbps']:.1f} | "
                     + (f"{100 * share:.0f}%" if share is not None else "-")
                     + f" | {fp32['ms']:.3f} | {ref['ms']:.3f} | {vs32:.2f}x | {vsref:.2f}x | " + " | ".join(extra) + " |")
    return "\n".join(lines), summary


def plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["m"], r["ms"]) for r in rows if r["layer"] == layer and r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        n, k = next((r["n"], r["k"]) for r in rows if r["layer"] == layer)
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="ms per call", title=f"{layer} {n}x{k}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--m", type=int, nargs="+", default=M_VALUES)
    p.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not cpu.available():
        sys.exit("the CPU kernels are not available (build failed); nothing to benchmark")
    torch.set_num_threads(args.threads)
    info = machine()
    bandwidth = read_bandwidth_gbps()
    name = f"{info.get('model') or info['processor']} ({', '.join(info.get('isa_flags', []))}), {args.threads} threads"
    print(f"# CPU GEMM on {name}; kernel ISA {info['kernel_isa']}; read bandwidth {bandwidth:.1f} GB/s")
    rows = []
    for layer in args.layers:
        rows += bench_layer(layer, *LAYERS[layer], args.m, args.reps)
    bandwidth_after = read_bandwidth_gbps()
    table, summary = markdown(rows, (bandwidth + bandwidth_after) / 2)
    print(table)
    print(f"read bandwidth before/after: {bandwidth:.1f} / {bandwidth_after:.1f} GB/s")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=info, read_gbps=[bandwidth, bandwidth_after], m_values=args.m, reps=args.reps)
    (args.out / "gemm_cpu.json").write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1))
    (args.out / "gemm_cpu.md").write_text(f"CPU GEMM on {name}; read bandwidth {bandwidth:.1f} / "
                                          f"{bandwidth_after:.1f} GB/s (before/after)\n\n{table}\n")
    plot(rows, args.out / "gemm_cpu.png", f"CPU GEMM, {name}")
    print(f"\nwrote {args.out}/gemm_cpu.json, gemm_cpu.md, gemm_cpu.png")


if __name__ == "__main__":
    main()
