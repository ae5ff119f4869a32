"""Accuracy of FP8 configurations against the unquantized model, on held-out text.

A configuration is a scheme, its ignore list and optional calibration methods (engine.lab.recipe);
methods are calibrated on one corpus and every configuration is scored on others, each on its own
(engine.lab.corpora: Python's docs for calibration; the standard library's docstrings and license
texts, two other domains, for scoring; or the user's files). Per configuration and scored corpus:
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
at a time (one quantized model in memory). A configuration without methods quantizes the base
model's Linears in place (`quantized_in_place`: exactly what `LLM(quantization=scheme)` loads) and
restores them afterwards, so only calibrated ones load a model of their own. A progress bar with an
ETA goes to stderr.
"""
from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from fp8_turbo.engine.lab.corpora import CALIBRATION_CORPUS, SCORING_CORPUS, corpus_text, corpus_windows, named_text
from fp8_turbo.engine.lab.gptq import DEFAULT_DAMP
from fp8_turbo.engine.model.linear import DEFAULT_IGNORE, Linear, QuantConfig
from fp8_turbo.engine.model.schemes import resolve_scheme

DEFAULT_SCHEMES = ("fp8-w8a8", "fp8-tensor", "fp8-block", "fp8-weight-only")  # "fp8" is one of them per backend
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
    damp: float = DEFAULT_DAMP  # GPTQ damping (engine.lab.recipe.Recipe)

    @property
    def needs_data(self) -> bool:
        """Some method calibrates on text (engine.lab.recipe.DATA_FREE ones do not)."""
        from fp8_turbo.engine.lab.recipe import DATA_FREE

        return any(m not in DATA_FREE for m in self.methods)

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
    corpus: str = ""  # the scored corpus (engine.lab.corpora name or file)


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
        """`model`'s bytes go in the result; `extra`: further EvalResult fields."""
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
    FP8 weight plus its scales as stored (fp32, or one E8M0 byte each), and 2 per bf16 weight; lm_head
    and embeddings are not counted."""
    hp = total = 0
    for m in model.modules():
        if isinstance(m, Linear) and m.name != "lm_head":
            n = m.in_features * m.out_features
            if m.scheme == "none":
                hp += 2 * n
                total += 2 * n
            else:
                total += n + m.weight_scale.numel() * m.weight_scale.element_size()
    return hp, total


@contextlib.contextmanager
def quantize_only(m: Linear, scheme: str):
    """Temporarily quantize one unquantized Linear with `scheme` (restores its weight afterwards)."""
    assert m.scheme == "none", f"{m.name} is already quantized ({m.scheme})"
    weight = m.weight
    m.scheme = resolve_scheme(scheme, weight.device)  # "fp8": the backend's pick
    try:
        m.finalize()
        yield m
    finally:
        m.scheme, m.weight, m.weight_fp8, m.weight_scale = "none", weight, None, None


@contextlib.contextmanager
def quantized_in_place(llm, scheme: str, ignore: tuple[str, ...]):
    """The unquantized `llm` with every Linear that QuantConfig(scheme, ignore) quantizes quantized with
    amax scales, as LLM(quantization=scheme, quantization_ignore=ignore) loads them (the same
    Linear.finalize on the same weights); the model is restored on exit."""
    net = llm.engine.model
    quant = QuantConfig(scheme, ignore, llm.engine.device).for_model(net.cfg.num_layers)
    with contextlib.ExitStack() as stack:
        for m in net.modules():
            if isinstance(m, Linear) and quant.applies_to(m.name):
                stack.enter_context(quantize_only(m, quant.scheme))
        yield llm


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

    if not calib_windows and config.needs_data:
        raise ValueError(f"{config.label}: methods {config.methods} need calibration windows")
    llm = LLM(model, quantization="none", **KV_OPTIONS)
    recipe = Recipe(config.scheme, config.ignore, config.methods, sequential=config.sequential, damp=config.damp)
    calib = calibrate(llm, calib_windows, recipe, keep_reference=True, stats=stats, log=log)
    return llm, calib


def scored_windows(tokenizer, windows=None, corpus=None, corpora=None, window: int = 512,
                   tokens: int = 16384) -> dict[str, list[list[int]]]:
    """{corpus name: windows} to score: `windows` as given (named `corpus` or "given"), else `tokens` of
    each of `corpora` (names or files; default: the one `corpus`, or the standard-library docstrings)."""
    if windows is not None:
        return {corpus or "given": windows}
    names = list(corpora) if corpora else [corpus or SCORING_CORPUS]
    return {str(n): corpus_windows(tokenizer, named_text(n), window, tokens) for n in names}


@torch.inference_mode()
def evaluate(model: str, configs: list, windows: list[list[int]] | None = None, *, corpus: str | None = None,
             corpora: list[str] | None = None, tokens: int = 16384, window: int = 512,
             calib_windows: list[list[int]] | None = None, calib_corpus: str | None = None, calib_tokens: int = 4096,
             sqnr_windows: int = 1, log=print, progress: bool = True,
             on_result=None) -> tuple[list[EvalResult], dict[str, list[list[int]]]]:
    """configs: EvalConfigs or (label, scheme, ignore[, methods]) tuples. Scores on `windows` (named
    `corpus`), else on `tokens` of each of `corpora` (default: the held-out `corpus` alone);
    methods calibrate on `calib_windows` (default: `calib_tokens` of the calibration corpus). Returns one
    EvalResult per config and scored corpus (the unquantized model first; a config's corpora together,
    in `corpora` order) and the scored windows by corpus. `on_result(result)` is called as each result is
    ready (a long run keeps what it finished)."""
    from fp8_turbo.engine.llm import LLM

    configs = [EvalConfig.of(c) for c in configs]
    base = LLM(model, quantization="none", **KV_OPTIONS)
    scored = scored_windows(base.tokenizer, windows, corpus, corpora, window, tokens)
    if calib_windows is None and any(c.needs_data for c in configs):
        calib_windows = corpus_windows(base.tokenizer, corpus_text(calib_corpus), window, calib_tokens)
    layers = base.engine.model_config.num_layers
    share = any(c.needs_data and not c.sequential for c in configs)
    n_windows = sum(len(w) for w in scored.values())
    total = n_windows * (1 + len(configs)) + layers * (sum(bool(c.methods) for c in configs) + share)
    bar = tqdm(total=total, desc="eval", unit="step", file=sys.stderr, disable=not progress, smoothing=0.1)
    results = []

    def emit(r: EvalResult) -> None:
        results.append(r)
        if on_result is not None:
            on_result(r)

    with tempfile.TemporaryDirectory(prefix="fp8turbo-eval-") as tmp:
        base_nll = {}
        for c, wins in enumerate(scored.values()):
            stats = TokenStats()
            for i, ids in enumerate(wins):
                logits = sequence_logits(base, ids)
                logp = torch.log_softmax(logits[:-1], dim=-1)
                torch.save(logp, Path(tmp) / f"{c}-{i}.pt")
                stats.add(logp, logits, torch.tensor(ids[1:]))
                bar.set_postfix_str("none")
                bar.update()
            name = list(scored)[c]
            base_nll[name] = stats.nll / stats.n
            emit(stats.result("none", "none", (), base_nll[name], base.engine.model, corpus=name))
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
            t0 = time.perf_counter()
            with contextlib.ExitStack() as stack:
                if config.methods:
                    llm, calib = build_config(model, config, calib_windows, log=lambda msg: bar.update(),
                                              stats=shared if config.needs_data and not config.sequential else None)
                else:  # amax scales: the base model's Linears quantized in place, restored afterwards
                    llm, calib = stack.enter_context(quantized_in_place(base, config.scheme, config.ignore)), None
                calib_seconds = time.perf_counter() - t0 if calib is not None else 0.0
                reference = dict(base_w)
                if calib is not None:
                    reference.update({n: (w, base_w[n][1]) for n, w in calib.reference.items()})
                probe, sqnr = SqnrProbe(llm.engine.model, reference), {}
                for c, (name, wins) in enumerate(scored.items()):
                    stats = TokenStats()
                    for i, ids in enumerate(wins):
                        stats.add(torch.load(Path(tmp) / f"{c}-{i}.pt"), sequence_logits(llm, ids), torch.tensor(ids[1:]))
                        if c == 0 and i + 1 == sqnr_windows:
                            sqnr = probe.close()
                        bar.update()
                    sqnr = sqnr or probe.close()
                    r = stats.result(config.label, config.scheme, config.ignore, base_nll[name], llm.engine.model,
                                     sqnr_db=sqnr, methods=list(config.methods), calib_seconds=calib_seconds,
                                     sequential=config.sequential, corpus=name)
                    emit(r)
                    log(f"{config.label} on {name}: ppl {r.ppl:.3f} ({r.ppl_delta_pct:+.2f}%), KL {r.kl:.4f} "
                        f"(p99 {r.kl_p99:.4f}), top-1 {100 * r.top1:.2f}%, same top {100 * r.same_top:.2f}%")
                del llm, calib, reference, probe
    bar.close()
    return results, scored


def corpus_meta(corpus: str | None, calib_corpus: str | None, corpora: list[str] | None = None) -> dict:
    scored = list(corpora) if corpora else [corpus or SCORING_CORPUS]
    return {"corpus": ", ".join(map(str, scored)), "corpora": [str(c) for c in scored],
            "calib_corpus": calib_corpus or CALIBRATION_CORPUS, "python": sys.version.split()[0]}
