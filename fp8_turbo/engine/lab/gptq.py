"""GPTQ-style error-compensating rounding onto the e4m3 grid (Frantar et al., 2022, adapted to FP8).

Rounding every weight to its nearest e4m3 value (RTN) ignores that input channels are correlated.
GPTQ quantizes the columns of W [N, K] one at a time and spreads each column's rounding error over the
columns not yet quantized, along the inverse Hessian of the layer's calibration inputs (H = X^T X), so
that X W^T changes as little as possible. Here:
- the grid is e4m3 with a fixed scale per row (or per 128x128 block) chosen before rounding (amax, or
  engine.lab.scale_search), so the result is a standard FP8 weight: q in e4m3 and the same scale;
  a compensated weight that grows past +-448 * scale saturates like any e4m3 value;
- damping: H + damp * mean(diag H) * I (numerical safety, and a prior towards RTN on rarely seen
  channels); channels never active in calibration (H_kk = 0) get H_kk = 1 and keep RTN behaviour.
  DEFAULT_DAMP is 0.1, not the reference's 0.01: with 0.01 the rounding fits the calibration tokens
  themselves (bench/calibration_generalization.py, SmolLM2, weight-only, 2048 tokens of Python's docs:
  output error vs amax 0.14 on those tokens, 0.49 on other tokens of the same text, 1.28 on license
  texts, i.e. worse than plain rounding); 0.1 gives 0.18 / 0.40 / 0.80, and 16384 tokens 0.28 / 0.28 /
  0.68 (bench/ACCURACY.md, Calibration);
- column order: descending diag(H) ("act order": the most active channels are rounded first, while
  the most columns remain to absorb their error); scales are static, so the order changes no scale;
- block-wise lazy updates: errors are applied inside a block of 128 columns column by column, and to
  the columns after the block once per block (one matmul), as in the reference implementation.
Rows are independent given the Hessian, so a fused layer (q/k/v) is the same as its shards done alone.
"""
from __future__ import annotations

import torch

from fp8_turbo.kernels.fp8 import FP8_DTYPE, round_to_e4m3

DEFAULT_DAMP = 0.1  # H + damp * mean(diag H) * I; 0.01 over-fits the calibration tokens (module docstring)


@torch.inference_mode()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, *, damp: float = DEFAULT_DAMP,
                  block: int = 128, act_order: bool = True) -> torch.Tensor:
    """Quantize w [N, K] to e4m3 with the per-element scale `scale` (broadcastable to [N, K], e.g. from
    kernels.fp8.expand_scale). Returns q [N, K] float8_e4m3fn; q * scale is the dequantized weight."""
    w = w.float()
    n, k = w.shape
    s = scale.float().expand(n, k)
    h = hessian.to(device=w.device, dtype=torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(k, device=w.device)
    w, s, h = w[:, perm].clone(), s[:, perm].contiguous(), h[perm][:, perm]
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    # Upper Cholesky factor of H^-1: row j holds how column j's error spreads over columns j..K-1.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q = torch.empty_like(w)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, ub = w[:, b0:b1], u[b0:b1, b0:b1]
        errs = torch.empty(n, b1 - b0, device=w.device)
        for j in range(b1 - b0):
            col, sc = wb[:, j], s[:, b0 + j]
            qc = round_to_e4m3(col / sc)
            q[:, b0 + j] = qc
            err = (col - qc * sc) / ub[j, j]
            wb[:, j:] -= err[:, None] * ub[j, j:][None, :]
            errs[:, j] = err
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(k, device=w.device)
    return q[:, inv].to(FP8_DTYPE)
