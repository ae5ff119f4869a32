"""The accuracy report: JSON, a markdown table, and a chart (the Pareto front of linear-weight bytes
against KL, beside the most sensitive layers of the sweep)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fp8_turbo.engine.lab.accuracy import EvalResult


def to_json(results: list[EvalResult], sweep: list[dict] | None, meta: dict) -> dict:
    return {"meta": meta, "results": [asdict(r) for r in results], "sweep": sweep or []}


def _worst_layer(r: EvalResult) -> str:
    if not r.sqnr_db:
        return "-"
    name, db = min(r.sqnr_db.items(), key=lambda kv: kv[1])
    return f"{db:.1f} ({name.replace('model.layers.', 'L')})"


def to_markdown(results: list[EvalResult], sweep: list[dict] | None, meta: dict, top: int = 12) -> str:
    calib = f", methods calibrated on {meta['calib_corpus']}" if meta.get("calib_corpus") else ""
    lines = [f"Model `{meta['model']}`, scored on {meta['corpus']} ({meta['tokens']} predicted tokens in windows of "
             f"{meta['window']}){calib}; {meta.get('machine', '')}", "",
             "| config | methods | ppl | Δppl % | KL mean | KL p99 | top-1 agree | same top (llama.cpp) "
             "| min SQNR dB (layer) | bf16 linear MB | linear MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        lines.append(f"| {r.label} | {'+'.join(r.methods) or '-'} | {r.ppl:.3f} | {r.ppl_delta_pct:+.2f} | {r.kl:.4f} "
                     f"| {r.kl_p99:.4f} | {100 * r.top1:.2f}% | {100 * r.same_top:.2f} ± {100 * r.same_top_se:.2f}% "
                     f"| {_worst_layer(r)} | {r.hp_linear_bytes / 1e6:.1f} | {r.linear_bytes / 1e6:.1f} |")
    if meta.get("missing"):
        lines += ["", f"Not measured in this run: {', '.join(meta['missing'])}."]
    if sweep:
        lines += ["", f"Sensitivity sweep ({meta.get('sweep_scheme', 'fp8')}, one layer quantized at a time, "
                  f"{meta.get('sweep_tokens')} tokens of {meta.get('sweep_corpus', 'the calibration corpus')}): "
                  f"top {top}", "",
                  "| rank | layer | KL(base‖q) | top-1 agree | Δnll/token |", "|---:|---|---:|---:|---:|"]
        for i, r in enumerate(sweep[:top]):
            lines.append(f"| {i + 1} | {r['layer']} | {r['kl']:.5f} | {100 * r['top1']:.2f}% | {r['nll_delta']:+.5f} |")
    return "\n".join(lines) + "\n"


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

    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(14 if sweep else 8, 5.5), squeeze=False)
    ax = axes[0][0]
    q = [r for r in results if r.label != "none"]
    for r in q:
        ax.scatter(r.linear_bytes / 1e6, r.kl, color="tab:red" if r.methods else "tab:blue", zorder=3)
        ax.annotate(r.label, (r.linear_bytes / 1e6, r.kl), fontsize=7, xytext=(4, 2), textcoords="offset points")
    front = pareto_front(results)
    ax.plot([r.linear_bytes / 1e6 for r in front], [r.kl for r in front], "--", color="gray", zorder=2,
            label="Pareto front")
    ax.scatter([], [], color="tab:blue", label="amax scaling")
    ax.scatter([], [], color="tab:red", label="calibrated")
    ax.set_xlabel("decoder linear weights (MB; FP8 1 byte, bf16 2 bytes)")
    ax.set_ylabel("mean KL(base || quant) per token, held-out text")
    ax.set_title("FP8 configurations: bytes vs KL")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if sweep:
        ax = axes[0][1]
        top = sweep[:20]
        ax.barh([r["layer"].replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "") for r in top][::-1],
                [r["kl"] for r in top][::-1], color="tab:orange")
        ax.set_xlabel("KL(base || quant) with only this layer quantized")
        ax.set_title("Most sensitive layers (calibration text)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
