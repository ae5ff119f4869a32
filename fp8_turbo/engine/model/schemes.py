"""Quantization schemes: what each name computes, and what `quantization="fp8"` means on each backend.

A scheme fixes the weight's scale layout and how the activations enter the GEMM:

| scheme | weight scales | activations |
|---|---|---|
| `fp8-w8a8` | per output channel, fp32 | e4m3, dynamic per-token scale |
| `fp8-tensor` | one, fp32 | e4m3, one scale (dynamic, or a checkpoint's static one) |
| `fp8-block` | 128x128 blocks, fp32 | e4m3, dynamic 1x128 groups |
| `fp8-weight-only` | per output channel, fp32 | unquantized (fp32 / bf16) |
| `fp8-weight-only-g32`, `-g64`, `-g128` | 1 x g along K, fp32 | unquantized |
| `fp8-weight-only-mx` | MXFP8: 1 x 32 along K, E8M0 (powers of two, 1 byte) | unquantized |
| `fp8-w8a8-g32`, `-g64`, `-g128` | 1 x g along K, fp32 | e4m3, dynamic 1 x g groups |
| `fp8-w8a8-mx` | MXFP8: 1 x 32, E8M0 | e4m3, dynamic 1 x 32 groups, power-of-two scales (OCP MXFP8) |

`fp8` is not a scheme of its own: `fp8_scheme(device)` says which of these it runs (W8A8 where FP8
arithmetic is faster, weight-only FP8 elsewhere), so the one decision lives in one place and a
benchmark can flip it. A pre-quantized checkpoint brings its own scheme (a W8A8 checkpoint runs W8A8
everywhere); an explicit scheme name runs as named on every backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Scheme:
    weight: str  # kernels.fp8.quantize_weight granularity: "channel" | "tensor" | "block" | "group" | "mx"
    act: str | None  # kernels.quantize_fp8 granularity of the activations, None: weight-only
    group: int = 128  # K extent of group scales (weight "group" / "mx", activations "group")
    act_pow2: bool = False  # activation scales rounded up to powers of two (MXFP8)

    @property
    def scale_bytes_per_weight(self) -> float:
        """Bytes of weight scale per weight, for the finer layouts (the coarse ones round to ~0)."""
        if self.weight == "group":
            return 4 / self.group
        return 1 / self.group if self.weight == "mx" else 0.0


SCHEMES: dict[str, Scheme] = {
    "fp8-w8a8": Scheme("channel", "token"),
    "fp8-tensor": Scheme("tensor", "tensor"),
    "fp8-block": Scheme("block", "group"),
    "fp8-weight-only": Scheme("channel", None),
    **{f"fp8-weight-only-g{g}": Scheme("group", None, g) for g in (32, 64, 128)},
    "fp8-weight-only-mx": Scheme("mx", None, 32),
    **{f"fp8-w8a8-g{g}": Scheme("group", "group", g) for g in (32, 64, 128)},
    "fp8-w8a8-mx": Scheme("mx", "group", 32, act_pow2=True),
}
FP8_ALIAS = "fp8"
QUANT_SCHEMES = ("none", FP8_ALIAS, *SCHEMES)  # what `quantization=` accepts


def fp8_scheme(device: torch.device | str | None = None) -> tuple[str, str]:
    """(scheme, why): what `quantization="fp8"` runs on `device` (None: CUDA when available, else CPU).

    - CUDA sm_89+ (Ada, Hopper, Blackwell): `fp8-w8a8`. FP8 tensor cores multiply e4m3 x e4m3 at twice
      the bf16 rate, so quantizing the activations buys compute on prefill and large batches.
    - CUDA before sm_89: `fp8-weight-only`. No FP8 arithmetic: the e4m3 weight is upcast to bf16 in
      registers (W8A16), as vLLM's `fp8` runs on those GPUs.
    - CPU: `fp8-weight-only`. Our CPU kernels decode both operands to fp32 for fp32 FMAs, so W8A8 reads
      the same e4m3 weight bytes and only adds the activations' quantization: measured on this branch
      (bench/ACCURACY.md, "Scheme decision"), weight-only is as fast or faster single-stream and at 32
      concurrent sequences, and W8A8 costs ~10x the KL on out-of-domain text. Flip `CPU_FP8_SCHEME` to
      "fp8-w8a8" only when a CPU path that consumes 8-bit activations (e.g. AVX512-BF16 / AMX dot
      products on e4m3 activations, exact in bf16) measures faster on the same benchmark.
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None
        if capability is None or capability >= (8, 9):  # planning for an absent GPU: the FP8 targets
            return "fp8-w8a8", "FP8 tensor cores (sm_89+): e4m3 x e4m3 at twice the bf16 rate"
        return "fp8-weight-only", f"sm_{capability[0]}{capability[1]} has no FP8 arithmetic: W8A16"
    return CPU_FP8_SCHEME, ("CPU: W8A8 reads the same e4m3 weights and adds only the activations' "
                            "quantization (no faster, ~10x the KL: bench/ACCURACY.md)")


CPU_FP8_SCHEME = "fp8-weight-only"  # see fp8_scheme: the one switch a CPU benchmark result flips


def resolve_scheme(name: str | None, device: torch.device | str | None = None) -> str:
    """A concrete scheme name ("none" for None) from what `quantization=` accepts; raises ValueError."""
    name = "none" if name is None else name
    if name not in QUANT_SCHEMES:
        raise ValueError(f"quantization must be one of {QUANT_SCHEMES} (or None), got {name!r}")
    return fp8_scheme(device)[0] if name == FP8_ALIAS else name
