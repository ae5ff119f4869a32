"""Accuracy of FP8 schemes against the unquantized model, on the same tokens.

Per configuration (a scheme plus its ignore list): perplexity, mean KL(base || quant) of the next-token
distributions, top-1 agreement with the base model's argmax, and per-layer SQNR of each quantized
linear layer's output (forward hooks: the layer's FP8 output vs the same input through the layer's
unquantized weight, so it measures that layer's own error). A sensitivity sweep quantizes one linear
layer at a time (all others unquantized) and ranks layers by the KL it alone causes; the top of that
ranking is what an `ignore` list should keep in high precision.

Corpus: Python's bundled documentation (`pydoc_data.topics`) or any text file, cut into windows of
`window` tokens; each window is one prefill through the engine's own model (paged KV cache).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.model.linear import Linear

DEFAULT_SCHEMES = ("fp8", "fp8-tensor", "fp8-block", "fp8-weight-only")


@dataclass(slots=True)
class EvalResult:
    label: str
    scheme: str
    ignore: list[str]
    tokens: int  # predicted tokens
    ppl: float
    ppl_delta_pct: float = 0.0
    kl: float = 0.0
    top1: float = 1.0
    hp_linear_bytes: int = 0  # decoder linear weights kept in high precision (bf16 bytes)
    linear_bytes: int = 0  # all decoder linear weights at this config (fp8 = 1 byte, bf16 = 2)
    sqnr_db: dict[str, float] = field(default_factory=dict)


def corpus_text(path: str | Path | None = None) -> str:
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_windows(tokenizer, text: str, window: int, max_tokens: int) -> list[list[int]]:
    """Consecutive, non-overlapping windows of `window` tokens, at most `max_tokens` in all."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    ids = tokenizer.encode(text, add_special_tokens=False)
    n = min(len(ids), max_tokens) // window
    if n == 0:
        raise ValueError(f"corpus has {len(ids)} tokens; need at least one window of {window} (max_tokens={max_tokens})")
    return [ids[i * window:(i + 1) * window] for i in range(n)]


def sequence_logits(llm, ids: list[int]) -> torch.Tensor:
    """Logits at every position of `ids`, [len(ids), V] fp32, from one prefill through the paged cache."""
    from engine.sampling.params import SamplingParams
    from engine.core.scheduler import ScheduledSeq
    from engine.core.sequence import Sequence

    engine = llm.engine
    seq = Sequence("eval", 0, ids, SamplingParams(max_tokens=1, prompt_logprobs=0))
    seq.prompt_logprobs.append(None)
    engine.block_manager.allocate(seq, len(ids))
    try:
        out = engine.runner.run([ScheduledSeq(seq, len(ids))])
    finally:
        engine.block_manager.free(seq)
    _, rows = out.prompt_logits[seq.seq_id]
    return torch.cat([rows, out.sample_logits])


class _Stats:
    """Running sums over predicted tokens of one configuration."""

    def __init__(self):
        self.nll = self.kl = 0.0
        self.agree = self.n = 0

    def add(self, base_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # row i predicts token i + 1
        self.nll -= logp.gather(1, targets[:, None]).sum().item()
        self.kl += (base_logp.exp() * (base_logp - logp)).sum().item()
        self.agree += (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        self.n += targets.numel()


class SqnrProbe:
    """Forward hooks on quantized Linears: 10*log10(|ref|^2 / |out - ref|^2) with ref = F.linear(input,
    unquantized weight). `base_weights`: Linear name -> (weight, bias) of the unquantized model."""

    def __init__(self, model: torch.nn.Module, base_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]]):
        self.sig: dict[str, float] = {}
        self.err: dict[str, float] = {}
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, Linear) and m.scheme != "none"]
        self.base = base_weights

    def _hook(self, m: Linear, inputs, out) -> None:
        w, b = self.base[m.name]
        ref = torch.nn.functional.linear(inputs[0], w, b).float()
        self.sig[m.name] = self.sig.get(m.name, 0.0) + ref.pow(2).sum().item()
        self.err[m.name] = self.err.get(m.name, 0.0) + (out.float() - ref).pow(2).sum().item()

    def close(self) -> dict[str, float]:
        for h in self.handles:
            h.remove()
        return {n: 10 * math.log10(self.sig[n] / max(self.err[n], 1e-30)) for n in self.sig}


def linear_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of decoder linear weights kept in bf16, bytes of all decoder linear weights) at 1 byte per
    FP8 weight and 2 per bf16 weight; lm_head and embeddings are not counted."""
    hp = total = 0
    for m in model.modules():
        if isinstance(m, Linear) and m.name != "lm_head":
            n = m.in_features * m.out_features
            hp += 0 if m.scheme != "none" else 2 * n
            total += n if m.scheme != "none" else 2 * n
    return hp, total


def _base_weights(model) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return {m.name: (m.weight.data, m.bias.data if m.bias is not None else None)
            for m in model.modules() if isinstance(m, Linear)}


@torch.inference_mode()
def evaluate(model: str, configs: list[tuple[str, str, tuple[str, ...]]], windows: list[list[int]] | None = None, *,
             corpus: str | None = None, tokens: int = 16384, window: int = 512, sqnr_windows: int = 1,
             log=print) -> tuple[list[EvalResult], list[list[int]]]:
    """configs: (label, scheme, ignore patterns). Returns one EvalResult per config, base first."""
    from engine.llm import LLM

    kv = dict(device="cpu", kv_cache_memory_bytes=64 << 20, max_num_batched_tokens=max(2048, window))
    base = LLM(model, quantization="none", **kv)
    if windows is None:
        windows = corpus_windows(base.tokenizer, corpus_text(corpus), window, tokens)
    llms = {label: LLM(model, quantization=scheme, quantization_ignore=ignore, **kv) for label, scheme, ignore in configs}
    base_w = _base_weights(base.engine.model)
    stats = {label: _Stats() for label in ["none", *llms]}
    probes = {label: SqnrProbe(llm.engine.model, base_w) for label, llm in llms.items()}
    sqnr: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    for i, ids in enumerate(windows):
        targets = torch.tensor(ids[1:])
        base_logits = sequence_logits(base, ids)
        base_logp = torch.log_softmax(base_logits[:-1], dim=-1)
        stats["none"].add(base_logp, base_logits, targets)
        for label, llm in llms.items():
            stats[label].add(base_logp, sequence_logits(llm, ids), targets)
            if i + 1 == sqnr_windows:
                sqnr[label] = probes.pop(label).close()
        log(f"window {i + 1}/{len(windows)} done ({time.perf_counter() - t0:.0f}s)")
    for label, probe in probes.items():
        sqnr[label] = probe.close()
    base_ppl = math.exp(stats["none"].nll / stats["none"].n)
    results = []
    for label, scheme, ignore in [("none", "none", ()), *configs]:
        s = stats[label]
        m = base.engine.model if label == "none" else llms[label].engine.model
        hp, total = linear_bytes(m)
        ppl = math.exp(s.nll / s.n)
        results.append(EvalResult(label, scheme, list(ignore), s.n, ppl, 100 * (ppl / base_ppl - 1), s.kl / s.n,
                                  s.agree / s.n, hp, total, sqnr.get(label, {})))
    return results, windows


@torch.inference_mode()
def sensitivity_sweep(model: str, windows: list[list[int]], scheme: str = "fp8", log=print) -> list[dict]:
    """Quantize one linear layer at a time (everything else unquantized); rank by KL(base || quant).

    Layers before the quantized one compute exactly what the base model computes, so each run starts
    from the cached input of its decoder block (about half the work of a full forward)."""
    from engine.llm import LLM

    llm = LLM(model, quantization="none", device="cpu", kv_cache_memory_bytes=64 << 20,
              max_num_batched_tokens=max(2048, len(windows[0])))
    net = llm.engine.model
    linears = [m for m in net.modules() if isinstance(m, Linear) and m.name != "lm_head"]
    block_of = {m.name: int(m.name.split(".")[2]) for m in linears}
    cached = [_BlockCache(llm, ids) for ids in windows]
    results = []
    t0 = time.perf_counter()
    for j, m in enumerate(linears):
        s = _Stats()
        with quantize_only(m, scheme):
            for c in cached:
                s.add(c.base_logp, c.logits_from(block_of[m.name]), c.targets)
        results.append({"layer": m.name, "kl": s.kl / s.n, "top1": s.agree / s.n, "nll_delta": (s.nll - sum(c.base_nll for c in cached)) / s.n})
        if (j + 1) % 10 == 0:
            log(f"sweep {j + 1}/{len(linears)} ({time.perf_counter() - t0:.0f}s)")
    for c in cached:
        c.release()
    return sorted(results, key=lambda r: -r["kl"])


@contextmanager
def quantize_only(m: Linear, scheme: str):
    """Temporarily quantize one unquantized Linear with `scheme` (restores its weight afterwards)."""
    assert m.scheme == "none", f"{m.name} is already quantized ({m.scheme})"
    weight = m.weight
    m.scheme = scheme
    try:
        m.finalize()
        yield m
    finally:
        m.scheme, m.weight, m.weight_fp8, m.weight_scale = "none", weight, None, None


class _BlockCache:
    """One window prefilled once through the base model, keeping each decoder block's input."""

    def __init__(self, llm, ids: list[int]):
        from engine.sampling.params import SamplingParams
        from engine.core.scheduler import ScheduledSeq
        from engine.core.sequence import Sequence

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


def to_json(results: list[EvalResult], sweep: list[dict] | None, meta: dict) -> dict:
    return {"meta": meta, "results": [asdict(r) for r in results], "sweep": sweep or []}


def to_markdown(results: list[EvalResult], sweep: list[dict] | None, meta: dict, top: int = 12) -> str:
    lines = [f"Model `{meta['model']}`, corpus {meta['corpus']}, {meta['tokens']} predicted tokens in windows of "
             f"{meta['window']}; {meta.get('machine', '')}", "",
             "| config | scheme | ppl | Δppl % | KL(base‖q) | top-1 agree | min SQNR dB (layer) | bf16 linear MB | linear MB |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        worst = min(r.sqnr_db.items(), key=lambda kv: kv[1]) if r.sqnr_db else None
        w = f"{worst[1]:.1f} ({worst[0]})" if worst else "-"
        lines.append(f"| {r.label} | {r.scheme} | {r.ppl:.3f} | {r.ppl_delta_pct:+.2f} | {r.kl:.4f} | {100 * r.top1:.2f}% "
                     f"| {w} | {r.hp_linear_bytes / 1e6:.1f} | {r.linear_bytes / 1e6:.1f} |")
    if sweep:
        lines += ["", f"Sensitivity sweep ({meta.get('sweep_scheme', 'fp8')}, one layer quantized at a time, "
                  f"{meta.get('sweep_tokens')} tokens): top {top}", "",
                  "| rank | layer | KL(base‖q) | top-1 agree | Δnll/token |", "|---:|---|---:|---:|---:|"]
        for i, r in enumerate(sweep[:top]):
            lines.append(f"| {i + 1} | {r['layer']} | {r['kl']:.5f} | {100 * r['top1']:.2f}% | {r['nll_delta']:+.5f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[EvalResult], sweep: list[dict] | None, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(13 if sweep else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    q = [r for r in results if r.label != "none"]
    ax.bar([r.label for r in q], [r.ppl_delta_pct for r in q], color="tab:blue", label="Δppl %")
    ax2 = ax.twinx()
    ax2.plot([r.label for r in q], [100 * r.top1 for r in q], "o-", color="tab:red", label="top-1 agree %")
    ax.set_ylabel("perplexity increase (%)")
    ax2.set_ylabel("top-1 agreement (%)")
    ax.tick_params(axis="x", rotation=30)
    ax.set_title("FP8 schemes vs unquantized")
    if sweep:
        ax = axes[0][1]
        top = sweep[:20]
        ax.barh([r["layer"].replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "") for r in top][::-1],
                [r["kl"] for r in top][::-1], color="tab:orange")
        ax.set_xlabel("KL(base || quant) with only this layer quantized")
        ax.set_title("Most sensitive layers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.inference_mode()
def calibrate_input_scales(model: str, tokens: int = 2048, window: int = 512, corpus: str | None = None) -> dict[str, torch.Tensor]:
    """Static per-tensor activation scales (amax / 448 of each linear layer's input over the corpus),
    keyed by fused module name, for an fp8-tensor checkpoint with static input_scale."""
    from engine.llm import LLM
    from kernels.fp8 import compute_scale

    llm = LLM(model, quantization="none", device="cpu", kv_cache_memory_bytes=64 << 20,
              max_num_batched_tokens=max(2048, window))
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
