"""Activation statistics of linear layers over calibration text, one decoder block at a time.

For each Linear the calibration methods need the same three things about its input X [T, K]:
- `amax` [K]: max |X[:, k]| per input channel (SmoothQuant's migration factors);
- `hessian` [K, K]: X^T X, so the output error of any weight perturbation E [N, K] over the calibration
  tokens is sum_n E[n] H E[n]^T (scale search, GPTQ) without keeping X;
- `sample` [S, K]: a subset of the rows of X, spread evenly over the windows, for objectives that
  quantize the activations themselves (SmoothQuant's alpha search).

`BlockRunner` keeps the hidden states of every calibration window at the input of the current block
and runs one block at a time over all of them, with hooks collecting the statistics of that block's
Linears. Methods then change the block (fold smoothing, quantize its weights) and `advance()` runs the
*changed* block to produce the next block's inputs, so each block is calibrated on the activations the
quantized model really feeds it (sequential calibration, as GPTQ and llm-compressor do). Memory: one
block's statistics and the windows' hidden states, whatever the depth of the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8_turbo.engine.model.linear import Linear


@dataclass(slots=True)
class ActivationStats:
    """What the calibration methods know about one Linear's input."""

    amax: torch.Tensor  # [K] fp32
    hessian: torch.Tensor  # [K, K] fp64, sum over tokens of x x^T
    tokens: int
    sample: torch.Tensor  # [S, K] fp32

    def scaled(self, inv_s: torch.Tensor) -> "ActivationStats":
        """Statistics of X * inv_s (each input channel k multiplied by inv_s[k])."""
        inv_s = inv_s.to(self.amax.device)
        d = inv_s.to(self.hessian.dtype)
        return ActivationStats(self.amax * inv_s.abs(), self.hessian * d[:, None] * d[None, :], self.tokens,
                               self.sample * inv_s)


class StatsCollector:
    """Forward hooks on Linears that accumulate ActivationStats of their inputs.

    `rows_per_call`: rows of each call's input kept for the sample (evenly spaced)."""

    def __init__(self, modules: list[Linear], rows_per_call: int):
        self.rows_per_call = rows_per_call
        self._acc: dict[str, list] = {}
        self._handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, m: Linear, inputs, out) -> None:
        x = inputs[0].detach().reshape(-1, m.in_features).float()
        acc = self._acc.get(m.name)
        if acc is None:
            acc = self._acc[m.name] = [torch.zeros(m.in_features), torch.zeros(m.in_features, m.in_features,
                                                                                 dtype=torch.float64), 0, []]
        acc[0] = torch.maximum(acc[0], x.abs().amax(0).cpu())
        acc[1] += (x.T @ x).double().cpu()  # fp32 product per window, fp64 sum across windows
        acc[2] += x.shape[0]
        if self.rows_per_call > 0:
            idx = torch.linspace(0, x.shape[0] - 1, min(self.rows_per_call, x.shape[0])).round().long()
            acc[3].append(x[idx.to(x.device)].cpu())

    def close(self) -> dict[str, ActivationStats]:
        for h in self._handles:
            h.remove()
        return {name: ActivationStats(a, h, n, torch.cat(s) if s else torch.empty(0, a.numel()))
                for name, (a, h, n, s) in self._acc.items()}


class BlockRunner:
    """Hidden states of calibration windows at the input of one decoder block, and the block's forward.

    Needs an LLM whose KV cache holds one window (prefill writes and reads it within one call, so every
    window and every block can reuse the same slots)."""

    def __init__(self, llm, windows: list[list[int]]):
        from fp8_turbo.engine.core.scheduler import ScheduledSeq
        from fp8_turbo.engine.core.sequence import Sequence
        from fp8_turbo.engine.sampling.params import SamplingParams

        engine = llm.engine
        self.net, self.kv_caches = engine.model, engine.runner.kv_caches
        self.block_index = 0
        self.inputs: list[torch.Tensor] = []  # per window: [L, hidden] at the current block's input
        self._meta: dict[int, tuple] = {}  # window length -> (meta, cos, sin)
        self._seqs = []
        for ids in windows:
            if len(ids) not in self._meta:
                seq = Sequence(f"calib-{len(ids)}", 0, list(ids), SamplingParams(max_tokens=1))
                engine.block_manager.allocate(seq, len(ids))
                self._seqs.append((engine.block_manager, seq))
                input_ids, meta, _ = engine.runner.prepare([ScheduledSeq(seq, len(ids))])
                cos, sin = self.net.rotary(meta.positions, self.net.embed_tokens.weight.dtype)
                self._meta[len(ids)] = (meta, cos, sin)
            ids_t = torch.tensor(ids, dtype=torch.int64, device=self.net.embed_tokens.weight.device)
            self.inputs.append(self.net.embed_tokens(ids_t))

    @property
    def tokens(self) -> int:
        return sum(x.shape[0] for x in self.inputs)

    def _run_block(self, x: torch.Tensor) -> torch.Tensor:
        meta, cos, sin = self._meta[x.shape[0]]
        i = self.block_index
        return self.net.layers[i](x, cos, sin, meta, self.kv_caches[i])

    @torch.inference_mode()
    def collect(self, modules: list[Linear], sample_tokens: int, advance: bool = False) -> dict[str, ActivationStats]:
        """Run the current block over every window, collecting the input statistics of `modules`; with
        `advance`, its outputs become the next block's inputs in the same pass (the block unchanged)."""
        per_call = -(-sample_tokens // max(len(self.inputs), 1)) if sample_tokens else 0
        collector = StatsCollector(modules, per_call)
        try:
            outputs = [self._run_block(x) for x in self.inputs]
        finally:
            stats = collector.close()
        if advance:
            self.inputs = outputs
            self.block_index += 1
        return stats

    @torch.inference_mode()
    def advance(self) -> None:
        """Replace the hidden states by the current block's outputs and move to the next block."""
        self.inputs = [self._run_block(x) for x in self.inputs]
        self.block_index += 1

    def release(self) -> None:
        for manager, seq in self._seqs:
            manager.free(seq)
        self._seqs = []
        self.inputs = []


@torch.inference_mode()
def collect_all(llm, windows: list[list[int]], sample_tokens: int, log=print) -> dict[str, ActivationStats]:
    """Statistics of every decoder Linear's input in one pass of the unquantized model (non-sequential
    calibration: each block sees the unquantized model's activations). Several recipes can share them:
    a method never changes them (smoothing derives scaled copies). Holds every block's Hessians at once
    (~1 GB for SmolLM2-135M in fp64), so it is meant for small models and recipe sweeps."""
    runner = BlockRunner(llm, windows)
    stats: dict[str, ActivationStats] = {}
    try:
        for i, block in enumerate(llm.engine.model.layers):
            stats.update(runner.collect([m for m in block.modules() if isinstance(m, Linear)], sample_tokens,
                                        advance=True))
            log(f"statistics of block {i + 1}/{len(llm.engine.model.layers)}")
    finally:
        runner.release()
    return stats


@torch.inference_mode()
def calibrate_input_scales(model: str, tokens: int = 2048, window: int = 512, corpus: str | None = None) -> dict[str, torch.Tensor]:
    """Static per-tensor activation scales (amax / 448 of each linear layer's input over the corpus),
    keyed by fused module name, for an fp8-tensor checkpoint with static input_scale."""
    from fp8_turbo.engine.lab.accuracy import KV_OPTIONS, sequence_logits
    from fp8_turbo.engine.lab.corpora import corpus_text, corpus_windows
    from fp8_turbo.engine.llm import LLM
    from fp8_turbo.kernels.fp8 import compute_scale

    llm = LLM(model, quantization="none", **KV_OPTIONS)
    amax: dict[str, torch.Tensor] = {}

    def hook(m, inputs, out):
        a = inputs[0].detach().abs().amax().float()
        amax[m.name] = torch.maximum(amax.get(m.name, a), a)

    handles = [m.register_forward_hook(hook) for m in llm.engine.model.modules() if isinstance(m, Linear)]
    try:
        for ids in corpus_windows(llm.tokenizer, corpus_text(corpus), min(window, tokens), tokens):
            sequence_logits(llm, ids)
    finally:
        for h in handles:
            h.remove()
    return {name: compute_scale(a.reshape(1)) for name, a in amax.items()}
