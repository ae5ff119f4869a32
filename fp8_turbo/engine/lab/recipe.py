"""A calibrated FP8 recipe: which methods run, and the driver that applies them block by block.

Methods (any combination, written "smooth+search+gptq"; "none" is plain amax scaling):
- `smooth`: SmoothQuant-style migration folded into norms / v / up (engine.lab.smoothquant);
- `search`: per-channel (or per-block) scale search on the output error (engine.lab.scale_search);
- `mse`: the same search on the weight's own squared error, no calibration data (instead of `search`);
- `gptq`: error-compensating rounding onto the e4m3 grid with the chosen scales (engine.lab.gptq).
They run in that order within each decoder block: smoothing changes the weights and the statistics
of their inputs, the scales are chosen for the smoothed weights, GPTQ rounds with those scales. By
default blocks are calibrated sequentially (engine.lab.calibration.BlockRunner): block i sees what
quantized blocks 0..i-1 produce. `sequential=False` takes every block's statistics from the unquantized
model instead (one pass, shareable between recipes: engine.lab.calibration.collect_all).

Each fused Linear (q/k/v, gate/up) gets one scale per stored HF shard, as `fp8-turbo quantize` writes
them, and is installed through the same `fuse_scales` the checkpoint loader uses: the calibrated
model in memory and its checkpoint loaded back are bit-identical. lm_head (when quantized at all) and
layers no method reaches get plain amax scaling.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fp8_turbo.engine.checkpoints.fp8 import fuse_scales, shard_names
from fp8_turbo.engine.lab.calibration import ActivationStats, BlockRunner, collect_all
from fp8_turbo.engine.lab.gptq import DEFAULT_DAMP, gptq_quantize
from fp8_turbo.engine.lab.scale_search import DEFAULT_RATIOS, search_scale
from fp8_turbo.engine.lab.smoothquant import DEFAULT_ALPHAS, fold, search_alpha, smoothing_pairs
from fp8_turbo.engine.model.linear import DEFAULT_IGNORE, QUANT_SCHEMES, SCHEMES, Linear, QuantConfig
from fp8_turbo.kernels.fp8 import FP8_DTYPE, expand_scale, quantize_weight, round_to_e4m3

METHODS = ("smooth", "search", "mse", "gptq")  # the order they run in
DATA_FREE = ("mse",)  # methods that need no calibration text
# `fp8-turbo quantize`'s default: what generalizes best to held-out text of other domains (bench/ACCURACY.md,
# Calibration). Scale search picks one of 18 scales per channel and barely over-fits its calibration text
# (output error vs amax, SmolLM2 weight-only: 0.58 on the tokens it saw, 0.66 / 0.76 on docstrings /
# licenses); GPTQ fits the calibration tokens (search+gptq at damping 0.01: 0.14 seen, 1.28 on licenses,
# worse than amax) and even at damping 0.1 only wins near the calibration domain (licenses perplexity
# +1.91% vs search's +0.91% at the same KL). LLM(quantization="fp8") quantizes at load time with amax scales.
DEFAULT_METHODS = ("search",)
DEFAULT_CALIBRATION_TOKENS = 16384  # 4096 before: GPTQ's Hessians over-fit fewer (scale search is indifferent)


def parse_methods(text: str) -> tuple[str, ...]:
    """"none" -> (); "gptq+smooth" -> ("smooth", "gptq") (canonical order). Raises ValueError."""
    parts = [p for p in text.replace(",", "+").split("+") if p]
    if parts == ["none"]:
        return ()
    bad = [p for p in parts if p not in METHODS]
    if bad or not parts or len(set(parts)) != len(parts) or {"search", "mse"} <= set(parts):
        raise ValueError(f"method {text!r}: use 'none' or a '+'-joined combination of {METHODS} "
                         "(search or mse, not both: each picks the scales)")
    return tuple(m for m in METHODS if m in parts)


def method_label(methods: tuple[str, ...]) -> str:
    return "+".join(methods) or "none"


@dataclass(slots=True)
class Recipe:
    """How to quantize: the scheme and ignore list of `LLM(...)`, plus calibration methods."""

    scheme: str = "fp8"
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    methods: tuple[str, ...] = ()
    ratios: tuple[float, ...] = DEFAULT_RATIOS  # scale search candidates (x amax / 448)
    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # SmoothQuant migration strengths tried
    damp: float = DEFAULT_DAMP  # GPTQ: H + damp * mean(diag H) * I (engine.lab.gptq)
    sample_tokens: int = 512  # activation rows kept per Linear for the alpha search
    sequential: bool = True  # statistics from the partly quantized model (True) or the unquantized one

    def __post_init__(self) -> None:
        if self.scheme not in QUANT_SCHEMES or self.scheme == "none":
            raise ValueError(f"scheme must be one of {QUANT_SCHEMES[1:]}, got {self.scheme!r}")
        if isinstance(self.methods, str):
            self.methods = parse_methods(self.methods)
        self.methods = tuple(m for m in METHODS if m in self.methods)
        self.ignore = tuple(self.ignore)
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")

    @property
    def needs_data(self) -> bool:
        return any(m not in DATA_FREE for m in self.methods)

    @property
    def label(self) -> str:
        return method_label(self.methods)


@dataclass(slots=True)
class QuantizedLinear:
    """An e4m3 weight [N, K] (fused) and one scale per stored shard (rows of each shard in `rows`)."""

    q: torch.Tensor
    scales: list[torch.Tensor]
    rows: list[int]

    def fused_scale(self) -> torch.Tensor:
        return fuse_scales(self.scales, self.rows, self.q.shape[1])


@dataclass(slots=True)
class CalibrationResult:
    recipe: Recipe
    weights: dict[str, QuantizedLinear]  # fused module name -> quantized weight
    hp_tensors: dict[str, torch.Tensor]  # HF tensor name -> changed high-precision tensor (folded norms, ...)
    alphas: dict[str, float | None] = field(default_factory=dict)  # "layers.i.pair" -> alpha (None: not smoothed)
    reference: dict[str, torch.Tensor] = field(default_factory=dict)  # fused name -> weight before rounding
    tokens: int = 0
    seconds: float = 0.0

    def hf_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """HF module name -> (e4m3 weight, scale) of every quantized shard, for the checkpoint writer."""
        out = {}
        for name, ql in self.weights.items():
            start = 0
            for shard, rows, scale in zip(shard_names(name), ql.rows, ql.scales):
                out[shard] = (ql.q[start:start + rows].cpu(), scale.cpu())
                start += rows
        return out


def quantize_linear(w: torch.Tensor, rows: list[int], granularity: str, stats: ActivationStats | None,
                    recipe: Recipe, group: int = 128) -> QuantizedLinear:
    """One (fused) weight [N, K] -> e4m3 with per-shard scales, by the recipe's weight methods
    (`group`: the K extent of "group" scales)."""
    w = w.float()
    k = w.shape[1]
    scales, start = [], 0
    for r in rows:
        shard = w[start:start + r]
        if stats is not None and "search" in recipe.methods:
            s = search_scale(shard, stats.hessian, granularity, recipe.ratios, group)
        elif "mse" in recipe.methods:
            s = search_scale(shard, None, granularity, recipe.ratios, group)
        else:
            s = quantize_weight(shard, granularity, group)[1]
        scales.append(s)
        start += r
    full = torch.cat([expand_scale(s, r, k).expand(r, k) for s, r in zip(scales, rows)])  # [N, K]
    if stats is not None and "gptq" in recipe.methods:
        q = gptq_quantize(w, stats.hessian, full, damp=recipe.damp)
    else:
        q = round_to_e4m3(w / full).to(FP8_DTYPE)
    return QuantizedLinear(q, scales, list(rows))


def _hf_tensor_name(producer, name: str, rows: slice | None) -> str:
    """HF tensor holding a fold's producer: a norm weight, or the v_proj / up_proj shard of a fused Linear."""
    if rows is None:
        return f"{name}.weight"
    shards, offsets, start = shard_names(name), [], 0
    for r in producer.part_sizes:
        offsets.append(start)
        start += r
    return f"{shards[offsets.index(rows.start)]}.weight"


@torch.inference_mode()
def calibrate(llm, windows: list[list[int]], recipe: Recipe, *, keep_reference: bool = False,
              stats: dict[str, ActivationStats] | None = None, log=print) -> CalibrationResult:
    """Quantize `llm` (loaded with quantization="none") in place by `recipe`, calibrating on `windows`
    (token id lists). Afterwards llm is the quantized model, as `LLM(checkpoint)` of its written checkpoint
    loads it (vocabulary matrices included). Plain amax ("none") needs no windows.
    Non-sequential recipes use `stats` (from collect_all on the same model) when given."""
    t0 = time.perf_counter()
    net = llm.engine.model
    cfg = net.cfg
    if net.tp.size != 1:
        raise ValueError(f"calibrate() runs on one device; got a tensor-parallel shard (size {net.tp.size})")
    ignore = (*recipe.ignore, "lm_head") if cfg.tie_word_embeddings else recipe.ignore  # a tied head stays
    quant = QuantConfig(recipe.scheme, ignore, llm.engine.device).for_model(cfg.num_layers)
    spec = SCHEMES[quant.scheme]
    w_gran, a_gran = spec.weight, spec.act
    result = CalibrationResult(recipe, {}, {})
    if recipe.needs_data and not recipe.sequential and stats is None:
        stats = collect_all(llm, windows, recipe.sample_tokens, log=lambda msg: None)
    runner = BlockRunner(llm, windows) if recipe.needs_data and recipe.sequential else None
    shared = stats if recipe.needs_data and not recipe.sequential else None
    quantized = [m.name for m in net.modules() if isinstance(m, Linear) and m.scheme != "none"]
    if quantized:
        raise ValueError(f"calibrate() needs a model loaded with quantization='none'; {quantized[0]} is quantized")

    def install(m: Linear, act_stats: ActivationStats | None) -> None:
        rows = m.part_sizes if len(shard_names(m.name)) > 1 else [m.out_features]
        if keep_reference:
            result.reference[m.name] = m.weight.data.clone()
        ql = quantize_linear(m.weight.data, rows, w_gran, act_stats, recipe, spec.group)
        result.weights[m.name] = ql
        m.scheme = quant.scheme
        m.set_fp8_weight(ql.q, ql.fused_scale())

    try:
        for i, block in enumerate(net.layers):
            linears = [m for m in block.modules() if isinstance(m, Linear) and quant.applies_to(m.name)]
            if shared is not None:
                block_stats = {m.name: shared[m.name] for m in linears}
            else:
                block_stats = runner.collect(linears, recipe.sample_tokens) if runner is not None and linears else {}
            if "smooth" in recipe.methods and a_gran is not None:
                for pair in smoothing_pairs(block):
                    if pair.consumer.name not in block_stats:
                        continue  # consumer kept in high precision: nothing to gain
                    alpha, s = search_alpha(pair, block_stats[pair.consumer.name], a_gran, w_gran, recipe.alphas,
                                            spec.group, spec.act_pow2)
                    result.alphas[f"layers.{i}.{pair.name}"] = alpha
                    if s is None:
                        continue
                    fold(pair, s)
                    block_stats[pair.consumer.name] = block_stats[pair.consumer.name].scaled(1 / s.cpu())
                    producer = f"model.layers.{i}.{pair.name.split('->')[0]}" if pair.rows is None else pair.producer.name
                    if pair.rows is None or not quant.applies_to(producer):
                        key = _hf_tensor_name(pair.producer, producer, pair.rows)
                        src = pair.producer.weight.data
                        result.hp_tensors[key] = (src if pair.rows is None else src[pair.rows]).to("cpu", copy=True)
            for m in linears:
                install(m, block_stats.get(m.name))
            if runner is not None:
                runner.advance()
            log(f"calibrated block {i + 1}/{len(net.layers)} ({recipe.label}, {time.perf_counter() - t0:.0f}s)")
        if quant.applies_to("lm_head"):
            install(net.lm_head, None)
        # the embedding and a high-precision lm_head as the engine stores them for a quantized model
        # (lm_head_dtype), so the calibrated model computes what its checkpoint loaded back computes
        engine = llm.engine
        net.store_vocab_matrices(engine.config.vocab_matrices_dtype(engine.device, net.is_quantized))
    finally:
        if runner is not None:
            result.tokens = runner.tokens
            runner.release()
        elif shared:
            result.tokens = next(iter(shared.values())).tokens
    result.seconds = time.perf_counter() - t0
    return result
