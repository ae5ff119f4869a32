"""`fp8-turbo quantize` (write a compressed-tensors FP8 checkpoint) and `fp8-turbo eval` (accuracy report).

engine/serving/cli.py registers them with `add_commands(sub)`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.lab.accuracy import DEFAULT_SCHEMES
from engine.model.linear import DEFAULT_IGNORE
from engine.checkpoints.source import DEFAULT_MODEL


EVAL_SCHEMES = ("none", *DEFAULT_SCHEMES)


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


def cmd_quantize(args) -> int:
    from engine.checkpoints.fp8 import save_quantized

    input_scales = None
    if args.static_activations:
        from engine.lab.accuracy import calibrate_input_scales

        input_scales = calibrate_input_scales(args.model, args.calibration_tokens)
    out = save_quantized(args.model, args.out, args.scheme, (*DEFAULT_IGNORE, *_patterns(args.ignore)), input_scales)
    print(f"wrote {args.scheme} checkpoint to {out}")
    return 0


def cmd_eval(args) -> int:
    from engine.lab.accuracy import evaluate, plot, sensitivity_sweep, to_json, to_markdown

    configs = [(s, s, (*DEFAULT_IGNORE, *_patterns(args.ignore))) for s in args.schemes if s != "none"]
    results, windows = evaluate(args.model, configs, corpus=args.corpus, tokens=args.tokens, window=args.window,
                                log=lambda s: print(s, file=sys.stderr))
    sweep = None
    if args.sweep_tokens:
        sweep = sensitivity_sweep(args.model, [windows[0][:args.sweep_tokens]], args.sweep_scheme,
                                  log=lambda s: print(s, file=sys.stderr))
    meta = dict(model=args.model, corpus=args.corpus or "pydoc_data.topics", tokens=results[0].tokens,
                window=args.window, sweep_scheme=args.sweep_scheme,
                sweep_tokens=min(args.sweep_tokens, len(windows[0])) - 1 if sweep else None)
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
    p = sub.add_parser("quantize", help="write a compressed-tensors FP8 checkpoint (vLLM layout)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF checkpoint dir, .gguf file or model id")
    p.add_argument("--scheme", default="fp8", choices=DEFAULT_SCHEMES)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ignore", default=None, help="comma-separated module patterns kept in high precision "
                                                  "(lm_head always is)")
    p.add_argument("--static-activations", action="store_true",
                   help="fp8-tensor only: calibrate static input scales on the default corpus")
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="accuracy of FP8 schemes vs the unquantized model (ppl, KL, top-1, SQNR)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--schemes", nargs="+", action=_SchemeList, default=list(DEFAULT_SCHEMES),
                   help=f"schemes to compare with the unquantized model, space- or comma-separated "
                        f"(default: {','.join(DEFAULT_SCHEMES)}; 'none' is always the baseline)")
    p.add_argument("--corpus", default=None, help="text file (default: Python's pydoc_data.topics)")
    p.add_argument("--tokens", type=int, default=4096, help="corpus tokens to evaluate")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--ignore", default=None, help="comma-separated patterns kept in high precision")
    p.add_argument("--sweep-tokens", type=int, default=0, help="run the one-layer sensitivity sweep on this many tokens")
    p.add_argument("--sweep-scheme", default="fp8", choices=DEFAULT_SCHEMES)
    p.add_argument("--out", default=None, help="directory for accuracy.json/.md/.png")
    p.set_defaults(func=cmd_eval)
