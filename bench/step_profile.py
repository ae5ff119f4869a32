"""Where a decode step's time goes: linear GEMMs, attention, the small ops around them, the sampler and
the host work between ops, per quantization scheme, on this machine.

SmolLM2-135M-Instruct, B sequences decoding together (after a chat-prompt prefill), S steps under
torch.profiler (CPU). Each operator's self time is put into one bucket by its name; "host (Python)"
is the step's wall time minus all operator time (scheduling, metadata, bookkeeping, dispatch). Our C++
kernels (kernels/cpu) are pybind calls that torch.profiler does not see: during the profiled steps each
launcher is wrapped in a record_function named after it, so their time lands in its bucket too.
Profiling inflates tiny ops, so the wall time without the profiler is measured too. Each scheme runs
on the native CPU step (one C++ call for all layers, split into the buckets by its own phase clock;
"barrier wait": its threads waiting for each other between phases) and on the module path
(FP8_TURBO_NATIVE_STEP=0: one kernel call per op), so one run shows before and after. Prints a table,
writes JSON + PNG to bench/out/.

    .venv/bin/python bench/step_profile.py [--schemes none,fp8] [--batch 1] [--steps 32] [--paths native,module]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from fp8_turbo import LLM, SamplingParams
from fp8_turbo.engine.model.native_step import native_step
from fp8_turbo.kernels.cpu.step import PHASES

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers as peer_tools  # noqa: E402  (the CPU's name and ISA)

OUT = Path(__file__).parent / "out"
PROMPT = [{"role": "user", "content": "Explain in a few paragraphs why the sky is blue."}]

# operator name (substring, lower case) -> bucket; the first match wins
# The native step's phases (kernels/cpu/step.py PHASES, its own clock) -> buckets; its call's time is
# split between them in proportion.
NATIVE_PHASES = {"rows": "norm/rotary/act", "gemm qkv": "gemm", "attention": "attention", "gemm o": "gemm",
                 "gemm gate_up": "gemm", "gemm down": "gemm", "lm_head": "gemm", "wait": "barrier wait"}
BUCKETS = (
    ("native step (all layers)", ("native_step",)),
    ("gemm", ("addmm", "aten::mm", "matmul", "aten::linear", "bmm", "fp8_gemm", "fp8_linear", "dense_gemm",
              "dense_linear")),
    ("attention", ("attention", "softmax", "index_select", "write_kv", "paged")),
    ("quantize", ("quantize", "round", "clamp", "amax", "copysign")),
    ("sampler", ("topk", "argmax", "multinomial", "exponential", "sort", "cumsum", "log_softmax")),
    ("norm/rotary/act", ("rsqrt", "pow", "mean", "silu", "cos", "sin", "cat", "neg", "rms_norm", "rotary")),
)


def bucket(name: str) -> str:
    low = name.lower()
    for label, keys in BUCKETS:
        if any(k in low for k in keys):
            return label
    return "other ops"


def machine() -> str:
    return f"{peer_tools.cpu()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def start_decoding(llm: LLM, batch: int) -> None:
    """Add `batch` requests and step until every one has its prompt computed (decode from then on)."""
    ids = llm.tokenizer.apply_chat_template(PROMPT)
    params = SamplingParams(temperature=0, max_tokens=1024, ignore_eos=True)
    for i in range(batch):
        llm.engine.add_request(f"r{i}", ids, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for r in llm.engine.requests.values() for s in r.seqs):
        llm.engine.step()
    llm.engine.step()


# (module, launchers) of our C++ kernels, labelled while profiling; modules missing in a checkout are skipped
CPU_LAUNCHERS = (
    ("fp8_turbo.kernels.cpu", ("fp8_linear", "dense_linear", "fp8_gemm", "quantize_fp8")),
    ("fp8_turbo.kernels.cpu.gemm", ("fp8_linear", "dense_linear", "fp8_gemm", "quantize_fp8")),
    ("fp8_turbo.kernels.cpu.attention", ("paged_attention_decode", "paged_attention_prefill", "write_kv")),
    ("fp8_turbo.kernels.cpu.ops", ("rms_norm", "rotary_", "silu_mul")),
    ("fp8_turbo.engine.model.native_step", ("native_step_call",)),
)


@contextlib.contextmanager
def labelled_cpu_kernels():
    """Wrap each launcher of CPU_LAUNCHERS in record_function("cpu::<name>") for the duration (the native
    step's call is NativeStep.__call__)."""
    saved = []
    for module_name, names in CPU_LAUNCHERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in names:
            owner, attr = (getattr(module, "NativeStep", None), "__call__") if name == "native_step_call" else (module, name)
            fn = getattr(owner, attr, None) if owner is not None else None
            if fn is None:
                continue

            def labelled(*args, _fn=fn, _label=f"cpu::{name}", **kwargs):
                with record_function(_label):
                    return _fn(*args, **kwargs)

            saved.append((owner, attr, fn))
            setattr(owner, attr, labelled)
    try:
        yield
    finally:
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)


def profile_scheme(scheme: str, batch: int, steps: int, path: str) -> dict:
    os.environ["FP8_TURBO_NATIVE_STEP"] = "1" if path == "native" else "0"
    llm = LLM("smollm2-135m-instruct", quantization=scheme, device="cpu")
    start_decoding(llm, batch)
    for _ in range(4):  # warm-up
        llm.engine.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.engine.step()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    native = native_step(llm.engine.model, torch.zeros(1, dtype=torch.int64)) if path == "native" else None
    if native is not None:
        native.step.profiling = True
        native.step.phase_seconds(reset=True)
    with labelled_cpu_kernels(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.engine.step()
        prof_wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    times: dict[str, float] = defaultdict(float)
    calls = 0
    for evt in prof.key_averages():
        if evt.key.startswith("ProfilerStep") or evt.self_cpu_time_total <= 0:
            continue
        times[bucket(evt.key)] += evt.self_cpu_time_total / 1e3 / steps
        calls += evt.count
    op_ms = sum(times.values())
    times["host (Python)"] = max(prof_wall_ms - op_ms, 0.0)
    if native is not None:  # split the native call by its phase clock
        phases = dict(zip(PHASES, native.step.phase_seconds(reset=True)))
        native.step.profiling = False
        total = sum(phases.values())
        native_ms = times.pop("native step (all layers)", 0.0)
        for phase, seconds in phases.items():
            if total > 0:
                times[NATIVE_PHASES[phase]] += native_ms * seconds / total
    llm.shutdown()
    return {"scheme": scheme, "path": path, "batch": batch, "wall_ms": wall_ms, "profiled_wall_ms": prof_wall_ms,
            "ops_per_step": calls / steps, "ms": dict(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="none,fp8")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--paths", default="native,module", help="native (one C++ call per step) and/or module "
                                                              "(FP8_TURBO_NATIVE_STEP=0)")
    ap.add_argument("--tag", default="", help="suffix of the output files (e.g. 'before')")
    args = ap.parse_args()
    rows = [profile_scheme(s, args.batch, args.steps, path) for s in args.schemes.split(",")
            for path in args.paths.split(",")]

    labels = [b for b, _ in BUCKETS if b != "native step (all layers)"] + ["barrier wait", "other ops", "host (Python)"]
    print(f"\nDecode step breakdown, SmolLM2-135M, batch {args.batch}, {args.steps} steps; machine: {machine()}\n")
    print("| scheme | path | step ms (no profiler) | step ms (profiled) | ops/step | " + " | ".join(labels) + " |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(labels))
    for r in rows:
        cells = " | ".join(f"{r['ms'].get(b, 0.0):.2f}" for b in labels)
        print(f"| {r['scheme']} | {r['path']} | {r['wall_ms']:.2f} | {r['profiled_wall_ms']:.2f} | {r['ops_per_step']:.0f} "
              f"| {cells} |")

    OUT.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    result = {"benchmark": "step_profile", "machine": machine(), "batch": args.batch, "steps": args.steps, "rows": rows}
    (OUT / f"step_profile{tag}.json").write_text(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(rows)))
    left = [0.0] * len(rows)
    for b in labels:
        vals = [r["ms"].get(b, 0.0) for r in rows]
        ax.barh([f"{r['scheme']} ({r['path']})" for r in rows], vals, left=left, label=b)
        left = [x + v for x, v in zip(left, vals)]
    ax.set_xlabel("ms per decode step (profiled)")
    ax.set_title(f"SmolLM2-135M decode step, batch {args.batch}, {os.cpu_count()} CPU cores")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    fig.savefig(OUT / f"step_profile{tag}.png", dpi=120)
    print(f"wrote {OUT / f'step_profile{tag}.json'} and .png")


if __name__ == "__main__":
    main()
