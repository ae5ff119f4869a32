"""Decode speed of FP8 schemes side by side in one process, runs interleaved: the measurement behind what
`quantization="fp8"` means on this backend (engine.model.schemes.fp8_scheme), and the cost of the finer
weight scales.

SmolLM2-135M-Instruct on the CPU (our kernels).
- Engine (--schemes): every scheme is loaded once; then for R rounds each scheme in turn runs (a) single
  stream: one chat prompt, greedy, N new tokens (EOS ignored), prompt included (no prefix cache), and
  (b) C concurrent sequences: bench/throughput.py's C chat requests with mixed prompt and output lengths
  through continuous batching.
- GEMMs (--kernel-schemes): the linear layers of one decode step alone, kernels.cpu.fp8_linear on the
  30 blocks' shapes (qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536; ~106 MB of e4m3 weights,
  more than the last-level cache, as in decode), for M = 1 and M = 32 tokens, each scheme's weight
  scales and activation quantization; medians of R reps.
Interleaving puts each scheme's runs under the same background load on a shared machine; the tables
give medians, the per-round ratio against the first scheme, and its median. Writes
bench/out/scheme_speed.{json,md,png}.

    .venv/bin/python bench/scheme_speed.py [--schemes fp8-w8a8,fp8] [--rounds 5] [--kernel-reps 21]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate import PROMPT, machine  # noqa: E402
from throughput import make_prompts, run_ours  # noqa: E402

from fp8_turbo import LLM, SamplingParams  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2's qkv, o, gate_up, down (N, K)
KERNEL_SCHEMES = ("fp8-w8a8,fp8-weight-only,fp8-weight-only-g128,fp8-weight-only-g32,fp8-weight-only-mx,"
                  "fp8-w8a8-g32,fp8-w8a8-mx")


def kernel_times(schemes: list[str], m_values: tuple[int, ...], reps: int, blocks: int = 30) -> dict:
    """{scheme: {M: [seconds per decode step's GEMMs, one per rep]}}, schemes interleaved within each rep."""
    import torch

    from fp8_turbo.engine.model.schemes import SCHEMES
    from fp8_turbo.kernels import cpu
    from fp8_turbo.kernels.fp8 import quantize_weight

    g = torch.Generator().manual_seed(0)
    weights = {s: [] for s in schemes}
    for _ in range(blocks):
        for n, k in LAYER_SHAPES:
            w = torch.randn(n, k, generator=g) * 0.05
            for s in schemes:
                weights[s].append(quantize_weight(w, SCHEMES[s].weight, SCHEMES[s].group))
    xs = {m: {k: torch.randn(m, k, generator=g) for _, k in LAYER_SHAPES} for m in m_values}
    times = {s: {m: [] for m in m_values} for s in schemes}

    def step(s: str, m: int) -> float:
        spec = SCHEMES[s]
        t0 = time.perf_counter()
        for w, scale in weights[s]:
            cpu.fp8_linear(xs[m][w.shape[1]], w, scale, spec.act, act_group=spec.group, act_pow2=spec.act_pow2)
        return time.perf_counter() - t0

    for s in schemes:  # warm-up
        for m in m_values:
            step(s, m)
    for r in range(reps):
        for m in m_values:
            for s in (schemes if r % 2 == 0 else schemes[::-1]):
                times[s][m].append(step(s, m))
    return times


def single_stream(llm: LLM, ids: list[int], new_tokens: int) -> float:
    llm.engine.block_manager.enable_prefix_caching = False
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0]
    assert len(out.token_ids) == new_tokens
    return new_tokens / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="fp8-w8a8,fp8-weight-only", help="comma-separated; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64, help="longest output of the concurrent requests")
    ap.add_argument("--kernel-schemes", default=KERNEL_SCHEMES, help="comma-separated; '' skips the GEMM table")
    ap.add_argument("--kernel-reps", type=int, default=21)
    args = ap.parse_args()
    kernel_md, ktimes = "", {}
    kschemes = [s for s in args.kernel_schemes.split(",") if s]
    if kschemes:
        ktimes = kernel_times(kschemes, (1, 32), args.kernel_reps)
        kb = kschemes[0]
        lines = [f"GEMMs of one SmolLM2 decode step (30 blocks, {len(LAYER_SHAPES)} layers each, cold e4m3 weights), "
                 f"kernels.cpu.fp8_linear, medians of {args.kernel_reps} interleaved reps", "",
                 f"| scheme | M=1 ms | vs {kb} | M=32 ms | vs {kb} |", "|---|---:|---:|---:|---:|"]
        for s in kschemes:
            cells = []
            for m in (1, 32):
                med = statistics.median(ktimes[s][m])
                ratio = statistics.median(b / a for a, b in zip(ktimes[s][m], ktimes[kb][m]))  # speed vs baseline
                cells += [f"{1e3 * med:.2f}", f"{ratio:.3f}x"]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        kernel_md = "\n".join(lines) + "\n"
        print(kernel_md, file=sys.stderr, flush=True)
    schemes = [s for s in args.schemes.split(",") if s]
    if not schemes:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "scheme_speed.md").write_text(f"{machine()}\n\n{kernel_md}")
        (OUT / "scheme_speed.json").write_text(json.dumps({"machine": machine(), "args": vars(args),
                                                            "kernel_seconds": ktimes}, indent=1))
        print(kernel_md)
        return 0
    llms = {s: LLM("smollm2-135m-instruct", quantization=s, device="cpu") for s in schemes}
    names = {s: llm.engine.quant_scheme for s, llm in llms.items()}
    first = llms[schemes[0]]
    ids = first.tokenizer.apply_chat_template(PROMPT)
    prompts = make_prompts(first, args.concurrency, args.max_tokens)
    for llm in llms.values():  # warm-up: both paths, every kernel shape once
        single_stream(llm, ids, 8)
        run_ours(llm, prompts[:4])
    rates: dict[str, dict[str, list[float]]] = {s: {"single": [], "batch": []} for s in schemes}
    for r in range(args.rounds):
        for s in (schemes if r % 2 == 0 else schemes[::-1]):  # alternate the order too
            rates[s]["single"].append(single_stream(llms[s], ids, args.new_tokens))
            rates[s]["batch"].append(run_ours(llms[s], prompts)["tok_s"])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{s} {rates[s]['single'][-1]:.1f} / {rates[s]['batch'][-1]:.1f}" for s in schemes), file=sys.stderr, flush=True)
    base = schemes[0]
    rows = []
    for s in schemes:
        row = {"scheme": s, "runs": names[s]}
        for kind in ("single", "batch"):
            row[kind] = statistics.median(rates[s][kind])
            row[f"{kind}_ratio"] = statistics.median(a / b for a, b in zip(rates[s][kind], rates[base][kind]))
        rows.append(row)
    where = machine()
    md = "\n".join([
        f"Decode speed by scheme, SmolLM2-135M-Instruct, our CPU kernels, {args.rounds} interleaved rounds; {where}",
        "", f"| scheme (runs) | single stream tok/s ({args.new_tokens} tokens) | vs {base} | "
            f"{args.concurrency} concurrent tok/s (<= {args.max_tokens} tokens each) | vs {base} |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r['scheme']} ({r['runs']}) | {r['single']:.1f} | {r['single_ratio']:.3f}x | {r['batch']:.1f} "
          f"| {r['batch_ratio']:.3f}x |" for r in rows]]) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    md = md + ("\n" + kernel_md if kernel_md else "")
    (OUT / "scheme_speed.md").write_text(md)
    (OUT / "scheme_speed.json").write_text(json.dumps({"machine": where, "args": vars(args), "rows": rows,
                                                        "rates": rates, "kernel_seconds": ktimes}, indent=1))
    _plot(rates, schemes, args, OUT / "scheme_speed.png")
    print(md)
    return 0


def _plot(rates, schemes, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind, title in ((axes[0], "single", f"single stream, {args.new_tokens} tokens"),
                            (axes[1], "batch", f"{args.concurrency} concurrent sequences")):
        for s in schemes:
            ax.plot(range(1, len(rates[s][kind]) + 1), rates[s][kind], "o-", label=s)
        ax.set_xlabel("round (schemes interleaved)")
        ax.set_ylabel("tok/s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
