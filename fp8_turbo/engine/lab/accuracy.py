"""Accuracy of FP8 configurations against the unquantized model, on held-out text.

A configuration is a scheme, its ignore list and optional calibration methods (engine.lab.recipe);
methods are calibrated on one corpus and every configuration is scored on another
(engine.lab.corpora: Python's docs for calibration, the standard library's docstrings for scoring,
or the user's files). Per configuration, over the scored windows:
- perplexity and its change against the unquantized model;
- KL(base || quant) of the next-token distributions: mean and 99th percentile over tokens (linear
  interpolation, as llama.cpp's perplexity tool prints its "99.0% KLD");
- top-1 agreement: share of positions where both models' argmax agree;
- same top token: llama.cpp's "Same top p" (`llama-perplexity --kl-divergence`): the same agreement
  counted only on the second half of each window, where every token has at least window/2 tokens of
  context, with its standard error sqrt(p (1 - p) / (n - 1)); llama.cpp also swaps each chunk's first
  token for BOS, which this does not;
- per-layer SQNR of each quantized Linear's output on the first window (forward hooks: the layer's
  FP8 output against the same input through its unquantized weight, the calibrated model's own
  high-precision weight when smoothing changed it), so it measures that layer's own error.

Each window is one prefill through the engine's own model (paged KV cache). The base model's
log-probabilities are computed once and kept on disk, so configurations are built and scored one
at a time (one quantized model in memory). A progress bar with an ETA goes to stderr.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from fp8_turbo.engine.lab.corpora import CALIBRATION_CORPUS, SCORING_CORPUS, corpus_text, corpus_windows, heldout_text
from fp8_turbo.engine.model.linear import DEFAULT_IGNORE, Linear

DEFAULT_SCHEMES = ("fp8", "fp8-tensor", "fp8-block", "fp8-weight-only")
# Every configuration keeps the embedding and a high-precision lm_head in the model's dtype
# (lm_head_dtype="model"; "auto" stores them in bf16 for FP8 on CPU), so rows differ only in their
# decoder linear layers, and a calibrated model (loaded unquantized, then quantized) matches its peers.
KV_OPTIONS = dict(device="cpu", kv_cache_memory_bytes=64 << 20, enable_prefix_caching=False, lm_head_dtype="model")


@dataclass(slots=True)
class EvalConfig:
    """One configuration to score: `LLM(model, quantization=scheme, quantization_ignore=ignore)`, or,
    with `methods`, the model calibrated by engine.lab.recipe (what `fp8-turbo quantize` writes)."""

    label: str
    scheme: str
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    methods: tuple[str, ...] = ()
    sequential: bool = True  # see engine.lab.recipe.Recipe; False shares one statistics pass

    @classmethod
    def of(cls, c) -> "EvalConfig":
        """An EvalConfig from itself or a (label, scheme, ignore[, methods]) tuple."""
        return c if isinstance(c, cls) else cls(c[0], c[1], tuple(c[2]), tuple(c[3]) if len(c) > 3 else ())


@dataclass(slots=True)
class EvalResult:
    label: str
    scheme: str
    ignore: list[str]
    tokens: int  # predicted tokens
    ppl: float
    ppl_delta_pct: float = 0.0
    kl: float = 0.0  # mean KL(base || quant) per token
    top1: float = 1.0
    hp_linear_bytes: int = 0  # decoder linear weights kept in high precision (bf16 bytes)
    linear_bytes: int = 0  # all decoder linear weights at this config (fp8 = 1 byte, bf16 = 2)
    sqnr_db: dict[str, float] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    kl_p99: float = 0.0
    same_top: float = 1.0  # llama.cpp "Same top p" (second half of each window)
    same_top_se: float = 0.0
    calib_seconds: float = 0.0
    sequential: bool = True


def sequence_logits(llm, ids: list[int]) -> torch.Tensor:
    """Logits at every position of `ids`, [len(ids), V] fp32, from one prefill through the paged cache."""
    from fp8_turbo.engine.sampling.params import SamplingParams
    from fp8_turbo.engine.core.scheduler import ScheduledSeq
    from fp8_turbo.engine.core.sequence import Sequence

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


class TokenStats:
    """Running sums over the predicted tokens of one configuration."""

    def __init__(self):
        self.nll = 0.0
        self.agree = self.n = 0
        self.same = self.same_n = 0
        self.kls: list[torch.Tensor] = []

    def add(self, base_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """base_logp [L-1, V]: the base model's log-probabilities; logits [L, V]: this config's."""
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # row i predicts token i + 1
        self.nll -= logp.gather(1, targets[:, None]).sum().item()
        self.kls.append((base_logp.exp() * (base_logp - logp)).sum(-1))
        agree = base_logp.argmax(-1) == logp.argmax(-1)
        self.agree += agree.sum().item()
        self.n += targets.numel()
        half = logits.shape[0] // 2  # llama.cpp scores positions [n_ctx/2, n_ctx - 1)
        self.same += agree[half:].sum().item()
        self.same_n += agree[half:].numel()

    @property
    def kl(self) -> torch.Tensor:
        return torch.cat(self.kls) if self.kls else torch.zeros(0)

    def result(self, label: str, scheme: str, ignore, base_nll_per_token: float, model, **extra) -> EvalResult:
        ppl = math.exp(self.nll / self.n)
        kl = self.kl.double()
        p = self.same / max(self.same_n, 1)
        hp, total = linear_bytes(model)
        return EvalResult(label, scheme, list(ignore), self.n, ppl, 100 * (ppl / math.exp(base_nll_per_token) - 1),
                          kl.mean().item(), self.agree / self.n, hp, total, kl_p99=torch.quantile(kl, 0.99).item(),
                          same_top=p, same_top_se=math.sqrt(p * (1 - p) / max(self.same_n - 1, 1)), **extra)


class SqnrProbe:
    """Forward hooks on quantized Linears: 10*log10(|ref|^2 / |out - ref|^2) with ref = F.linear(input,
    unquantized weight). `reference`: Linear name -> (weight, bias) of the unquantized layer."""

    def __init__(self, model: torch.nn.Module, reference: dict[str, tuple[torch.Tensor, torch.Tensor | None]]):
        self.sig: dict[str, float] = {}
        self.err: dict[str, float] = {}
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, Linear) and m.scheme != "none"]
        self.reference = reference

    def _hook(self, m: Linear, inputs, out) -> None:
        w, b = self.reference[m.name]
        ref = torch.nn.functional.linear(inputs[0], w, b).float()
        self.sig[m.name] = self.sig.get(m.name, 0.0) + ref.pow(2).sum().item()
        self.err[m.name] = self.err.get(m.name, 0.0) + (out.float() - ref).pow(2).sum().item()

    def close(self) -> dict[str, float]:
        for h in self.handles:
            h.remove()
        self.handles = []
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


def _weights(model) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return {m.name: (m.weight.data, m.bias.data if m.bias is not None else None)
            for m in model.modules() if isinstance(m, Linear)}


def build_config(model: str, config: EvalConfig, calib_windows: list[list[int]] | None, log=print, stats=None):
    """The LLM of one configuration, and its CalibrationResult when it has methods (else None).
    `stats`: shared statistics (engine.lab.calibration.collect_all) for non-sequential configs."""
    from fp8_turbo.engine.llm import LLM

    if not config.methods:
        return LLM(model, quantization=config.scheme, quantization_ignore=config.ignore, **KV_OPTIONS), None
    from fp8_turbo.engine.lab.recipe import Recipe, calibrate

    if not calib_windows:
        raise ValueError(f"{config.label}: methods {config.methods} need calibration windows")
    llm = LLM(model, quantization="none", **KV_OPTIONS)
    recipe = Recipe(config.scheme, config.ignore, config.methods, sequential=config.sequential)
    calib = calibrate(llm, calib_windows, recipe, keep_reference=True, stats=stats, log=log)
    return llm, calib


@torch.inference_mode()
def evaluate(model: str, configs: list, windows: list[list[int]] | None = None, *, corpus: str | None = None,
             tokens: int = 16384, window: int = 512, calib_windows: list[list[int]] | None = None,
             calib_corpus: str | None = None, calib_tokens: int = 4096, sqnr_windows: int = 1, log=print,
             progress: bool = True, on_result=None) -> tuple[list[EvalResult], list[list[int]]]:
    """configs: EvalConfigs or (label, scheme, ignore[, methods]) tuples. Scores on `windows` (default:
    `tokens` of the held-out corpus); methods calibrate on `calib_windows` (default: `calib_tokens` of
    the calibration corpus). Returns one EvalResult per config, the unquantized model first.
    `on_result(result)` is called as each result is ready (a long run keeps what it finished)."""
    from fp8_turbo.engine.llm import LLM

    configs = [EvalConfig.of(c) for c in configs]
    base = LLM(model, quantization="none", **KV_OPTIONS)
    if windows is None:
        windows = corpus_windows(base.tokenizer, heldout_text(corpus), window, tokens)
    if calib_windows is None and any(c.methods for c in configs):
        calib_windows = corpus_windows(base.tokenizer, corpus_text(calib_corpus), window, calib_tokens)
    layers = base.engine.model_config.num_layers
    share = any(c.methods and not c.sequential for c in configs)
    total = len(windows) * (1 + len(configs)) + layers * (sum(bool(c.methods) for c in configs) + share)
    bar = tqdm(total=total, desc="eval", unit="step", file=sys.stderr, disable=not progress, smoothing=0.1)
    targets = [torch.tensor(ids[1:]) for ids in windows]
    results = []
    with tempfile.TemporaryDirectory(prefix="fp8turbo-eval-") as tmp:
        base_stats = TokenStats()
        for i, ids in enumerate(windows):
            logits = sequence_logits(base, ids)
            logp = torch.log_softmax(logits[:-1], dim=-1)
            torch.save(logp, Path(tmp) / f"{i}.pt")
            base_stats.add(logp, logits, targets[i])
            bar.set_postfix_str("none")
            bar.update()
        base_nll = base_stats.nll / base_stats.n
        results.append(base_stats.result("none", "none", (), base_nll, base.engine.model))
        if on_result is not None:
            on_result(results[-1])
        base_w = _weights(base.engine.model)
        shared = None
        if share:  # one statistics pass of the unquantized model for every non-sequential config
            from fp8_turbo.engine.lab.calibration import collect_all

            bar.set_postfix_str("calibration statistics")
            t0 = time.perf_counter()
            shared = collect_all(base, calib_windows, 512, log=lambda msg: bar.update())
            log(f"calibration statistics of {len(calib_windows)} windows in {time.perf_counter() - t0:.0f}s")
        for config in configs:
            bar.set_postfix_str(config.label)

            def step(msg: str) -> None:
                bar.update()

            t0 = time.perf_counter()
            llm, calib = build_config(model, config, calib_windows, log=step,
                                      stats=shared if config.methods and not config.sequential else None)
            calib_seconds = time.perf_counter() - t0 if calib is not None else 0.0
            reference = dict(base_w)
            if calib is not None:
                reference.update({n: (w, base_w[n][1]) for n, w in calib.reference.items()})
            probe = SqnrProbe(llm.engine.model, reference)
            stats, sqnr = TokenStats(), {}
            for i, ids in enumerate(windows):
                stats.add(torch.load(Path(tmp) / f"{i}.pt"), sequence_logits(llm, ids), targets[i])
                if i + 1 == sqnr_windows:
                    sqnr = probe.close()
                bar.update()
            sqnr = sqnr or probe.close()
            results.append(stats.result(config.label, config.scheme, config.ignore, base_nll, llm.engine.model,
                                        sqnr_db=sqnr, methods=list(config.methods), calib_seconds=calib_seconds,
                                        sequential=config.sequential))
            r = results[-1]
            if on_result is not None:
                on_result(r)
            log(f"{config.label}: ppl {r.ppl:.3f} ({r.ppl_delta_pct:+.2f}%), KL {r.kl:.4f} (p99 {r.kl_p99:.4f}), "
                f"top-1 {100 * r.top1:.2f}%, same top {100 * r.same_top:.2f}%")
            del llm, calib, reference, probe
    bar.close()
    return results, windows


def corpus_meta(corpus: str | None, calib_corpus: str | None) -> dict:
    return {"corpus": corpus or SCORING_CORPUS, "calib_corpus": calib_corpus or CALIBRATION_CORPUS,
            "python": sys.version.split()[0]}


@torch.inference_mode()
def calibrate_input_scales(model: str, tokens: int = 2048, window: int = 512, corpus: str | None = None) -> dict[str, torch.Tensor]:
    """Static per-tensor activation scales (amax / 448 of each linear layer's input over the corpus),
    keyed by fused module name, for an fp8-tensor checkpoint with static input_scale."""
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
