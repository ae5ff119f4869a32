"""Per-layer sensitivity: quantize one linear layer at a time (all others unquantized) and rank the
layers by the KL(base || quant) each one alone causes. The top of the ranking is what an ignore list
(or engine.lab.budget, under a byte budget) keeps in high precision. Run it on calibration text: the
choice of layers is calibration, and scoring must not see the text it was made on.
"""
from __future__ import annotations

import time

import torch

from fp8_turbo.engine.lab.accuracy import KV_OPTIONS, TokenStats, quantize_only
from fp8_turbo.engine.model.linear import Linear


@torch.inference_mode()
def sensitivity_sweep(model: str, windows: list[list[int]], scheme: str = "fp8", log=print) -> list[dict]:
    """Quantize one linear layer at a time (everything else unquantized); rank by KL(base || quant).

    Layers before the quantized one compute exactly what the base model computes, so each run starts
    from the cached input of its decoder block (about half the work of a full forward)."""
    from fp8_turbo.engine.llm import LLM

    llm = LLM(model, quantization="none", **KV_OPTIONS)
    net = llm.engine.model
    linears = [m for m in net.modules() if isinstance(m, Linear) and m.name != "lm_head"]
    block_of = {m.name: int(m.name.split(".")[2]) for m in linears}
    cached = [_BlockCache(llm, ids) for ids in windows]
    results = []
    t0 = time.perf_counter()
    for j, m in enumerate(linears):
        s = TokenStats()
        with quantize_only(m, scheme):
            for c in cached:
                s.add(c.base_logp, c.logits_from(block_of[m.name]), c.targets)
        results.append({"layer": m.name, "kl": s.kl.mean().item(), "top1": s.agree / s.n,
                        "nll_delta": (s.nll - sum(c.base_nll for c in cached)) / s.n,
                        "params": m.in_features * m.out_features})
        if (j + 1) % 10 == 0:
            log(f"sweep {j + 1}/{len(linears)} ({time.perf_counter() - t0:.0f}s)")
    for c in cached:
        c.release()
    return sorted(results, key=lambda r: -r["kl"])


class _BlockCache:
    """One window prefilled once through the base model, keeping each decoder block's input."""

    def __init__(self, llm, ids: list[int]):
        from fp8_turbo.engine.sampling.params import SamplingParams
        from fp8_turbo.engine.core.scheduler import ScheduledSeq
        from fp8_turbo.engine.core.sequence import Sequence

        self.llm, self.engine = llm, llm.engine
        self.seq = Sequence("sweep", 0, ids, SamplingParams(max_tokens=1))
        self.engine.block_manager.allocate(self.seq, len(ids))
        input_ids, self.meta, _ = self.engine.runner.prepare([ScheduledSeq(self.seq, len(ids))])
        net = self.engine.model
        x = net.embed_tokens(input_ids)
        self.cos, self.sin = net.rotary(self.meta.positions, x.dtype)
        self.inputs = []
        for layer, kv in zip(net.layers, self.engine.runner.kv_caches):
            self.inputs.append(x)
            x = layer(x, self.cos, self.sin, self.meta, kv)
        logits = net.lm_head(net.norm(x)).float()
        self.targets = torch.tensor(ids[1:])
        self.base_logp = torch.log_softmax(logits[:-1], dim=-1)
        self.base_nll = -self.base_logp.gather(1, self.targets[:, None]).sum().item()

    def logits_from(self, start: int) -> torch.Tensor:
        net, kvs = self.engine.model, self.engine.runner.kv_caches
        x = self.inputs[start]
        for layer, kv in zip(net.layers[start:], kvs[start:]):
            x = layer(x, self.cos, self.sin, self.meta, kv)
        return net.lm_head(net.norm(x)).float()

    def release(self) -> None:
        self.engine.block_manager.free(self.seq)
