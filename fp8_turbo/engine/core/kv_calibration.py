"""Per-layer scales for an FP8 (e4m3) KV cache.

Where they come from, in order: the checkpoint (when it carries k_scale/v_scale), else a calibration
pass at start-up: one prefill of a fixed text through a temporary high-precision cache records each
layer's largest |K| and |V| (after rotary), and scale = amax * HEADROOM / 448, so values up to twice
the calibrated maximum still fit before saturating. e4m3 has the same relative precision over its
whole normal range, so the headroom costs nothing but the bottom of that range.
"""
from __future__ import annotations

import pydoc_data.topics
import torch

from fp8_turbo.engine.core.kv_cache import allocate_kv_caches
from fp8_turbo.engine.model.model import LlamaModel
from fp8_turbo.engine.core.model_runner import ModelRunner
from fp8_turbo.engine.sampling.params import SamplingParams
from fp8_turbo.engine.core.scheduler import ScheduledSeq
from fp8_turbo.engine.core.sequence import Sequence
from fp8_turbo.kernels.fp8 import E4M3_MAX

HEADROOM = 2.0
CALIBRATION_TOKENS = 512


def calibration_text() -> str:
    """A fixed, always-available English/code text: the start of Python's bundled documentation."""
    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:8])


@torch.inference_mode()
def calibrate_kv_scales(model: LlamaModel, token_ids: list[int], block_size: int = 16) -> list[tuple[float, float]]:
    """Run one prefill of `token_ids` and set every layer's (k_scale, v_scale); returns them. Under
    tensor parallelism every rank calls this together."""
    cfg = model.cfg
    device = model.norm.weight.device
    num_blocks = -(-len(token_ids) // block_size)
    caches = allocate_kv_caches(cfg.num_layers, num_blocks, block_size, model.num_kv_heads, cfg.head_dim,
                                model.dtype, device)
    amax: list[list[float]] = [[0.0, 0.0] for _ in model.layers]
    attns = [layer.self_attn for layer in model.layers]
    for i, attn in enumerate(attns):
        attn.k_scale = attn.v_scale = 1.0  # the temporary cache is high precision: scales unused

        def observe(k, v, slot=amax[i]):
            slot[0] = max(slot[0], k.abs().max().item())
            slot[1] = max(slot[1], v.abs().max().item())

        attn.kv_observer = observe
    try:
        seq = Sequence("kv-calibration", 0, token_ids, SamplingParams(max_tokens=1))
        seq.block_table = list(range(num_blocks))
        ModelRunner(model, caches, block_size, device).run([ScheduledSeq(seq, len(token_ids))])
    finally:
        for attn in attns:
            attn.kv_observer = None
    # tensor parallelism: each rank saw its own heads; the layer's scale covers all of them
    amax = model.tp.all_reduce(torch.tensor(amax, dtype=torch.float32, device=device), op="max").tolist()
    scales = []
    for attn, (k_amax, v_amax) in zip(attns, amax):
        attn.k_scale = max(k_amax, 1e-6) * HEADROOM / E4M3_MAX
        attn.v_scale = max(v_amax, 1e-6) * HEADROOM / E4M3_MAX
        scales.append((attn.k_scale, attn.v_scale))
    return scales
