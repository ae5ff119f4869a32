"""Why calibrated FP8 weights generalize badly: each method's weight error, measured on the activations of
the calibration text and of two held-out corpora of other domains, layer by layer.

For a Linear with weight W and inputs X, a quantized weight W_q costs the output error
||X (W - W_q)^T||^2 = sum_n e_n H e_n^T with H = X^T X. The methods (engine.lab: scale `search`, `gptq`
rounding, both) choose W_q to lower that error for H of the calibration text. This script computes H for
the calibration text (at two token budgets) and for each held-out corpus from the unquantized model
(engine.lab.calibration.collect_all), quantizes every decoder Linear the default ignore list quantizes
with each method and setting (weight-only: activations are not quantized here, so the numbers isolate
the weight error the methods act on), and the data-free `mse` scale search (no text) beside them, and reports each method's output error relative to plain amax
rounding, per token, on each corpus: < 1 means better than amax. A method that fits its calibration
text is well below 1 there and near or above 1 on the held-out corpora.

Settings compared: GPTQ damping (H + damp * mean(diag H) * I), calibration tokens, and scale search with
or without clipping candidates (r < 1 clips a channel's largest weights; its alignment candidates
1 <= r < 2 do not). Writes bench/out/calibration_generalization.{json,md,png}.

    .venv/bin/python bench/calibration_generalization.py --calib-tokens 2048,8192 --heldout-tokens 4096
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8_turbo.engine.checkpoints.fp8 import shard_names  # noqa: E402
from fp8_turbo.engine.lab.accuracy import KV_OPTIONS  # noqa: E402
from fp8_turbo.engine.lab.calibration import collect_all  # noqa: E402
from fp8_turbo.engine.lab.corpora import CALIBRATION_CORPUS, HELDOUT_CORPORA, corpus_windows, named_text  # noqa: E402
from fp8_turbo.engine.lab.gptq import gptq_quantize  # noqa: E402
from fp8_turbo.engine.lab.scale_search import DEFAULT_RATIOS, search_scale  # noqa: E402
from fp8_turbo.engine.model.linear import DEFAULT_IGNORE, Linear, QuantConfig  # noqa: E402
from fp8_turbo.engine.model.schemes import SCHEMES  # noqa: E402
from fp8_turbo.kernels.fp8 import expand_scale, quantize_weight, round_to_e4m3  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def machine_name() -> str:
    """CPU model and ISA (bench/generate.py), and the instruction set our CPU kernels run."""
    from generate import machine

    from fp8_turbo.kernels import cpu

    kernels = f"our CPU kernels ({cpu.supported_isas()[cpu.selected_isa()]})" if cpu.available() else "torch reference"
    return f"{machine()}, {kernels}; shared machine"
NO_CLIP = tuple(r for r in DEFAULT_RATIOS if r >= 1.0)
SCALES = {"amax": None, "search": DEFAULT_RATIOS, "search, no clipping": NO_CLIP}  # name -> search ratios
DAMPS = (0.01, 0.1, 1.0)  # GPTQ damping tried on the amax and the searched scales


def output_error(err: torch.Tensor, h: torch.Tensor) -> float:
    """sum_n e_n H e_n^T (fp64)."""
    e = err.double()
    return ((e @ h) * e).sum().item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--calib-tokens", default="2048,8192", help="comma-separated calibration budgets")
    ap.add_argument("--heldout-tokens", type=int, default=4096, help="tokens of each held-out corpus")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--scheme", default="fp8-weight-only", help="weight layout (channel scales by default)")
    ap.add_argument("--layers", default="0,3,6,9,12,15,18,21,24,27",
                    help="comma-separated decoder block indices (default: every third; '' for all)")
    args = ap.parse_args()
    from fp8_turbo.engine.llm import LLM

    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    llm = LLM(args.model, quantization="none", **KV_OPTIONS)
    tok, net = llm.tokenizer, llm.engine.model
    budgets = [int(b) for b in args.calib_tokens.split(",")]
    corpora = {f"{CALIBRATION_CORPUS} ({b})": corpus_windows(tok, named_text(CALIBRATION_CORPUS), args.window, b)
               for b in budgets}
    corpora.update({c: corpus_windows(tok, named_text(c), args.window, args.heldout_tokens) for c in HELDOUT_CORPORA})
    stats = {}
    for name, wins in corpora.items():
        print(f"statistics of {name}: {sum(map(len, wins))} tokens", file=sys.stderr, flush=True)
        stats[name] = collect_all(llm, wins, 0, log=lambda msg: None)
    quant = QuantConfig(args.scheme, DEFAULT_IGNORE, "cpu").for_model(net.cfg.num_layers)
    spec = quant.scheme
    gran, group = SCHEMES[spec].weight, SCHEMES[spec].group
    keep = {int(i) for i in args.layers.split(",")} if args.layers else None
    linears = [m for m in net.modules() if isinstance(m, Linear) and quant.applies_to(m.name)
               and (keep is None or int(m.name.split(".")[2]) in keep)]
    tokens = {name: next(iter(s.values())).tokens for name, s in stats.items()}
    # totals[(method, calib)][corpus] = summed output error / tokens, over layers; amax under method "amax"
    totals: dict[str, dict[str, float]] = {}
    per_layer: list[dict] = []
    for j, m in enumerate(linears):
        w = m.weight.data.float()
        k = w.shape[1]
        rows = m.part_sizes if len(shard_names(m.name)) > 1 else [m.out_features]
        layer = {"layer": m.name}

        def full_scale(ratios, h) -> torch.Tensor:
            """[N, K] scale: each stored shard's own (as engine.lab.recipe.quantize_linear)."""
            parts, start = [], 0
            for r in rows:
                shard = w[start:start + r]
                s = quantize_weight(shard, gran, group)[1] if ratios is None else search_scale(shard, h, gran, ratios, group)
                parts.append(expand_scale(s, r, k).expand(r, k))
                start += r
            return torch.cat(parts)

        def score(key: str, err: torch.Tensor) -> None:
            for name, s in stats.items():
                e = output_error(err, s[m.name].hessian) / tokens[name]
                totals.setdefault(key, {}).setdefault(name, 0.0)
                totals[key][name] += e
                layer[f"{key} @ {name}"] = e

        amax = full_scale(None, None)
        score("amax", w - round_to_e4m3(w / amax) * amax)
        mse = full_scale(DEFAULT_RATIOS, None)  # data-free: the weight's own squared error (H = I)
        score("mse (no calibration)", w - round_to_e4m3(w / mse) * mse)
        for b in budgets:
            h = stats[f"{CALIBRATION_CORPUS} ({b})"][m.name].hessian
            for sname, ratios in SCALES.items():
                s = amax if ratios is None else full_scale(ratios, h)
                if ratios is not None:
                    score(f"{sname}, calibrated on {b}", w - round_to_e4m3(w / s) * s)
                if sname == "search, no clipping":
                    continue
                for damp in DAMPS:
                    q = gptq_quantize(w, h, s, damp=damp).float()
                    label = "gptq" if ratios is None else f"{sname}+gptq"
                    score(f"{label} damp {damp}, calibrated on {b}", w - q * s)
        per_layer.append(layer)
        print(f"{j + 1}/{len(linears)} {m.name} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    names = list(stats)
    ratios = {k: {n: v[n] / totals["amax"][n] for n in names} for k, v in totals.items()}
    machine = machine_name()
    lines = [f"Weight error of each calibration method relative to amax rounding (< 1: better), as output error "
             f"sum_n e_n H e_n^T per token summed over {len(linears)} Linears of `{args.model}` ({spec}); H from the "
             f"unquantized model on each corpus. Held-out: {args.heldout_tokens} tokens each; {machine}; "
             f"{time.perf_counter() - t0:.0f} s.", "",
             "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k, v in ratios.items():
        lines.append(f"| {k} | " + " | ".join(f"{v[n]:.3f}" for n in names) + " |")
    md = "\n".join(lines) + "\n"
    (OUT / "calibration_generalization.md").write_text(md)
    (OUT / "calibration_generalization.json").write_text(json.dumps(
        {"meta": {"model": args.model, "scheme": spec, "tokens": tokens, "machine": machine,
                  "seconds": time.perf_counter() - t0}, "ratios": ratios, "totals": totals, "layers": per_layer},
        indent=1))
    _plot(ratios, names, OUT / "calibration_generalization.png")
    print(md)
    return 0


def _plot(ratios: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ratios if k != "amax"]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(keys) + 2))
    height = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.barh([y + i * height for y in range(len(keys))], [ratios[k][n] for k in keys], height, label=n)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks([y + 0.4 - height / 2 for y in range(len(keys))], keys, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output error / amax's (weight-only), per corpus")
    ax.set_title("Calibrated FP8 weights on calibration vs held-out activations")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
