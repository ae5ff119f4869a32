"""Linear layers and the quantization scheme that decides how each one computes."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from fp8_turbo import kernels
from fp8_turbo.engine.model.schemes import FP8_ALIAS, QUANT_SCHEMES, SCHEMES, Scheme, fp8_scheme, resolve_scheme
from fp8_turbo.kernels import cpu as cpu_kernels
from fp8_turbo.kernels.backend import use_triton
from fp8_turbo.engine.model.module_version import Versioned

__all__ = ["DEFAULT_IGNORE", "QUANT_SCHEMES", "SCHEMES", "Linear", "QuantConfig"]


# Kept in high precision by default: lm_head, and the last decoder block's MLP. The sensitivity sweep
# (bench/ACCURACY.md) ranks that MLP's down_proj and gate_up_proj far above every other layer; on
# SmolLM2 keeping it takes fp8 from +3.35% to +1.21% perplexity for 2.5% of the linear weight bytes
# (~0.7 GB more for Llama-3.3-70B, 1% of its weights). "{last}" is the last layer's index.
DEFAULT_IGNORE = ("lm_head", "model.layers.{last}.mlp.*")


@dataclass(slots=True)
class QuantConfig:
    """Which layers are quantized, and how.

    `scheme` takes any name `quantization=` accepts; "fp8" becomes the scheme `schemes.fp8_scheme`
    picks for `device` (None: CUDA when available, else CPU), and `requested` keeps the name asked for.
    `ignore` holds fnmatch patterns of module names kept in high precision ("{last}" stands for the
    last layer's index, see `for_model`); embeddings are never quantized.
    """

    scheme: str = "none"
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    device: torch.device | str | None = None
    requested: str = ""

    def __post_init__(self) -> None:
        self.requested = self.requested or ("none" if self.scheme is None else self.scheme)
        self.scheme = resolve_scheme(self.scheme, self.device)
        self.ignore = tuple(self.ignore)

    @property
    def is_alias(self) -> bool:
        """True when the scheme was picked for the backend ("fp8"), not named by the user."""
        return self.requested == FP8_ALIAS

    def describe(self, reason: bool = True) -> str:
        """What runs (and why), for the start-up log: "fp8 -> fp8-weight-only (CPU: ...)"."""
        if self.is_alias:
            return f"{FP8_ALIAS} -> {self.scheme}" + (f" ({fp8_scheme(self.device)[1]})" if reason else "")
        if self.requested not in (self.scheme, "none"):
            return f"{self.scheme} ({self.requested})"  # e.g. a pre-quantized checkpoint's own scheme
        return self.scheme

    def for_model(self, num_layers: int) -> "QuantConfig":
        """The same config with "{last}" in the ignore patterns replaced by the last layer's index."""
        return QuantConfig(self.scheme, tuple(p.replace("{last}", str(num_layers - 1)) for p in self.ignore),
                           self.device, self.requested)

    def applies_to(self, name: str) -> bool:
        if self.scheme == "none":
            return False
        return not any(fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*") for pattern in self.ignore)


class Linear(Versioned):
    """y = x @ W.T (+ b). Weights arrive in high precision and are quantized once in `finalize()`.

    FP8 schemes keep `weight_fp8` (e4m3) and `weight_scale` (fp32). How they compute:
    - CUDA (and CPU under TRITON_INTERPRET=1): activations are quantized by `kernels.quantize_fp8`
      and multiplied by `kernels.fp8_gemm` (Triton), scales applied in the GEMM's epilogue.
    - CPU with our C++ kernels (kernels/cpu): only the e4m3 weight stays resident; one call
      (`fp8_linear`) quantizes the activations and multiplies, in a fixed order over K, so a row's
      output does not depend on the batch. High-precision layers (scheme "none") run `dense_linear`,
      the same fixed-order kernel for fp32/bf16 weights.
    - CPU without them (no compiler): `weight` is replaced by its dequantized copy (exactly the FP8
      grid times its scale, in fp32) and activations are quantize-dequantized with the same numerics
      (`fake_quantize_fp8`), so one fp32 matmul reproduces the FP8 result up to summation order.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, quant: QuantConfig, name: str):
        super().__init__()
        self.in_features, self.out_features, self.name = in_features, out_features, name
        self.scheme = quant.scheme if quant.applies_to(name) else "none"
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.weight_fp8: torch.Tensor | None = None
        self.weight_scale: torch.Tensor | None = None
        self.input_scale: torch.Tensor | None = None  # static activation scale (fp8-tensor checkpoints)
        self.deterministic = False  # Triton: one GEMM config for every batch size (LLM(deterministic=True))

    @property
    def spec(self) -> Scheme | None:
        return SCHEMES[self.scheme] if self.scheme != "none" else None

    @property
    def weight_granularity(self) -> str | None:
        return SCHEMES[self.scheme].weight if self.scheme != "none" else None

    @property
    def act_granularity(self) -> str | None:
        return SCHEMES[self.scheme].act if self.scheme != "none" else None

    def finalize(self) -> None:
        """Called once after the weights are loaded: quantize the weight for FP8 schemes."""
        if self.scheme == "none" or self.weight_fp8 is not None:
            return
        from fp8_turbo.kernels.fp8 import quantize_weight

        try:
            w_fp8, scale = quantize_weight(self.weight.data, self.weight_granularity, self.spec.group)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from e
        self.set_fp8_weight(w_fp8, scale)

    def set_fp8_weight(self, w_fp8: torch.Tensor, scale: torch.Tensor) -> None:
        """Install an e4m3 weight [N, K] and its scale (from finalize() or a pre-quantized checkpoint):
        fp32, or E8M0 (one byte, MXFP8) as given."""
        from fp8_turbo.kernels.fp8 import E8M0_DTYPE, dequantize_fp8

        self.weight_fp8, self.weight_scale = w_fp8, scale if scale.dtype == E8M0_DTYPE else scale.float()
        if w_fp8.is_cuda or cpu_kernels.available():
            self.weight = None  # the Triton GEMM / our CPU kernel reads the e4m3 weight directly
        else:
            self.weight = nn.Parameter(dequantize_fp8(w_fp8, self.weight_scale), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer computes with, in fp32 [N, K]: the e4m3 grid times its scale for FP8
        schemes (whether or not a dequantized copy is resident), else the weight itself."""
        if self.weight_fp8 is None:
            return self.weight.float()
        from fp8_turbo.kernels.fp8 import dequantize_fp8

        return dequantize_fp8(self.weight_fp8, self.weight_scale)

    def forward(self, x: torch.Tensor, act_scale: torch.Tensor | None = None) -> torch.Tensor:
        """`act_scale` replaces the activation scale computed from x (row-parallel shards pass the scale
        of the whole row: fp8_turbo/engine/model/parallel.py)."""
        on_cpu_kernels = not use_triton(x) and cpu_kernels.available()
        if self.scheme == "none":
            if on_cpu_kernels:
                return cpu_kernels.dense_linear(x, self.weight, self.bias)
            return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)
        spec = self.spec
        act = spec.act
        act_scale = self.input_scale if act_scale is None else act_scale
        if on_cpu_kernels:
            if act_scale is None or act == "tensor":  # dynamic, or one static scale: one fused call
                return cpu_kernels.fp8_linear(x, self.weight_fp8, self.weight_scale, act, act_scale, self.bias,
                                              act_group=spec.group, act_pow2=spec.act_pow2)
            # given per-token scales (a row-parallel shard quantizes with its whole row's scale)
            x2 = x.reshape(-1, self.in_features)
            xq, xs = kernels.quantize_fp8(x2, act, scale=act_scale)
            out = cpu_kernels.fp8_gemm(xq, self.weight_fp8, xs, self.weight_scale, x.dtype, self.bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        if not use_triton(x):
            from fp8_turbo.kernels.quantize import fake_quantize_fp8

            if act is not None:
                x = fake_quantize_fp8(x, act, spec.group, scale=act_scale, pow2=spec.act_pow2)
            return nn.functional.linear(x, self.weight, self.bias)
        from fp8_turbo.kernels import fp8_gemm, fp8_weight_only_gemm, quantize_fp8

        x2 = x.reshape(-1, self.in_features)
        if act is None:  # weight-only: W8A16 kernel, each weight tile dequantized in registers
            out = fp8_weight_only_gemm(x2, self.weight_fp8, self.weight_scale, self.bias,
                                       deterministic=self.deterministic)
        else:
            xq, xs = quantize_fp8(x2, act, spec.group, scale=act_scale, pow2=spec.act_pow2)
            out = fp8_gemm(xq, self.weight_fp8, xs, self.weight_scale, out_dtype=x.dtype, bias=self.bias,
                           deterministic=self.deterministic)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, scheme={self.scheme}"
