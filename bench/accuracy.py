"""FP8 accuracy of every scheme (finer weight scales included) and of calibrated configurations on
SmolLM2-135M-Instruct (or --model), calibrated on one corpus and scored on two held-out corpora of other
domains, each on its own (engine.lab.corpora: Python's docs; stdlib docstrings and license texts).

Writes bench/out/accuracy.{json,md,png}: per corpus, perplexity, KL(base || quant) mean and p99, top-1
agreement, llama.cpp's "same top token", per-layer SQNR and linear-weight bytes (scales included) per
configuration, a summary across corpora, the one-layer-at-a-time sensitivity sweep (on calibration
text, when bench/out/accuracy_sweep.json exists), and a chart of bytes vs KL per corpus with its Pareto
front. `--part sweep` runs only the sweep; `--part eval` reads it for the byte-budget rows; `--part
report` rebuilds md/png from the JSON files. CPU path (our kernels). Each finished (configuration,
corpus) is appended to bench/out/accuracy_partial.json at once; `--resume` skips those found there (same
tokens, window and corpora), so a long run can be taken in parts.

    .venv/bin/python bench/accuracy.py --tokens 3072 --calib-tokens 8192
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8_turbo.engine.lab.accuracy import DEFAULT_SCHEMES, EvalConfig, EvalResult, corpus_meta, evaluate  # noqa: E402
from fp8_turbo.engine.lab.budget import budget_ignore  # noqa: E402
from fp8_turbo.engine.lab.corpora import HELDOUT_CORPORA, corpus_text, corpus_windows  # noqa: E402
from fp8_turbo.engine.lab.recipe import METHODS, method_label  # noqa: E402
from fp8_turbo.engine.lab.report import plot, to_json, to_markdown  # noqa: E402
from fp8_turbo.engine.model.linear import DEFAULT_IGNORE  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def machine_name() -> str:
    """CPU model and ISA (bench/generate.py), and the instruction set our CPU kernels run."""
    from generate import machine

    from fp8_turbo.kernels import cpu

    if not cpu.available():
        return f"{machine()}, torch reference; shared machine"
    return f"{machine()}, our CPU kernels ({cpu.supported_isas()[cpu.selected_isa()]}); shared machine"


# Every non-empty combination of the methods, in their canonical order.
COMBINATIONS = [tuple(m for i, m in enumerate(METHODS) if mask >> i & 1) for mask in range(1, 1 << len(METHODS))]
BUDGET_OVER_DEFAULT = 0.05  # the goal: at most 5% more linear-weight bytes than today's default


# amax rows: today's schemes, then the finer weight scales (per-group 1 x g fp32, MXFP8 1 x 32 E8M0)
AMAX_SCHEMES = ("fp8-w8a8", "fp8-weight-only", "fp8-block",
                "fp8-weight-only-g128", "fp8-weight-only-g64", "fp8-weight-only-g32", "fp8-weight-only-mx",
                "fp8-w8a8-g128", "fp8-w8a8-g32", "fp8-w8a8-mx")


def configs(sweep: list[dict] | None, best: tuple[str, ...]) -> list[EvalConfig]:
    """Amax rows, data-free `mse` scale search rows, then calibrated rows (sharing one statistics pass of
    the unquantized model: sequential=False): the previous `fp8-turbo quantize` default (W8A8
    search+gptq, damping 0.01), the methods on weight-only FP8 (the CPU's fp8) with that damping and
    with 0.1; `--all-methods` adds every method combination on W8A8."""
    out = [EvalConfig(s, s, DEFAULT_IGNORE) for s in AMAX_SCHEMES]
    # data-free scale search (no calibration text): what the default could do at load time
    out += [EvalConfig(f"{s} mse", s, DEFAULT_IGNORE, ("mse",)) for s in ("fp8-weight-only", "fp8-weight-only-g32",
                                                                          "fp8-w8a8")]
    out += [EvalConfig("fp8-w8a8 search+gptq", "fp8-w8a8", DEFAULT_IGNORE, ("search", "gptq"), sequential=False,
                       damp=0.01)]
    for m in (("search",), ("gptq",), ("search", "gptq")):
        for damp in (0.01, 0.1):
            out.append(EvalConfig(f"fp8-weight-only {method_label(m)}{'' if m == ('search',) else f' damp {damp}'}",
                                  "fp8-weight-only", DEFAULT_IGNORE, m, sequential=False, damp=damp))
    out = list({c.label: c for c in out}.values())  # search alone has no damping: once
    if best:
        out += [EvalConfig(f"fp8-w8a8 {method_label(m)}", "fp8-w8a8", DEFAULT_IGNORE, m, sequential=False)
                for m in sorted(COMBINATIONS, key=lambda m: (len(m), METHODS.index(m[0])))
                if f"fp8-w8a8 {method_label(m)}" not in {c.label for c in out}]
    if sweep:
        fp8_bytes = sum(r["params"] for r in sweep)  # all decoder Linears in FP8, 1 byte each
        last = max(int(r["layer"].split(".")[2]) for r in sweep)
        today = sum(r["params"] for r in sweep if r["layer"].startswith(f"model.layers.{last}.mlp."))
        extra = (fp8_bytes + today) * (1 + BUDGET_OVER_DEFAULT) - fp8_bytes  # hp bytes at +5% over today
        ignore = budget_ignore(sweep, extra)
        out += [EvalConfig("fp8-w8a8, budget +5%", "fp8-w8a8", ignore),
                EvalConfig("fp8-weight-only, budget +5%", "fp8-weight-only", ignore)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--corpora", default=",".join(HELDOUT_CORPORA),
                    help="comma-separated held-out corpora (names or text files), each scored on its own")
    ap.add_argument("--calib-corpus", default=None, help="calibration text file (default: pydoc_data.topics)")
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored, per corpus")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens for the methods")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--sweep-tokens", type=int, default=512, help="calibration tokens for the sensitivity sweep")
    ap.add_argument("--all-methods", action="store_true", help="also every method combination on fp8-w8a8")
    ap.add_argument("--only", action="append", default=None, metavar="LABEL",
                    help="run this configuration (repeat for several; labels may hold commas); default: all")
    ap.add_argument("--part", choices=("all", "eval", "sweep", "report"), default="all")
    ap.add_argument("--resume", action="store_true", help="skip configurations in bench/out/accuracy_partial.json")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    machine = machine_name()
    sweep_file = OUT / "accuracy_sweep.json"
    if args.part in ("all", "sweep"):
        from fp8_turbo.engine.lab.sensitivity import sensitivity_sweep
        from fp8_turbo.engine.llm import LLM

        tok = LLM(args.model, device="cpu", kv_cache_memory_bytes=16 << 20).tokenizer
        wins = corpus_windows(tok, corpus_text(args.calib_corpus), args.sweep_tokens, args.sweep_tokens)
        t0 = time.perf_counter()
        sweep = sensitivity_sweep(args.model, wins, "fp8-w8a8", log=lambda s: print(s, file=sys.stderr, flush=True))
        sweep_file.write_text(json.dumps({"sweep_tokens": sum(len(w) - 1 for w in wins), "seconds": time.perf_counter() - t0,
                                          "corpus": args.calib_corpus or "pydoc_data.topics", "sweep": sweep}, indent=1))
        if args.part == "sweep":
            return 0
    if args.part == "report":
        data = json.loads((OUT / "accuracy.json").read_text())
        return _report([EvalResult(**r) for r in data["results"]], data["meta"], sweep_file)
    sweep = json.loads(sweep_file.read_text())["sweep"] if sweep_file.is_file() else None

    todo = configs(sweep, args.all_methods)
    order = [c.label for c in todo]
    if args.only:
        keep = set(args.only)
        unknown = keep - set(order)
        if unknown:
            raise SystemExit(f"--only: no configuration {sorted(unknown)}; there are {order}")
        todo = [c for c in todo if c.label in keep]
    corpora = [c for c in args.corpora.split(",") if c]
    run = dict(model=args.model, tokens=args.tokens, window=args.window, calib_tokens=args.calib_tokens,
               **corpus_meta(None, args.calib_corpus, corpora))
    partial_file = OUT / "accuracy_partial.json"
    done, seconds = {}, 0.0
    if args.resume and partial_file.is_file():
        partial = json.loads(partial_file.read_text())
        if partial["run"] != run:
            raise SystemExit(f"--resume: {partial_file} holds another run ({partial['run']}), not {run}")
        done = {(r["label"], r["corpus"]): r for r in partial["results"]}
        seconds = partial["seconds"]
        todo = [c for c in todo if any((c.label, k) not in done for k in corpora)]
    t0 = time.perf_counter()

    def keep_result(r: EvalResult) -> None:
        done[(r.label, r.corpus)] = asdict(r)
        partial_file.write_text(json.dumps({"run": run, "seconds": seconds + time.perf_counter() - t0,
                                            "results": list(done.values())}, indent=1))

    if todo:
        evaluate(args.model, todo, corpora=corpora, tokens=args.tokens, window=args.window,
                 calib_corpus=args.calib_corpus, calib_tokens=args.calib_tokens,
                 log=lambda s: __import__("tqdm").tqdm.write(s, file=sys.stderr), on_result=keep_result)
    rank = {label: i for i, label in enumerate(["none", *order])}
    keys = sorted(done, key=lambda key: (rank.get(key[0], len(rank)), corpora.index(key[1]) if key[1] in corpora else 0))
    results = [EvalResult(**done[key]) for key in keys]
    meta = dict(run, tokens=results[0].tokens, machine=machine, sweep_scheme="fp8-w8a8",
                seconds=round(seconds + time.perf_counter() - t0, 1),
                missing=[label for label in order if any((label, k) not in done for k in corpora)])
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
