"""Per-layer precision under a byte budget: which decoder Linears stay in high precision.

Input: the sensitivity sweep (engine.lab.sensitivity: the KL each layer causes when it alone is
quantized) and a budget of extra bytes. A layer kept in bf16 costs one more byte per weight than
FP8 and removes (to first order: per-layer KLs roughly add up) its KL. Choosing the set is a 0/1
knapsack; greedy by KL removed per byte, then the best single layer if it alone beats that set, is
within a factor 2 of the optimum and exact whenever the budget is spent on whole layers in ratio order.
Today's default ignore list (the last block's MLP, 2.5% of SmolLM2's FP8 bytes) is one point of the
curve this traces: `choose_high_precision(sweep, extra_bytes)` for growing budgets.

Block scales are not among the choices: they cost the same bytes as per-channel scales (a scale per
128x128 block instead of per row), and a checkpoint mixing weight layouts needs more than the one
compressed-tensors config group the loader reads.
"""
from __future__ import annotations

HP_EXTRA_BYTES_PER_WEIGHT = 1  # bf16 (2 bytes) instead of e4m3 (1 byte)


def choose_high_precision(sweep: list[dict], extra_bytes: float) -> list[str]:
    """Layer names to keep in bf16 so that their extra bytes stay within `extra_bytes`, maximizing the
    summed sweep KL they remove. `sweep` rows: {"layer", "kl", "params"}. Sorted by decreasing KL."""
    if extra_bytes < 0:
        raise ValueError(f"extra_bytes must be >= 0, got {extra_bytes}")
    rows = [r for r in sweep if r["kl"] > 0]
    cost = {r["layer"]: r["params"] * HP_EXTRA_BYTES_PER_WEIGHT for r in rows}
    chosen, spent = [], 0
    for r in sorted(rows, key=lambda r: -r["kl"] / cost[r["layer"]]):
        if spent + cost[r["layer"]] <= extra_bytes:
            chosen.append(r)
            spent += cost[r["layer"]]
    fitting = [r for r in rows if cost[r["layer"]] <= extra_bytes]
    best_single = max(fitting, key=lambda r: r["kl"], default=None)
    if best_single is not None and best_single["kl"] > sum(r["kl"] for r in chosen):
        chosen = [best_single]
    return [r["layer"] for r in sorted(chosen, key=lambda r: -r["kl"])]


def budget_ignore(sweep: list[dict], extra_bytes: float, keep: tuple[str, ...] = ("lm_head",)) -> tuple[str, ...]:
    """An ignore list (for QuantConfig / Recipe / `LLM(quantization_ignore=...)`): `keep` plus the
    layers `choose_high_precision` picks."""
    return (*keep, *choose_high_precision(sweep, extra_bytes))
