"""Linear layers and the quantization scheme that decides how each one computes."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

QUANT_SCHEMES = ("none", "fp8", "fp8-tensor", "fp8-block", "fp8-weight-only")


@dataclass(slots=True)
class QuantConfig:
    """Which layers are quantized, and how.

    `ignore` holds fnmatch patterns of module names kept in high precision; embeddings are never
    quantized and lm_head is ignored by default.
    """

    scheme: str = "none"
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        if self.scheme is None:
            self.scheme = "none"
        if self.scheme not in QUANT_SCHEMES:
            raise ValueError(f"quantization must be one of {QUANT_SCHEMES} (or None), got {self.scheme!r}")
        self.ignore = tuple(self.ignore)

    def applies_to(self, name: str) -> bool:
        if self.scheme == "none":
            return False
        return not any(fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*") for pattern in self.ignore)


class Linear(nn.Module):
    """y = x @ W.T (+ b). Weights arrive in high precision and are quantized once in `finalize()`."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, quant: QuantConfig, name: str):
        super().__init__()
        self.in_features, self.out_features, self.name = in_features, out_features, name
        self.scheme = quant.scheme if quant.applies_to(name) else "none"
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def finalize(self) -> None:
        """Called once after the weights are loaded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, scheme={self.scheme}"
