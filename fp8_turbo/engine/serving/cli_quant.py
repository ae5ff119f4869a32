"""`fp8-turbo quantize` (write a compressed-tensors FP8 checkpoint, optionally calibrated) and
`fp8-turbo eval` (accuracy report on held-out text).

fp8_turbo/engine/serving/cli.py registers them with `add_commands(sub)`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fp8_turbo.engine.checkpoints.source import DEFAULT_MODEL
from fp8_turbo.engine.lab.accuracy import DEFAULT_SCHEMES
from fp8_turbo.engine.lab.corpora import HELDOUT_CORPORA
from fp8_turbo.engine.lab.recipe import DEFAULT_CALIBRATION_TOKENS, DEFAULT_METHODS, METHODS, method_label, parse_methods
from fp8_turbo.engine.model.linear import DEFAULT_IGNORE, QUANT_SCHEMES


EVAL_SCHEMES = ("none", *QUANT_SCHEMES[1:])
WRITABLE_SCHEMES = ("fp8", "fp8-w8a8", "fp8-tensor", "fp8-block", "fp8-weight-only")  # checkpoints.fp8.CT_STRATEGIES


def _patterns(text: str | None) -> tuple[str, ...]:
    return tuple(p for p in (text or "").split(",") if p)


class _SchemeList(argparse.Action):
    """`--schemes none fp8 fp8-block` or `--schemes none,fp8,fp8-block` (or a mix): one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        schemes = [s for value in values for s in value.split(",") if s]
        bad = [s for s in schemes if s not in EVAL_SCHEMES]
        if bad or not schemes:
            parser.error(f"argument --schemes: {', '.join(bad) or 'nothing'} given; "
                         f"choose from {', '.join(EVAL_SCHEMES)} (space- or comma-separated)")
        setattr(namespace, self.dest, schemes)


def _methods_list(text: str) -> list[tuple[str, ...]]:
    try:
        return [parse_methods(t) for t in text.split(",") if t]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _method(text: str) -> tuple[str, ...]:
    try:
        return parse_methods(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _budget_ignore(model: str, windows: list[list[int]], pct: float, scheme: str) -> tuple[str, ...]:
    """lm_head + the layers the sensitivity sweep on calibration text picks for `pct`% extra bytes."""
    from fp8_turbo.engine.lab.budget import budget_ignore
    from fp8_turbo.engine.lab.sensitivity import sensitivity_sweep

    sweep = sensitivity_sweep(model, windows[:1], scheme, log=_stderr)
    fp8_bytes = sum(r["params"] for r in sweep)
    return budget_ignore(sweep, pct / 100 * fp8_bytes)


def quantize_methods(args) -> tuple[str, ...]:
    """`--method`, or by default DEFAULT_METHODS (none with --static-activations, which calibrates
    activation scales instead)."""
    if args.method is not None:
        return args.method
    return () if args.static_activations else DEFAULT_METHODS


def cmd_quantize(args) -> int:
    from fp8_turbo.engine.checkpoints.fp8 import save_quantized
    from fp8_turbo.engine.model.schemes import FP8_ALIAS, fp8_scheme

    if args.scheme == FP8_ALIAS:  # a checkpoint names one scheme: the one "fp8" means on this machine
        args.scheme, why = fp8_scheme()
        _stderr(f"--scheme fp8 -> {args.scheme} ({why}); pass --scheme fp8-w8a8 for a W8A8 checkpoint")
    ignore = (*DEFAULT_IGNORE, *_patterns(args.ignore))
    methods = quantize_methods(args)
    if methods or args.budget_pct is not None:
        return _quantize_calibrated(args, ignore, methods)
    input_scales = None
    if args.static_activations:
        from fp8_turbo.engine.lab.calibration import calibrate_input_scales

        input_scales = calibrate_input_scales(args.model, args.calibration_tokens, corpus=args.calibrate)
    out = save_quantized(args.model, args.out, args.scheme, ignore, input_scales)
    print(f"wrote {args.scheme} checkpoint to {out}")
    return 0


def _quantize_calibrated(args, ignore: tuple[str, ...], methods: tuple[str, ...]) -> int:
    from fp8_turbo.engine.checkpoints.fp8 import save_quantized
    from fp8_turbo.engine.lab.accuracy import KV_OPTIONS
    from fp8_turbo.engine.lab.corpora import CALIBRATION_CORPUS, corpus_text, corpus_windows
    from fp8_turbo.engine.lab.recipe import Recipe, calibrate
    from fp8_turbo.engine.llm import LLM

    if args.static_activations:
        raise SystemExit("--static-activations and --method/--budget-pct do not combine (yet)")
    llm = LLM(args.model, quantization="none", **KV_OPTIONS)
    windows = corpus_windows(llm.tokenizer, corpus_text(args.calibrate), args.window, args.calibration_tokens)
    corpus = args.calibrate or CALIBRATION_CORPUS
    if args.budget_pct is not None:
        ignore = (*_budget_ignore(args.model, windows, args.budget_pct, args.scheme), *_patterns(args.ignore))
        _stderr(f"budget {args.budget_pct}%: high precision for {', '.join(ignore)}")
    recipe = Recipe(args.scheme, ignore, methods)
    result = calibrate(llm, windows, recipe, log=_stderr)
    meta = {"scheme": recipe.scheme, "methods": recipe.label, "ignore": list(recipe.ignore), "calibration": corpus,
            "calibration_tokens": result.tokens,
            "alphas": {k: v for k, v in result.alphas.items() if v is not None}}
    out = save_quantized(args.model, args.out, recipe.scheme, recipe.ignore, weights=result.hf_weights(),
                         hp_tensors=result.hp_tensors, recipe=meta)
    print(f"wrote {args.scheme} checkpoint ({recipe.label}, calibrated on {result.tokens} tokens of {corpus} "
          f"in {result.seconds:.0f}s) to {out}")
    return 0


def cmd_eval(args) -> int:
    from fp8_turbo.engine.lab.accuracy import EvalConfig, corpus_meta, evaluate
    from fp8_turbo.engine.lab.corpora import corpus_text, corpus_windows
    from fp8_turbo.engine.lab.report import plot, to_json, to_markdown

    ignore = (*DEFAULT_IGNORE, *_patterns(args.ignore))
    configs = [EvalConfig(s if not m else f"{s} {method_label(m)}", s, ignore, m)
               for s in args.schemes if s != "none" for m in args.methods]
    corpora = [args.corpus] if args.corpus else _patterns(args.corpora)
    results, _ = evaluate(args.model, configs, corpora=corpora, tokens=args.tokens, window=args.window,
                          calib_corpus=args.calib_corpus, calib_tokens=args.calib_tokens,
                          log=lambda s: __import__("tqdm").tqdm.write(s, file=sys.stderr))
    sweep = None
    meta = dict(model=args.model, tokens=results[0].tokens, window=args.window, sweep_scheme=args.sweep_scheme,
                **corpus_meta(None, args.calib_corpus, corpora))
    if args.sweep_tokens:
        from fp8_turbo.engine.lab.sensitivity import sensitivity_sweep
        from fp8_turbo.engine.llm import LLM

        tok = LLM(args.model, quantization="none", device="cpu", kv_cache_memory_bytes=16 << 20).tokenizer
        wins = corpus_windows(tok, corpus_text(args.calib_corpus), args.sweep_tokens, args.sweep_tokens)
        sweep = sensitivity_sweep(args.model, wins, args.sweep_scheme, log=_stderr)
        meta["sweep_tokens"] = sum(len(w) - 1 for w in wins)
    md = to_markdown(results, sweep, meta)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "accuracy.json").write_text(json.dumps(to_json(results, sweep, meta), indent=1))
        (out / "accuracy.md").write_text(md)
        plot(results, sweep, out / "accuracy.png")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    methods_help = f"'none' or a '+'-joined combination of {', '.join(METHODS)}"
    p = sub.add_parser("quantize", help="write a compressed-tensors FP8 checkpoint (vLLM layout), optionally calibrated")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF checkpoint dir, .gguf file or model id")
    p.add_argument("--scheme", default="fp8", choices=WRITABLE_SCHEMES,
                   help="what to write (default fp8: the scheme fp8 means on this machine, see `fp8_scheme`)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ignore", default=None, help="comma-separated module patterns kept in high precision "
                                                  "(lm_head always is)")
    p.add_argument("--method", type=_method, default=None,
                   help=f"calibration methods: {methods_help}; default {method_label(DEFAULT_METHODS)}: the best "
                        "measured on held-out text of other domains (bench/ACCURACY.md, Calibration: gptq fits its "
                        "calibration text, search barely does); 'none' writes amax scales without calibration text")
    p.add_argument("--calibrate", default=None, metavar="FILE",
                   help="calibration text file (default: Python's pydoc_data.topics)")
    p.add_argument("--calibration-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS,
                   help=f"calibration tokens (default {DEFAULT_CALIBRATION_TOKENS}: fewer over-fit gptq's Hessians)")
    p.add_argument("--window", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--budget-pct", type=float, default=None,
                   help="keep in bf16 the layers a sensitivity sweep on the calibration text ranks highest, for "
                        "this many extra bytes (%% of the all-FP8 linear weights); replaces the default ignore list")
    p.add_argument("--static-activations", action="store_true",
                   help="fp8-tensor only: calibrate static input scales on the calibration text")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="accuracy of FP8 configurations vs the unquantized model on held-out text "
                                    "(ppl, KL mean/p99, top-1, same top token, SQNR)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--schemes", nargs="+", action=_SchemeList, default=list(DEFAULT_SCHEMES),
                   help=f"schemes to compare with the unquantized model, space- or comma-separated "
                        f"(default: {','.join(DEFAULT_SCHEMES)}; 'none' is always the baseline)")
    p.add_argument("--methods", type=_methods_list, default=[()],
                   help=f"comma-separated calibration methods per scheme, each {methods_help} (default none)")
    p.add_argument("--corpora", default=",".join(HELDOUT_CORPORA),
                   help="comma-separated held-out corpora to score on, each on its own: names "
                        f"({', '.join(HELDOUT_CORPORA)}) or text files (default: both)")
    p.add_argument("--corpus", default=None, help="one scoring text file instead of --corpora")
    p.add_argument("--calib-corpus", default=None, help="calibration text file (default: pydoc_data.topics)")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score, per corpus")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens for methods")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--ignore", default=None, help="comma-separated patterns kept in high precision")
    p.add_argument("--sweep-tokens", type=int, default=0,
                   help="run the one-layer sensitivity sweep on this many calibration tokens")
    p.add_argument("--sweep-scheme", default="fp8", choices=QUANT_SCHEMES[1:])
    p.add_argument("--out", default=None, help="directory for accuracy.json/.md/.png")
    p.set_defaults(func=cmd_eval)
