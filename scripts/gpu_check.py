"""GPU check: one prepared command that, on a machine with a CUDA GPU, returns the benchmark numbers first,
then a verdict on every kernel at scale, within a fixed time, and leaves a valid report however it ends.

    python3 scripts/gpu_check.py --out DIR            # full tier, 470 s from process start
    python3 scripts/gpu_check.py --out DIR --quick    # quick tier, 200 s; the numbers by ~150 s
    python3 scripts/gpu_check.py --out DIR --dry-run  # no GPU: every part at tiny shapes on the CPU path
                                                      # (tests/test_gpu_check.py runs it)

Runs with the machine's own python3 (no .venv, no make, no TRITON_INTERPRET: triton 3.6's interpreter
fails with numpy >= 2.4). Parts, in order (scripts/gpu_check_tiers.py holds every shape and time cap):
  env                GPU, driver, versions; measured copy bandwidth and bf16 / FP8 matmul rates (bench/peaks.py)
  kernels_70b        fp8_gemm at the Llama-3.3-70B layer shapes over M, per-channel and block scales, vs the
                     torch reference with tests/test_fp8_gemm.py's tolerance; W8A16; quantize bit-exact;
                     deterministic rows batch-invariant
  cuda_graph         a 70B-shaped 2-layer model: CUDA-graph capture and replay vs the eager step
  bench_gemm         bench/gemm.py: vs torch._scaled_mm, share of the copy bandwidth, split-K sweep
  bench_attention    bench/attention.py: paged decode attention, share of the copy bandwidth
  bench_decode_step  bench/decode_step.py: 80-layer decode tok/s from per-layer graph replays
  kv_offsets         an FP8 KV cache past 2^31 elements: write_kv, decode and prefill attention there
  decode_256         paged decode attention at batch 256, bf16 and FP8 KV, vs the reference
  pytest             `pytest -m gpu` over the modules holding GPU tests (-n 8), at most 30% of the budget
Each part has a time cap; benchmarks write their JSON as they go, so a capped or killed one keeps its
rows. The report (DIR/gpu_check.json, DIR/gpu_check.md with the goals table) is rewritten after every
part; SIGTERM/SIGINT write it and exit; DIR/gpu_check.log holds everything printed, children's output
streamed as it comes; DIR/bench/ holds the benchmarks' JSON and PNG (at most 8 files in all, two folders
deep: what the device tool brings back). Every part prints its Triton compile count and seconds
(scripts/gpu_compile_plan.py estimates them on a CPU). CPU-kernel builds are off (FP8_TURBO_CPU_KERNELS=0);
autotune results are cached on disk (TRITON_CACHE_AUTOTUNING=1), so the benchmarks' processes reuse
the tuning of the parts before them. Exit code 0 when every part that ran passed; 128 + the signal
when stopped by one; 2 from the watchdog.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_runner import REPO, Runner, process_start  # noqa: E402  (no torch yet)
from gpu_check_tiers import ORDER, PYTEST_SHARE, TIERS  # noqa: E402

START = process_start()


class Tee:
    """Write to the terminal and the log file, flushing every write (output must stream)."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.stream.write(text)
        self.stream.flush()
        self.file.write(text)
        self.file.flush()

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def fileno(self):
        return self.stream.fileno()


def goals(runner: Runner) -> list[dict]:
    """The goals table (bench/GPU.md's rows) from what the parts measured so far."""
    rows = []

    def numbers(part: str, key: str | None = None) -> dict:
        p = next((p for p in runner.parts if p.name == part), None)
        n = p.numbers if p else {}
        return (n.get(key) or {}) if key else n

    peaks = numbers("env").get("peaks") or {}
    if peaks.get("copy_gbps"):
        rows.append(dict(goal="device copy bandwidth (read + write), the ceiling below",
                         measured=f"{peaks['copy_gbps']:.0f} GB/s", target="-", met="-"))
    for key, label in (("bf16_tflops", "bf16 matmul 8192^3"), ("fp8_tflops", "FP8 _scaled_mm 8192^3")):
        if peaks.get(key):
            rows.append(dict(goal=label, measured=f"{peaks[key]:.0f} TFLOP/s", target="-", met="-"))
    gemm = numbers("bench_gemm", "gemm").get("summary") or {}
    if "geomean_vs_scaled_mm_m_ge_512" in gemm:
        v = gemm["geomean_vs_scaled_mm_m_ge_512"]
        rows.append(dict(goal="FP8 GEMM geomean vs torch._scaled_mm, M >= 512", measured=f"{v:.2f}x",
                         target=">= 1.0x", met="yes" if v >= 1.0 else "no"))
    if "copy_bw_fraction_m_le_16_median" in gemm:
        v, lo = gemm["copy_bw_fraction_m_le_16_median"], gemm["copy_bw_fraction_m_le_16_min"]
        rows.append(dict(goal="FP8 GEMM share of copy bandwidth, M <= 16 (median; min)",
                         measured=f"{100 * v:.0f}%; {100 * lo:.0f}%", target=">= 70%", met="yes" if v >= 0.7 else "no"))
    if "split_k_default_is_best" in gemm:
        best = gemm["split_k_best"]
        rows.append(dict(goal="split-K {1, 2, 4} at M in {1, 16}: the default is the fastest",
                         measured="; ".join(f"{k}: best {v['best']} (default {v['default']})" for k, v in best.items()),
                         target="default = best", met="yes" if gemm["split_k_default_is_best"] else "no"))
    attention = numbers("bench_attention", "attention").get("summary") or {}
    for kv in ("fp8", "bf16"):
        key = f"copy_bw_fraction_b64_ctx4096_{kv}"
        if key in attention:
            v = attention[key]
            rows.append(dict(goal=f"decode attention share of copy bandwidth, batch 64 x 4k, {kv} KV",
                             measured=f"{100 * v:.0f}%", target=">= 80%", met="yes" if v >= 0.8 else "no"))
    decode = numbers("bench_decode_step", "decode_step").get("rows") or []
    gpu = numbers("env").get("gpu", "")
    for r in decode:
        if r["batch"] == 1:
            target = ">= 58 tok/s (H200)"
            met = ("yes" if r["tok_s_80"] >= 58 else "no") if "H200" in gpu else "- (goal set for the H200)"
            rows.append(dict(goal="Llama-3.3-70B-shaped decode, batch 1, 80 layers (graphs; host + head + layers)",
                             measured=f"{r['tok_s_80']:.1f} tok/s (layer {r['layer_ms']:.3f} ms, head "
                                      f"{r['head_ms']:.3f}, host {r['host_ms']:.3f})", target=target, met=met))
        if "deterministic_layer_ms" in r and r["layer_ms"] > 0:
            rows.append(dict(goal=f"deterministic mode's cost per layer, batch {r['batch']}",
                             measured=f"{r['deterministic_layer_ms'] / r['layer_ms']:.2f}x", target="report", met="-"))
    checks = [c for p in runner.parts for c in p.checks]
    if checks:
        bad = sum(not c["ok"] for c in checks)
        rows.append(dict(goal="correctness checks (kernels at 70B shapes, graphs, 2^31 offsets, batch 256, pytest)",
                         measured=f"{len(checks) - bad}/{len(checks)} pass", target="all", met="yes" if not bad else "no"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json, .md, .log and bench/")
    p.add_argument("--quick", action="store_true", help="the quick tier (numbers within ~150 s)")
    p.add_argument("--dry-run", action="store_true", help="no GPU: every part at tiny shapes on the CPU path")
    p.add_argument("--budget", type=float, default=None, help="seconds from process start (default: the tier's)")
    p.add_argument("--only", nargs="+", choices=ORDER, default=None, help="run only these parts")
    args = p.parse_args(argv)
    # for this process and every child, before torch, triton or the kernels are imported
    os.environ.pop("TRITON_INTERPRET", None)  # never the interpreter here (see the docstring)
    os.environ["FP8_TURBO_CPU_KERNELS"] = "0"  # no C++ CPU-kernel builds: nothing here runs them
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    compile_log = tempfile.NamedTemporaryFile(prefix="gpu_check_compiles_", suffix=".jsonl", delete=False).name
    os.environ["FP8_TURBO_COMPILE_LOG"] = compile_log

    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "gpu_check.log", "w", buffering=1)
    sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)
    command = " ".join([Path(sys.argv[0]).name if argv is None else "gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    tier = TIERS["dry-run" if args.dry_run else "quick" if args.quick else "full"]
    runner = Runner(args.out, args.budget or tier.budget, START, tier.name, command, compile_log)
    runner.plan(ORDER)
    runner.install_signal_handlers()  # from here on a signal leaves a report
    runner.report()

    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        print("no CUDA GPU: running the dry run (every part at tiny shapes on the CPU path)")
        args.dry_run = True
        tier = TIERS["dry-run"]
        runner.tier, runner.budget = tier.name, args.budget or tier.budget
    runner.start_watchdog()
    runner.goal_reader = goals

    from gpu_check_parts import Parts

    parts = Parts(runner, tier, args.dry_run, args.out)
    device = torch.cuda.get_device_name() if parts.gpu else "no GPU: CPU path (C++ kernels off, no Triton)"
    print(f"# gpu_check {tier.name}: budget {runner.budget:.0f}s from process start ({runner.elapsed():.1f}s "
          f"spent before this line), {device}", flush=True)
    steps = {
        "env": parts.env,
        "kernels_70b": parts.kernels_70b,
        "cuda_graph": parts.cuda_graph,
        "bench_gemm": lambda part: parts.bench(part, "gemm", tier.gemm_args),
        "bench_attention": lambda part: parts.bench(part, "attention", tier.attention_args),
        "bench_decode_step": lambda part: parts.bench(part, "decode_step", tier.decode_args),
        "kv_offsets": parts.kv_offsets,
        "decode_256": parts.decode_256,
        "pytest": parts.pytest,
    }
    for name in ORDER:
        if args.only and name not in args.only:
            part = runner.get(name)
            part.status, part.note = "skipped", "not in --only"
            continue
        cap = tier.caps.get(name, PYTEST_SHARE * runner.budget)
        runner.run(name, steps[name], cap, min_start=1.0 if name == "env" else 5.0)
    return runner.report(final=True)


if __name__ == "__main__":
    sys.exit(main())
