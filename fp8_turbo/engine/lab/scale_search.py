"""Weight scale search: the FP8 scale of each output channel (or 128x128 block, or tensor) that minimizes
the layer's output error on calibration activations, instead of amax / 448.

Candidates are scale = r * amax / 448 for r in `ratios`:
- r < 1 clips the largest weights to +-448 * scale (the classic clipping-ratio search);
- 1 <= r < 2 clips nothing and slides the e4m3 grid under the weights. A floating-point grid is the
  same one octave up (r = 2 equals r = 1 except for subnormals), so 16 steps over [1, 2) try every
  alignment of the grid to the weights at 1/16-octave resolution. For FP8 this is where the gain is:
  rounding errors depend on where each weight falls between grid points, not on clipping outliers.

The objective is the output error over the calibration tokens, sum_n e_n H e_n^T with e_n the
quantization error of output row n and H = X^T X (engine.lab.calibration), so no activations are kept;
without calibration data (hessian None, the `mse` method) it is the weight's own squared error
(H = I): nothing to over-fit, and what it gains carries to any text.
r = 1 (amax) is always a candidate and wins ties, so the calibration error never exceeds amax's.
Per-block search scores each 128x128 block with the diagonal 128x128 block of H (the error of other
column blocks is held fixed, cross terms between column blocks are left out); per-group scales (1 x g
along K) the same way, with the diagonal g x g block of H for each group of each row. MXFP8's
power-of-two scales have no finer candidates than amax's own (r = 2 is the same grid): no search.
"""
from __future__ import annotations

import torch

from fp8_turbo.kernels.fp8 import expand_scale, quantize_weight, round_to_e4m3

# amax first: ties keep it. Then light clipping, then the octave above amax in 1/16-octave steps.
DEFAULT_RATIOS = (1.0, 0.9, 0.95, *(2.0 ** (j / 16) for j in range(1, 16)))


def quantization_error(w: torch.Tensor, scale: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """w - dequantize(quantize(w)) for a given scale of any layout (kernels.fp8 numerics)."""
    s = expand_scale(scale, *w.shape, block)
    return w - round_to_e4m3(w / s) * s


def output_error(err: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """Per output row n: e_n H e_n^T, the squared output error summed over the calibration tokens
    (H = I when None: the squared weight error). [N]"""
    if hessian is None:
        return (err * err).sum(1)
    return ((err @ hessian) * err).sum(1)


@torch.inference_mode()
def search_scale(w: torch.Tensor, hessian: torch.Tensor | None, granularity: str = "channel",
                 ratios: tuple[float, ...] = DEFAULT_RATIOS, block: int = 128) -> torch.Tensor:
    """Scale of `w` [N, K] in the layout kernels.fp8.quantize_weight gives for `granularity`
    ("channel" [N, 1], "tensor" [1], "block" [ceil(N/128), ceil(K/128)], "group" [N, ceil(K/block)];
    "mx" is returned as amax gives it) minimizing the output error."""
    w = w.float()
    h = hessian.to(device=w.device, dtype=torch.float32) if hessian is not None else None
    base = quantize_weight(w, granularity, block)[1]
    if granularity == "mx":
        return base
    if granularity == "group":
        return _search_groups(w, h, base, ratios, block)
    if granularity in ("channel", "tensor"):
        best, best_loss = base.clone(), None
        for r in ratios:
            s = base * r
            loss = output_error(quantization_error(w, s, block), h)  # [N]
            if granularity == "tensor":
                loss = loss.sum().reshape(1)
            if best_loss is None:
                best_loss = loss
                continue
            better = loss < best_loss
            best = torch.where(better.reshape(-1, 1) if granularity == "channel" else better, s, best)
            best_loss = torch.where(better, loss, best_loss)
        return best
    if granularity != "block":
        raise ValueError(f"search_scale: granularity={granularity!r}; allowed: 'channel', 'tensor', 'block', 'group', 'mx'")
    n, k = w.shape
    nb = base.shape[0]
    best = base.clone()
    for kb in range(base.shape[1]):
        cols = slice(kb * block, min((kb + 1) * block, k))
        wk, hk = w[:, cols], (h[cols, cols] if h is not None else None)
        best_loss = None
        for r in ratios:
            s = base[:, kb] * r  # [Nb]
            s_rows = s.repeat_interleave(block)[:n, None]  # [N, 1]
            err = wk - round_to_e4m3(wk / s_rows) * s_rows
            row_loss = output_error(err, hk)  # [N]
            loss = torch.nn.functional.pad(row_loss, (0, nb * block - n)).view(nb, block).sum(1)  # [Nb]
            if best_loss is None:
                best_loss = loss
                continue
            better = loss < best_loss
            best[:, kb] = torch.where(better, s, best[:, kb])
            best_loss = torch.where(better, loss, best_loss)
    return best


def _search_groups(w: torch.Tensor, h: torch.Tensor, base: torch.Tensor, ratios, group: int) -> torch.Tensor:
    """Per row and 1 x `group` column group: the candidate with the least error under H's diagonal block."""
    k = w.shape[1]
    best = base.clone()
    for kb in range(base.shape[1]):
        cols = slice(kb * group, min((kb + 1) * group, k))
        wk, hk = w[:, cols], (h[cols, cols] if h is not None else None)
        best_loss = None
        for r in ratios:
            s = base[:, kb:kb + 1] * r  # [N, 1]
            loss = output_error(wk - round_to_e4m3(wk / s) * s, hk)  # [N]
            if best_loss is None:
                best_loss = loss
                continue
            better = loss < best_loss
            best[:, kb] = torch.where(better, s[:, 0], best[:, kb])
            best_loss = torch.where(better, loss, best_loss)
    return best
