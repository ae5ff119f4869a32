"""The accuracy report: JSON, markdown tables (one per scored corpus, and a summary across them), and a
chart (linear-weight bytes against KL on each corpus with its Pareto front, beside the most sensitive
layers of the sweep)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fp8_turbo.engine.lab.accuracy import EvalResult


def to_json(results: list[EvalResult], sweep: list[dict] | None, meta: dict) -> dict:
    return {"meta": meta, "results": [asdict(r) for r in results], "sweep": sweep or []}


def by_corpus(results: list[EvalResult]) -> dict[str, list[EvalResult]]:
    """Results grouped by scored corpus, in first-seen order (configs keep their order)."""
    out: dict[str, list[EvalResult]] = {}
    for r in results:
        out.setdefault(r.corpus, []).append(r)
    return out


def _worst_layer(r: EvalResult) -> str:
    if not r.sqnr_db:
        return "-"
    name, db = min(r.sqnr_db.items(), key=lambda kv: kv[1])
    return f"{db:.1f} ({name.replace('model.layers.', 'L')})"


def _table(results: list[EvalResult]) -> list[str]:
    lines = ["| config | methods | ppl | Δppl % | KL mean | KL p99 | top-1 agree | same top (llama.cpp) "
             "| min SQNR dB (layer) | bf16 linear MB | linear MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        lines.append(f"| {r.label} | {'+'.join(r.methods) or '-'} | {r.ppl:.3f} | {r.ppl_delta_pct:+.2f} | {r.kl:.4f} "
                     f"| {r.kl_p99:.4f} | {100 * r.top1:.2f}% | {100 * r.same_top:.2f} ± {100 * r.same_top_se:.2f}% "
                     f"| {_worst_layer(r)} | {r.hp_linear_bytes / 1e6:.1f} | {r.linear_bytes / 1e6:.2f} |")
    return lines


def _summary(groups: dict[str, list[EvalResult]]) -> list[str]:
    """One row per config: Δppl / KL / top-1 on every corpus side by side."""
    names = list(groups)
    head = "| config | linear MB | " + " | ".join(f"Δppl % / KL / top-1 ({n})" for n in names) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(names)]
    labels = list(dict.fromkeys(r.label for rs in groups.values() for r in rs))
    for label in labels:
        cells, mb = [], ""
        for n in names:
            r = next((r for r in groups[n] if r.label == label), None)
            cells.append("-" if r is None else f"{r.ppl_delta_pct:+.2f} / {r.kl:.4f} / {100 * r.top1:.1f}%")
            mb = mb or (f"{r.linear_bytes / 1e6:.2f}" if r is not None else "")
        lines.append(f"| {label} | {mb} | " + " | ".join(cells) + " |")
    return lines


def to_markdown(results: list[EvalResult], sweep: list[dict] | None, meta: dict, top: int = 12) -> str:
    calib = f", methods calibrated on {meta['calib_corpus']}" if meta.get("calib_corpus") else ""
    groups = by_corpus(results)
    tokens = ", ".join(f"{rs[0].tokens} on {n or meta.get('corpus', '?')}" for n, rs in groups.items())
    lines = [f"Model `{meta['model']}`, predicted tokens scored: {tokens} (windows of {meta['window']}){calib}; "
             f"{meta.get('machine', '')}", ""]
    if len(groups) > 1:
        lines += ["Summary (each corpus against the unquantized model on the same corpus):", "", *_summary(groups), ""]
    for name, rs in groups.items():
        if len(groups) > 1:
            lines += [f"Scored on {name}:", ""]
        lines += [*_table(rs), ""]
    if meta.get("missing"):
        lines += [f"Not measured in this run: {', '.join(meta['missing'])}.", ""]
    if sweep:
        lines += [f"Sensitivity sweep ({meta.get('sweep_scheme', 'fp8')}, one layer quantized at a time, "
                  f"{meta.get('sweep_tokens')} tokens of {meta.get('sweep_corpus', 'the calibration corpus')}): "
                  f"top {top}", "",
                  "| rank | layer | KL(base‖q) | top-1 agree | Δnll/token |", "|---:|---|---:|---:|---:|"]
        for i, r in enumerate(sweep[:top]):
            lines.append(f"| {i + 1} | {r['layer']} | {r['kl']:.5f} | {100 * r['top1']:.2f}% | {r['nll_delta']:+.5f} |")
    return "\n".join(lines).rstrip("\n") + "\n"


def pareto_front(results: list[EvalResult]) -> list[EvalResult]:
    """Configurations no other one beats on both linear bytes and KL, by increasing bytes."""
    q = sorted((r for r in results if r.label != "none"), key=lambda r: (r.linear_bytes, r.kl))
    front, best = [], float("inf")
    for r in q:
        if r.kl < best:
            front.append(r)
            best = r.kl
    return front


def plot(results: list[EvalResult], sweep: list[dict] | None, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_corpus(results)
    panels = len(groups) + bool(sweep)
    fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 5.5), squeeze=False)
    for ax, (name, rs) in zip(axes[0], groups.items()):
        q = [r for r in rs if r.label != "none"]
        for r in q:
            ax.scatter(r.linear_bytes / 1e6, r.kl, color="tab:red" if r.methods else "tab:blue", zorder=3)
            ax.annotate(r.label, (r.linear_bytes / 1e6, r.kl), fontsize=6, xytext=(4, 2), textcoords="offset points")
        front = pareto_front(rs)
        ax.plot([r.linear_bytes / 1e6 for r in front], [r.kl for r in front], "--", color="gray", zorder=2,
                label="Pareto front")
        ax.scatter([], [], color="tab:blue", label="amax scaling")
        ax.scatter([], [], color="tab:red", label="calibrated")
        ax.set_xlabel("decoder linear weights + scales (MB; FP8 1 byte, bf16 2 bytes)")
        ax.set_ylabel("mean KL(base || quant) per token")
        ax.set_yscale("log")
        ax.set_title(f"bytes vs KL, held out: {name or 'scored text'}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    if sweep:
        ax = axes[0][-1]
        top = sweep[:20]
        ax.barh([r["layer"].replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "") for r in top][::-1],
                [r["kl"] for r in top][::-1], color="tab:orange")
        ax.set_xlabel("KL(base || quant) with only this layer quantized")
        ax.set_title("Most sensitive layers (calibration text)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
