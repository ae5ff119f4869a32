"""What the served model computes in, read off the loaded model (not the scheme that was asked for).

`served_scheme(engine)` goes into the model card of /v1/models (and so under each answer of the chat
page): the scheme the linear layers run, as each `Linear` decides it at its forward (its weight and
activation granularities), so a scheme name that resolves differently on some hardware (say `fp8` as
weight-only on the CPU) is reported as what runs, with the KV-cache and compute dtypes beside it.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from fp8_turbo.engine.core.llm_engine import LLMEngine
from fp8_turbo.engine.model.linear import Linear


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _how(layer: Linear, compute: str) -> tuple[str, str, str]:
    """(scheme, weights, activations) of one linear layer, e.g. ("fp8", "e4m3 per channel", "e4m3 per token")."""
    if layer.scheme == "none":
        weight = layer.weight
        return "none", _dtype_name(weight.dtype) if weight is not None else compute, compute
    spec = layer.spec
    weights = f"e4m3 per {layer.weight_granularity}"
    if spec.weight in ("group", "mx"):  # finer scales: their K extent, and MXFP8's power-of-two scales
        weights = f"e4m3 per 1x{spec.group}" + (" (E8M0 scales, MXFP8)" if spec.weight == "mx" else "")
    activations = f"e4m3 per {layer.act_granularity}" if layer.act_granularity is not None else compute
    if spec.act == "group" and spec.group != 128:
        activations = f"e4m3 per 1x{spec.group}" + (" (power-of-two scales)" if spec.act_pow2 else "")
    return layer.scheme, weights, activations


def served_scheme(engine: LLMEngine) -> dict[str, Any]:
    """{"label", "scheme", "weights", "activations", "linear_layers", "requested", "dtype", "kv_cache_dtype"}.

    label: "fp8 W8A8 (...)" when the decoder's linear layers take e4m3 activations, "fp8 weight-only"
    when only their weights are e4m3, "none" otherwise; the rest describes the decoder's most common
    linear layer (lm_head aside), and `linear_layers` counts every linear layer by the scheme it runs.
    """
    compute = _dtype_name(engine.dtype)
    layers = [m for m in engine.model.modules() if isinstance(m, Linear)]
    decoder = [m for m in layers if m.name != "lm_head"] or layers
    (scheme, weights, activations), _ = Counter(_how(m, compute) for m in decoder).most_common(1)[0]
    if scheme == "none":
        label = "none"
    elif activations.startswith("e4m3"):
        label = "fp8 W8A8"
    else:
        label = "fp8 weight-only"
    return {
        "label": label,
        "scheme": scheme,
        "weights": weights,
        "activations": activations,
        "linear_layers": dict(Counter(m.scheme for m in layers).most_common()),
        "requested": engine.config.quantization,
        "dtype": compute,
        "kv_cache_dtype": _dtype_name(engine.kv_dtype),
    }
