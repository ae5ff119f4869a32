"""FP8 accuracy of every scheme, calibration method and combination on SmolLM2-135M-Instruct (or --model),
calibrated on one corpus and scored on another (held-out) corpus.

Writes bench/out/accuracy.{json,md,png}: perplexity, KL(base || quant) mean and p99, top-1 agreement,
llama.cpp's "same top token", per-layer SQNR and linear-weight bytes per configuration, the
one-layer-at-a-time sensitivity sweep (on calibration text), and a chart of bytes vs KL with its Pareto
front. `--part sweep` runs only the sweep (bench/out/accuracy_sweep.json); `--part eval` reads it for the
byte-budget rows; `--part report` rebuilds md/png from the JSON files. CPU path (FP8 numerics in fp32).
Each finished configuration is appended to bench/out/accuracy_partial.json at once; `--resume` skips the
configurations found there (same tokens, window and corpora), so a long run can be taken in parts.

    .venv/bin/python bench/accuracy.py --tokens 8192 --calib-tokens 8192 --sweep-tokens 512
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8_turbo.engine.lab.accuracy import DEFAULT_SCHEMES, EvalConfig, EvalResult, corpus_meta, evaluate  # noqa: E402
from fp8_turbo.engine.lab.budget import budget_ignore  # noqa: E402
from fp8_turbo.engine.lab.corpora import corpus_text, corpus_windows  # noqa: E402
from fp8_turbo.engine.lab.recipe import METHODS, method_label  # noqa: E402
from fp8_turbo.engine.lab.report import plot, to_json, to_markdown  # noqa: E402
from fp8_turbo.engine.model.linear import DEFAULT_IGNORE  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
# Every non-empty combination of the methods, in their canonical order.
COMBINATIONS = [tuple(m for i, m in enumerate(METHODS) if mask >> i & 1) for mask in range(1, 1 << len(METHODS))]
BUDGET_OVER_DEFAULT = 0.05  # the goal: at most 5% more linear-weight bytes than today's default


def configs(sweep: list[dict] | None, best: tuple[str, ...]) -> list[EvalConfig]:
    """Method rows share one statistics pass of the unquantized model (sequential=False); the best
    combination is also run sequentially, as `fp8-turbo quantize` does by default."""
    out = [EvalConfig(s, s, DEFAULT_IGNORE) for s in DEFAULT_SCHEMES if s != "fp8-tensor"]
    out += [EvalConfig(f"fp8 {method_label(m)}", "fp8", DEFAULT_IGNORE, m, sequential=False)
            for m in sorted(COMBINATIONS, key=lambda m: (len(m), METHODS.index(m[0])))]
    out += [EvalConfig(f"fp8 {method_label(best)}, sequential", "fp8", DEFAULT_IGNORE, best),
            EvalConfig(f"fp8-block {method_label(best)}", "fp8-block", DEFAULT_IGNORE, best, sequential=False),
            EvalConfig("fp8-weight-only search+gptq", "fp8-weight-only", DEFAULT_IGNORE, ("search", "gptq"),
                       sequential=False)]
    if sweep:
        fp8_bytes = sum(r["params"] for r in sweep)  # all decoder Linears in FP8, 1 byte each
        last = max(int(r["layer"].split(".")[2]) for r in sweep)
        today = sum(r["params"] for r in sweep if r["layer"].startswith(f"model.layers.{last}.mlp."))
        extra = (fp8_bytes + today) * (1 + BUDGET_OVER_DEFAULT) - fp8_bytes  # hp bytes at +5% over today
        ignore = budget_ignore(sweep, extra)
        out += [EvalConfig("fp8, budget +5%", "fp8", ignore),
                EvalConfig(f"fp8 {method_label(best)}, budget +5%", "fp8", ignore, best, sequential=False)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--corpus", default=None, help="scoring text file (default: the standard library's docstrings)")
    ap.add_argument("--calib-corpus", default=None, help="calibration text file (default: pydoc_data.topics)")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens for the methods")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--sweep-tokens", type=int, default=512, help="calibration tokens for the sensitivity sweep")
    ap.add_argument("--best", default="smooth+search+gptq",
                    help="method combination also run with fp8-block and under the byte budget")
    ap.add_argument("--only", action="append", default=None, metavar="LABEL",
                    help="run this configuration (repeat for several; labels may hold commas); default: all")
    ap.add_argument("--part", choices=("all", "eval", "sweep", "report"), default="all")
    ap.add_argument("--resume", action="store_true", help="skip configurations in bench/out/accuracy_partial.json")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), torch CPU path (FP8 numerics in fp32)"
    sweep_file = OUT / "accuracy_sweep.json"
    if args.part in ("all", "sweep"):
        from fp8_turbo.engine.lab.sensitivity import sensitivity_sweep
        from fp8_turbo.engine.llm import LLM

        tok = LLM(args.model, device="cpu", kv_cache_memory_bytes=16 << 20).tokenizer
        wins = corpus_windows(tok, corpus_text(args.calib_corpus), args.sweep_tokens, args.sweep_tokens)
        t0 = time.perf_counter()
        sweep = sensitivity_sweep(args.model, wins, "fp8", log=lambda s: print(s, file=sys.stderr, flush=True))
        sweep_file.write_text(json.dumps({"sweep_tokens": sum(len(w) - 1 for w in wins), "seconds": time.perf_counter() - t0,
                                          "corpus": args.calib_corpus or "pydoc_data.topics", "sweep": sweep}, indent=1))
        if args.part == "sweep":
            return 0
    if args.part == "report":
        data = json.loads((OUT / "accuracy.json").read_text())
        return _report([EvalResult(**r) for r in data["results"]], data["meta"], sweep_file)
    sweep = json.loads(sweep_file.read_text())["sweep"] if sweep_file.is_file() else None
    from fp8_turbo.engine.lab.recipe import parse_methods

    todo = configs(sweep, parse_methods(args.best))
    order = [c.label for c in todo]
    if args.only:
        keep = set(args.only)
        unknown = keep - set(order)
        if unknown:
            raise SystemExit(f"--only: no configuration {sorted(unknown)}; there are {order}")
        todo = [c for c in todo if c.label in keep]
    run = dict(model=args.model, tokens=args.tokens, window=args.window, calib_tokens=args.calib_tokens,
               **corpus_meta(args.corpus, args.calib_corpus))
    partial_file = OUT / "accuracy_partial.json"
    done, seconds = {}, 0.0
    if args.resume and partial_file.is_file():
        partial = json.loads(partial_file.read_text())
        if partial["run"] != run:
            raise SystemExit(f"--resume: {partial_file} holds another run ({partial['run']}), not {run}")
        done = {r["label"]: r for r in partial["results"]}
        seconds = partial["seconds"]
        todo = [c for c in todo if c.label not in done]
    t0 = time.perf_counter()

    def keep_result(r: EvalResult) -> None:
        done[r.label] = asdict(r)
        partial_file.write_text(json.dumps({"run": run, "seconds": seconds + time.perf_counter() - t0,
                                            "results": list(done.values())}, indent=1))

    results, _ = evaluate(args.model, todo, corpus=args.corpus, tokens=args.tokens, window=args.window,
                          calib_corpus=args.calib_corpus, calib_tokens=args.calib_tokens,
                          log=lambda s: __import__("tqdm").tqdm.write(s, file=sys.stderr), on_result=keep_result)
    rank = {label: i for i, label in enumerate(["none", *order])}
    results = [EvalResult(**done[label]) for label in sorted(done, key=lambda label: rank.get(label, len(rank)))]
    meta = dict(run, tokens=results[0].tokens, machine=machine, sweep_scheme="fp8",
                seconds=round(seconds + time.perf_counter() - t0, 1),
                missing=[label for label in order if label not in done])
    return _report(results, meta, sweep_file)


def _report(results, meta: dict, sweep_file: Path) -> int:
    sweep_meta = json.loads(sweep_file.read_text()) if sweep_file.is_file() else None
    meta["sweep_tokens"] = sweep_meta["sweep_tokens"] if sweep_meta else None
    meta["sweep_corpus"] = sweep_meta.get("corpus") if sweep_meta else None
    sweep = sweep_meta["sweep"] if sweep_meta else None
    (OUT / "accuracy.json").write_text(json.dumps(to_json(results, sweep, meta), indent=1))
    md = to_markdown(results, sweep, meta)
    (OUT / "accuracy.md").write_text(md)
    plot(results, sweep, OUT / "accuracy.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
