"""SmoothQuant-style migration of activation range into weights, folded into the model so the checkpoint
stays a standard FP8 checkpoint (Xiao et al., 2023).

A Linear computes X W^T = (X / s)(W * s)^T for any per-input-channel s > 0. Dividing X by s is free
when the layer before X can absorb it:
- input_layernorm -> qkv_proj and post_attention_layernorm -> gate_up_proj: the RMSNorm weight / s;
- v -> o_proj: the rows of v_proj / s (attention mixes tokens, not channels, so o_proj's input channel
  (head h, d) is v's channel (kv head of h, d) / s). Heads that share a KV head read the same v, so s
  is tied across each KV group: one factor per (kv head, d), the largest statistics of the group;
- up -> down_proj: the rows of up_proj / s (down's input is silu(gate) * up, linear in up).
Not foldable: k into q (RoPE rotates channel pairs, and q.k is not a Linear input) and anything
across the residual stream.

s = max|X|^alpha / max|W|^(1 - alpha) per input channel (max|W| over the consumer's output rows),
taken relative to the median channel, rounded to the nearest power of two and clamped to s >= 1 (only
outlying channels shrink; see smoothing_factors). Powers of two make every fold exact in binary floating point (no
overflow or subnormals assumed): the unquantized model computes bit-identical logits, and the folded
norm weights are representable in whatever dtype the checkpoint stores. They lose nothing for FP8:
e4m3 has a relative precision that does not depend on scale, so what migration buys in FP8 is dynamic
range (per-token scales set by an outlier channel push small channels into e4m3's subnormals), and a
power of two moves range as well as any factor does. Exact except with an FP8 KV cache, whose per-layer
v_scale sees the rescaled v channels.

alpha is searched per layer pair on calibration samples: the consumer's output error with its weights
and activations fake-quantized by the scheme, against X W^T; "no smoothing" is always a candidate and
wins ties, so the calibration error never exceeds the unsmoothed one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8_turbo.engine.lab.calibration import ActivationStats
from fp8_turbo.engine.model.linear import Linear
from fp8_turbo.kernels.fp8 import dequantize_fp8, quantize_weight
from fp8_turbo.kernels.quantize import fake_quantize_fp8

DEFAULT_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_EXPONENT = 16  # |log2 s| <= 16: far from the exponent limits of bf16/fp16/fp32 weights


@dataclass(slots=True)
class SmoothPair:
    """A place where 1/s can be folded: `producer` is an RMSNorm (whole weight) or a Linear whose output
    rows `rows` are the consumer's input channels; `group` ties s over heads sharing a KV head
    (consumer input channels laid out [kv_heads, group, head_dim])."""

    name: str
    producer: torch.nn.Module
    consumer: Linear
    rows: slice | None = None
    group: tuple[int, int, int] | None = None  # (kv_heads, heads per kv head, head_dim)


def smoothing_pairs(block) -> list[SmoothPair]:
    """The four foldable pairs of a Llama decoder block."""
    attn, mlp = block.self_attn, block.mlp
    v_rows = slice(attn.q_size + attn.kv_size, attn.q_size + 2 * attn.kv_size)
    up_rows = slice(mlp.intermediate_size, 2 * mlp.intermediate_size)
    group = (attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, attn.head_dim)
    return [SmoothPair("input_layernorm->qkv_proj", block.input_layernorm, attn.qkv_proj),
            SmoothPair("v_proj->o_proj", attn.qkv_proj, attn.o_proj, v_rows, group),
            SmoothPair("post_attention_layernorm->gate_up_proj", block.post_attention_layernorm, mlp.gate_up_proj),
            SmoothPair("up_proj->down_proj", mlp.gate_up_proj, mlp.down_proj, up_rows)]


def _tie(v: torch.Tensor, group: tuple[int, int, int] | None) -> torch.Tensor:
    """Per-channel statistic -> the max over each KV group, broadcast back to every channel. [K]"""
    if group is None:
        return v
    kvh, g, hd = group
    return v.view(kvh, g, hd).amax(1, keepdim=True).expand(kvh, g, hd).reshape(-1)


def smoothing_factors(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float,
                      group: tuple[int, int, int] | None = None) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha), tied per KV group, relative to its median over the channels,
    rounded to a power of two and never below 1. [K]

    A common factor of all channels changes nothing (per-token and per-row scales absorb a power of two
    exactly), so s is measured from the median channel; s >= 1 then only ever shrinks the channels with
    outlying range. The SmoothQuant formula would also amplify channels that were nearly silent during
    calibration (s << 1), and a held-out input that is larger there than calibration saw would then set
    the per-token scale and crush every other channel. Channels never active (or with all-zero weights)
    keep s = 1."""
    x, w = _tie(x_amax.float(), group), _tie(w_amax.float(), group)
    live = (x > 0) & (w > 0)
    if not live.any():
        return torch.ones_like(x)
    log2_s = alpha * torch.log2(x.clamp(min=1e-30)) - (1 - alpha) * torch.log2(w.clamp(min=1e-30))
    log2_s = log2_s - log2_s[live].median()
    exp = torch.where(live, log2_s.round().clamp(0, MAX_EXPONENT), torch.zeros_like(log2_s))
    return torch.exp2(exp)


def migration_error(w: torch.Tensor, sample: torch.Tensor, s: torch.Tensor | None, act_granularity: str,
                    weight_granularity: str, group: int = 128, act_pow2: bool = False) -> float:
    """||X W^T - Q(X / s) Q(W * s)^T||^2 over the sample rows (fake-quant, kernels numerics; `group`: the
    K extent of group scales, `act_pow2`: power-of-two activation scales, as the scheme has them)."""
    sample = sample.to(w.device)
    s = s.to(w.device) if s is not None else None
    ref = sample @ w.T
    x, ws = (sample, w) if s is None else (sample / s, w * s)
    wq = dequantize_fp8(*quantize_weight(ws, weight_granularity, group))
    return (fake_quantize_fp8(x, act_granularity, group, pow2=act_pow2) @ wq.T - ref).pow(2).sum().item()


@torch.inference_mode()
def search_alpha(pair: SmoothPair, stats: ActivationStats, act_granularity: str, weight_granularity: str,
                 alphas: tuple[float, ...] = DEFAULT_ALPHAS, group: int = 128,
                 act_pow2: bool = False) -> tuple[float | None, torch.Tensor | None]:
    """The alpha (None: no smoothing) whose factors give the smallest migration_error on stats.sample."""
    w = pair.consumer.weight.data.float()
    best_alpha, best_s = None, None
    best = migration_error(w, stats.sample, None, act_granularity, weight_granularity, group, act_pow2)
    w_amax = w.abs().amax(0)
    for alpha in alphas:
        s = smoothing_factors(stats.amax.to(w.device), w_amax, alpha, pair.group)
        if torch.all(s == 1):
            continue
        err = migration_error(w, stats.sample, s, act_granularity, weight_granularity, group, act_pow2)
        if err < best:
            best, best_alpha, best_s = err, alpha, s
    return best_alpha, best_s


@torch.inference_mode()
def fold(pair: SmoothPair, s: torch.Tensor) -> None:
    """Divide the producer's output channels by s and multiply the consumer's input columns by s
    (exact: s holds powers of two)."""
    consumer = pair.consumer
    consumer.weight.data.mul_(s.to(consumer.weight.dtype))
    p = pair.producer
    if pair.rows is None:  # RMSNorm
        p.weight.data.div_(s.to(p.weight.dtype))
        return
    if pair.group is not None:  # s is tied per KV group: one factor per v channel (kv head, d)
        kvh, g, hd = pair.group
        s = s.view(kvh, g, hd)[:, 0].reshape(-1)
    p.weight.data[pair.rows].div_(s.to(p.weight.dtype)[:, None])
    if p.bias is not None:
        p.bias.data[pair.rows].div_(s.to(p.bias.dtype))
