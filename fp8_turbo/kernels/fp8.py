"""FP8 e4m3 numerics shared by every backend: the e4m3 grid, scales, weight quantization.

One definition of "quantize to FP8" for the whole engine:
    scale = max(amax, MIN_AMAX) / 448                     (fp32; an all-zero row gives no NaN/Inf)
    q     = round_to_e4m3(x / scale)                      (saturate to +-448, round half to even)
    x_hat = q * scale                                     (dequantized, fp32)
The Triton kernels (fp8_turbo/kernels/quantize.py) compute exactly the same fp32 operations, so quantization is
bit-exact between the GPU, the interpreter and these torch functions.

Scale layouts (rows x cols of the quantized 2-D tensor, `block` = 128 by default):
    per-tensor [1] | per-row [rows, 1] | per-group [rows, ceil(cols/group)]
    | per-block [ceil(rows/block), ceil(cols/block)]
Finer weight scales: per-group along K, group = 32 | 64 | 128 (fp32 scales), and MXFP8 (OCP
Microscaling): groups of 32 with power-of-two scales stored as E8M0 (torch.float8_e8m0fnu, one byte):
    scale = pow2_scale(max(amax, MIN_AMAX) / 448)    (rounded *up* to a power of two, so nothing clips;
                                                      the OCP spec's floor(log2 amax) - 8 would clip up
                                                      to 12.5% of a group's largest values to 448)
FP8's grid is floating point: its relative rounding error is the same at every scale, so a finer
scale changes only which values fall into e4m3's subnormals (below 2^-6 of 448 x scale) and where
the largest value of a group lands on the grid; bench/ACCURACY.md measures what that buys.
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0  # largest finite float8_e4m3fn: 1.75 * 2^8
E4M3_MIN_NORMAL_EXP = -6  # smallest normal 2^-6; subnormals are multiples of 2^-9
E4M3_MANTISSA_BITS = 3
MIN_AMAX = 1e-12  # amax floor: scale stays a normal fp32 (>= 2.2e-15) and x / scale <= 448
FP8_DTYPE = torch.float8_e4m3fn


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e4m3 value in fp32: saturate to +-448, round half to even to 3 mantissa
    bits, subnormal step 2^-9. NaN stays NaN. The result is exactly representable in e4m3, so
    `.to(torch.float8_e4m3fn)` afterwards is exact on every backend (design.md pitfall 2)."""
    x = x.float()
    a = x.abs().clamp(max=E4M3_MAX)
    # floor(log2 a) from the fp32 exponent bits; zero and fp32 subnormals read as -127.
    exp = (a.view(torch.int32) >> 23) - 127
    # Grid step at a: 2^(max(exp, -6) - 3), built from bits. Dividing by it is exact (power of two).
    step = ((exp.clamp(min=E4M3_MIN_NORMAL_EXP) - E4M3_MANTISSA_BITS + 127) << 23).view(torch.float32)
    return (torch.round(a / step) * step).copysign(x)  # torch.round: half to even


def compute_scale(amax: torch.Tensor) -> torch.Tensor:
    """scale = max(amax, MIN_AMAX) / 448 in fp32; zeros give a tiny finite scale, never NaN/Inf."""
    return amax.float().clamp(min=MIN_AMAX) / E4M3_MAX


def pow2_scale(scale: torch.Tensor) -> torch.Tensor:
    """A positive normal fp32 scale rounded up to the next power of two (exact, from the bits: any
    mantissa bit set moves to the next exponent). MXFP8's E8M0 scales; NaN stays NaN."""
    bits = scale.float().contiguous().view(torch.int32)
    up = ((bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)) << 23
    return torch.where(torch.isnan(scale), scale.float(), up.view(torch.float32))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


GROUP_SIZES = (32, 64, 128)  # K extents of per-group weight scales (schemes); the kernels take 16..128


def group_of(cols: int, n_groups: int) -> int | None:
    """The K extent g (a power of two in 16..128) of a per-row group scale with `n_groups` columns over
    `cols`: cdiv(cols, g) == n_groups. Unique whenever n_groups > 1 (any two such g differ by 2x, and
    cdiv(cols, g) == cdiv(cols, 2g) only when both are 1); None when no g fits."""
    for g in (16, 32, 64, 128):
        if _cdiv(cols, g) == n_groups:
            return g
    return None


def expand_scale(scale: torch.Tensor, rows: int, cols: int, block: int | None = None) -> torch.Tensor:
    """Scale of any layout above (fp32 or E8M0) -> fp32 tensor broadcastable to [rows, cols].
    `block`: the K extent of a per-group scale and both extents of a per-block one; None (default)
    infers a per-row group's extent from the shape (group_of), with 128 for blocks."""
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(1, 1)
    s = scale.reshape(-1, scale.shape[-1])
    if block is None:
        block = (group_of(cols, s.shape[1]) if s.shape[0] == rows and s.shape[1] > 1 else None) or 128
    row_block = 1 if s.shape[0] == rows else block
    col_block = cols if s.shape[1] == 1 else block
    expected = (_cdiv(rows, row_block), _cdiv(cols, col_block))
    if tuple(s.shape) != expected:
        raise ValueError(
            f"scale of shape {tuple(scale.shape)} fits no layout of a [{rows}, {cols}] tensor: expected "
            f"[1], [{rows}, 1], [{rows}, {_cdiv(cols, block)}] or [{_cdiv(rows, block)}, {_cdiv(cols, block)}]"
        )
    if row_block > 1:
        s = s.repeat_interleave(row_block, dim=0)[:rows]
    if s.shape[1] > 1:
        s = s.repeat_interleave(col_block, dim=1)[:, :cols]
    return s


def dequantize_fp8(x_fp8: torch.Tensor, scale: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """q * scale in fp32 for any scale layout; x_fp8 [..., cols] (leading dims are rows); `block` as
    in expand_scale (None: a per-row group's extent from the scale's shape)."""
    cols = x_fp8.shape[-1]
    x = x_fp8.reshape(-1, cols).float()
    return (x * expand_scale(scale, x.shape[0], cols, block)).reshape(x_fp8.shape)


WEIGHT_GRANULARITIES = ("channel", "tensor", "block", "group", "mx")
MX_GROUP = 32  # OCP MXFP8: 32 elements share one E8M0 scale
E8M0_DTYPE = torch.float8_e8m0fnu


def weight_amax(w: torch.Tensor, granularity: str = "channel", block: int = 128) -> torch.Tensor:
    """max |w| in the layout of the weight's scale (see quantize_weight); fp32."""
    n, k = w.shape
    w = w.float().abs()
    if granularity == "channel":
        return w.amax(dim=1, keepdim=True)  # [N, 1]
    if granularity == "tensor":
        return w.amax().reshape(1)  # [1]
    if granularity == "block":
        nb, kb = _cdiv(n, block), _cdiv(k, block)
        padded = torch.nn.functional.pad(w, (0, kb * block - k, 0, nb * block - n))
        return padded.view(nb, block, kb, block).amax(dim=(1, 3))  # [Nb, Kb]
    if granularity in ("group", "mx"):
        g = MX_GROUP if granularity == "mx" else block
        kb = _cdiv(k, g)
        return torch.nn.functional.pad(w, (0, kb * g - k)).view(n, kb, g).amax(dim=2)  # [N, Kg]
    raise ValueError(f"quantize_weight: granularity={granularity!r}; allowed: {WEIGHT_GRANULARITIES}")


def weight_scale(amax: torch.Tensor, granularity: str) -> torch.Tensor:
    """The stored scale of a weight from its amax (weight_amax's layout): fp32 amax / 448, or for
    "mx" that rounded up to a power of two, stored as E8M0."""
    scale = compute_scale(amax)
    return pow2_scale(scale).to(E8M0_DTYPE) if granularity == "mx" else scale


def quantize_weight(
    w: torch.Tensor, granularity: str = "channel", block: int = 128, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a linear weight w [N, K] (out, in) to e4m3.

    granularity: "channel" -> scale [N, 1]; "tensor" -> scale [1];
                 "block"   -> scale [ceil(N/block), ceil(K/block)] (DeepSeek/transformers 128x128);
                 "group"   -> scale [N, ceil(K/block)]: one fp32 scale per `block` weights along K;
                 "mx"      -> scale [N, ceil(K/32)] float8_e8m0fnu (MXFP8, power-of-two scales).
    `scale` (that layout) is used instead of computing it from w: a tensor-parallel shard of a weight
    takes the scale of the whole weight (fp8_turbo/engine/model/parallel.py).
    Returns (w_fp8 [N, K] float8_e4m3fn, scale fp32 or E8M0). NaN/Inf in w raise ValueError.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight: w must be 2-D [out, in], got shape {tuple(w.shape)}")
    w = w.float()
    bad = (~torch.isfinite(w)).sum().item()
    if bad:
        raise ValueError(
            f"quantize_weight: weight of shape {tuple(w.shape)} has {bad} NaN/Inf values; "
            "FP8 quantization needs finite weights (check the checkpoint)"
        )
    n, k = w.shape
    if granularity == "mx":
        block = MX_GROUP
    if scale is None:
        scale = weight_scale(weight_amax(w, granularity, block), granularity)
    elif granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(f"quantize_weight: granularity={granularity!r}; allowed: {WEIGHT_GRANULARITIES}")
    elif granularity != "mx":
        scale = scale.float()
    q = round_to_e4m3(w / expand_scale(scale, n, k, block))
    return q.to(FP8_DTYPE), scale
