"""FP8 accuracy of every scheme on SmolLM2-135M-Instruct (or --model) vs the unquantized model.

Writes bench/out/accuracy.{json,md,png}: perplexity, KL(base || quant), top-1 agreement and per-layer
SQNR for each scheme and ignore-list variant, plus the one-layer-at-a-time sensitivity sweep.
`--part sweep` runs only the sweep (bench/out/accuracy_sweep.json); `--part eval` picks that file up,
so the two halves can run side by side. CPU fake-quant path (same numerics as the FP8 kernels).

    .venv/bin/python bench/accuracy.py --tokens 1024 --window 512 --sweep-tokens 128
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.model.linear import DEFAULT_IGNORE  # noqa: E402
from engine.lab.accuracy import (DEFAULT_SCHEMES, corpus_text, corpus_windows, evaluate, plot, sensitivity_sweep,  # noqa: E402
                             to_json, to_markdown)

OUT = Path(__file__).resolve().parent / "out"
# Ignore-list variants of fp8 around the default (engine.model.linear.DEFAULT_IGNORE: lm_head + last block's MLP).
VARIANTS = {
    "fp8, lm_head only": ("lm_head",),
    "fp8, + first block's MLP": (*DEFAULT_IGNORE, "model.layers.0.mlp.*"),
    "fp8, + every down_proj": (*DEFAULT_IGNORE, "*.down_proj"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--corpus", default=None, help="text file (default: pydoc_data.topics)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--sweep-tokens", type=int, default=128)
    ap.add_argument("--part", choices=("all", "eval", "sweep", "report"), default="all",
                    help="report: rebuild md/png from accuracy.json and accuracy_sweep.json")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=PAT,PAT",
                    help="extra fp8 config with an ignore list (repeatable)")
    ap.add_argument("--no-variants", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores (shared), fake-quant fp32 path"
    sweep_file = OUT / "accuracy_sweep.json"
    sweep = None
    if args.part in ("all", "sweep"):
        from engine.llm import LLM

        tok = LLM(args.model, device="cpu", kv_cache_memory_bytes=16 << 20).tokenizer
        wins = corpus_windows(tok, corpus_text(args.corpus), args.sweep_tokens, args.sweep_tokens)
        t0 = time.perf_counter()
        sweep = sensitivity_sweep(args.model, wins, "fp8", log=lambda s: print(s, flush=True))
        sweep_file.write_text(json.dumps({"sweep_tokens": sum(len(w) - 1 for w in wins), "seconds": time.perf_counter() - t0,
                                          "sweep": sweep}, indent=1))
        print("\n".join(f"{r['layer']:40s} KL {r['kl']:.5f} top1 {100 * r['top1']:.2f}%" for r in sweep[:15]))
        if args.part == "sweep":
            return 0
    if args.part == "report":
        from engine.lab.accuracy import EvalResult

        data = json.loads((OUT / "accuracy.json").read_text())
        return _report([EvalResult(**r) for r in data["results"]], data["meta"], sweep_file)
    configs = [(s, s, DEFAULT_IGNORE) for s in DEFAULT_SCHEMES]
    if not args.no_variants:
        configs += [(label, "fp8", ignore) for label, ignore in VARIANTS.items()]
    for v in args.variant:
        label, _, pats = v.partition("=")
        configs.append((label, "fp8", (*DEFAULT_IGNORE, *pats.split(","))))
    t0 = time.perf_counter()
    results, _ = evaluate(args.model, configs, corpus=args.corpus, tokens=args.tokens, window=args.window,
                          log=lambda s: print(s, flush=True))
    meta = dict(model=args.model, corpus=args.corpus or "pydoc_data.topics", tokens=results[0].tokens, window=args.window,
                machine=machine, seconds=round(time.perf_counter() - t0, 1), sweep_scheme="fp8")
    return _report(results, meta, sweep_file)


def _report(results, meta: dict, sweep_file: Path) -> int:
    sweep_meta = json.loads(sweep_file.read_text()) if sweep_file.is_file() else None
    meta["sweep_tokens"] = sweep_meta["sweep_tokens"] if sweep_meta else None
    sweep = sweep_meta["sweep"] if sweep_meta else None
    (OUT / "accuracy.json").write_text(json.dumps(to_json(results, sweep, meta), indent=1))
    md = to_markdown(results, sweep, meta)
    (OUT / "accuracy.md").write_text(md)
    plot(results, sweep, OUT / "accuracy.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
