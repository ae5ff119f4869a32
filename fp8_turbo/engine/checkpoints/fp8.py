"""Pre-quantized FP8 checkpoints: detect, load into the fused model, and write (compressed-tensors).

Formats read (config.json `quantization_config`):
- compressed-tensors (`quant_method: compressed-tensors`, `format: float-quantized`): one config group
  targeting Linear; weights strategy tensor | channel | block (128x128); input activations none
  (weight-only), dynamic token, dynamic group of 128, or tensor (dynamic, or static `input_scale`);
  `ignore` holds module names or `re:` regexes. Tensors: `weight` (F8_E4M3), `weight_scale`, `input_scale`.
- transformers `fp8` (`weight_block_size: [128, 128]`, dynamic activations): `weight_scale_inv` per block.
- `fbgemm_fp8`: row-wise `weight_scale`, dynamic per-token activations, `modules_to_not_convert`.

Every format maps to one of our Linear schemes by its activation quantization (token -> fp8-w8a8,
tensor -> fp8-tensor, group -> fp8-block, none -> fp8-weight-only) and runs that scheme on every
backend (a W8A8 checkpoint stays W8A8 where `quantization="fp8"` alone would pick weight-only); the
weight keeps the checkpoint's own scales. Fused layers (q/k/v -> qkv_proj, gate/up -> gate_up_proj) get one scale tensor built from
the shard scales *exactly*, never by requantizing:
- per-tensor shard scales that differ become a per-row scale [N, 1] (each row repeats its shard's scale);
- per-channel scales are concatenated;
- 128x128 block scales are concatenated when every shard boundary falls on a block boundary; otherwise
  each block row is repeated per weight row, giving a per-row-group scale [N, ceil(K/128)] (exact; the
  CPU path runs it; fp8_gemm on CUDA accepts it only once the kernel exposes that layout).
Static input scales of fused shards see the same input: the largest one is used (as vLLM does).
"""
from __future__ import annotations

import fnmatch
import json
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fp8_turbo.engine.checkpoints.source import iter_checkpoint_tensors, read_hf_config, resolve_model
from fp8_turbo.engine.model.config import ModelConfig
from fp8_turbo.engine.model.linear import DEFAULT_IGNORE, Linear, QuantConfig
from fp8_turbo.kernels.fp8 import FP8_DTYPE, dequantize_fp8, expand_scale, quantize_weight

logger = logging.getLogger("fp8_turbo")

BLOCK = 128
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SCALE_LEAVES = ("weight_scale", "weight_scale_inv", "input_scale")
SKIPPED_LEAVES = ("input_scale_ub", "k_scale", "v_scale", "output_scale")  # not used (yet): see docstring
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.json", "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")
# our scheme -> (compressed-tensors weight strategy, input activation strategy or None)
# (the schemes a checkpoint can hold: finer group / MXFP8 weight scales are not written yet)
CT_STRATEGIES = {"fp8-w8a8": ("channel", "token"), "fp8-tensor": ("tensor", "tensor"),
                 "fp8-block": ("block", "group"), "fp8-weight-only": ("channel", None)}
_ACT_TO_SCHEME = {"token": "fp8-w8a8", "tensor": "fp8-tensor", "group": "fp8-block", None: "fp8-weight-only"}


class Fp8CheckpointError(ValueError):
    """A pre-quantized checkpoint whose config or tensors this engine cannot load exactly."""


@dataclass(slots=True, frozen=True)
class Fp8Checkpoint:
    """What a checkpoint's quantization_config says, in our terms."""

    method: str  # "compressed-tensors" | "fp8" | "fbgemm_fp8"
    scheme: str  # our Linear scheme
    ignore: tuple[str, ...]  # fused module names the checkpoint keeps in high precision
    scale_leaf: str  # "weight_scale" | "weight_scale_inv"
    static_input: bool  # per-tensor activations with the checkpoint's input_scale

    def quant_config(self, requested: QuantConfig) -> QuantConfig:
        """The checkpoint decides the scheme and its ignore list replaces our default one; patterns the
        user adds beyond the default keep more layers in high precision (their FP8 weights are
        dequantized exactly)."""
        if requested.scheme not in ("none", self.scheme) and not requested.is_alias:
            logger.warning("checkpoint is pre-quantized as %s (%s); ignoring quantization=%r",
                           self.scheme, self.method, requested.scheme)
        extra = tuple(p for p in requested.ignore if p not in DEFAULT_IGNORE)
        return QuantConfig(self.scheme, tuple(dict.fromkeys((*self.ignore, *extra))), requested.device,
                           f"checkpoint ({self.method})")


# ---------------------------------------------------------------------------------------- detect


def linear_names(cfg: ModelConfig) -> list[str]:
    """HF (unfused) names of every linear module of a Llama model."""
    names = [f"model.layers.{i}.{'self_attn' if p in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{p}"
             for i in range(cfg.num_layers) for p in LINEAR_SUFFIXES]
    return names + ["lm_head"]


def fused_name(hf_name: str) -> str:
    head, _, leaf = hf_name.rpartition(".")
    for fused, shards in FUSED_SHARDS.items():
        if leaf in shards:
            return f"{head}.{fused}"
    return hf_name


def shard_names(name: str) -> list[str]:
    """Fused module name -> the HF module names stored in the checkpoint."""
    head, _, leaf = name.rpartition(".")
    return [f"{head}.{s}" for s in FUSED_SHARDS[leaf]] if leaf in FUSED_SHARDS else [name]


def _fused_ignore(cfg: ModelConfig, is_ignored) -> tuple[str, ...]:
    """Fused names of ignored modules; all shards of a fused layer must agree."""
    by_fused: dict[str, set[bool]] = {}
    for name in linear_names(cfg):
        by_fused.setdefault(fused_name(name), set()).add(bool(is_ignored(name)))
    mixed = sorted(f for f, v in by_fused.items() if len(v) > 1)
    if mixed:
        raise Fp8CheckpointError(f"quantization_config ignores only some shards of fused layers {mixed[:3]}: "
                                 "q/k/v and gate/up must be all quantized or all ignored")
    ignored = [f for f, v in by_fused.items() if True in v]
    if cfg.tie_word_embeddings and "lm_head" not in ignored:
        ignored.append("lm_head")  # lm_head is the embedding matrix, stored unquantized
    return tuple(ignored)


def detect(hf_config: dict, cfg: ModelConfig) -> Fp8Checkpoint | None:
    """The checkpoint's FP8 format, or None for an unquantized checkpoint. Unsupported settings raise."""
    qc = hf_config.get("quantization_config") or hf_config.get("compression_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _detect_compressed_tensors(qc, cfg)
    if method == "fp8":
        return _detect_transformers_fp8(qc, cfg)
    if method == "fbgemm_fp8":
        ignore = _fused_ignore(cfg, lambda n: any(k in n for k in qc.get("modules_to_not_convert") or ()))
        if qc.get("activation_scale_ub") is not None:
            logger.info("fbgemm_fp8: activation_scale_ub=%s is not applied (per-token scales are unclamped)",
                        qc["activation_scale_ub"])
        return Fp8Checkpoint("fbgemm_fp8", "fp8-w8a8", ignore, "weight_scale", False)
    raise Fp8CheckpointError(f"quantization_config.quant_method={method!r} is not supported; "
                             "supported: 'compressed-tensors', 'fp8', 'fbgemm_fp8'")


def _detect_transformers_fp8(qc: dict, cfg: ModelConfig) -> Fp8Checkpoint:
    block = qc.get("weight_block_size")
    if list(block or []) != [BLOCK, BLOCK]:
        raise Fp8CheckpointError(f"fp8 checkpoint: weight_block_size={block!r}; supported: [128, 128]")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise Fp8CheckpointError(f"fp8 checkpoint: activation_scheme={qc.get('activation_scheme')!r}; supported: 'dynamic'")
    ignore = _fused_ignore(cfg, lambda n: any(k in n for k in qc.get("modules_to_not_convert") or ()))
    return Fp8Checkpoint("fp8", "fp8-block", ignore, "weight_scale_inv", False)


def _detect_compressed_tensors(qc: dict, cfg: ModelConfig) -> Fp8Checkpoint:
    fmt = qc.get("format")
    if fmt != "float-quantized":
        raise Fp8CheckpointError(f"compressed-tensors: format={fmt!r}; supported: 'float-quantized'")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or "Linear" not in (groups[0].get("targets") or []):
        raise Fp8CheckpointError(f"compressed-tensors: need exactly one config group targeting 'Linear', got {len(groups)}")
    weights, acts = groups[0].get("weights") or {}, groups[0].get("input_activations")
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise Fp8CheckpointError(f"compressed-tensors: weights type={weights.get('type')!r} num_bits="
                                 f"{weights.get('num_bits')!r}; supported: float, 8 (FP8 e4m3)")
    w_strategy = weights.get("strategy")
    if w_strategy not in ("tensor", "channel", "block"):
        raise Fp8CheckpointError(f"compressed-tensors: weight strategy={w_strategy!r}; supported: tensor, channel, block")
    if w_strategy == "block" and list(weights.get("block_structure") or []) != [BLOCK, BLOCK]:
        raise Fp8CheckpointError(f"compressed-tensors: block_structure={weights.get('block_structure')!r}; supported: [128, 128]")
    a_strategy, static = None, False
    if acts:
        a_strategy, static = acts.get("strategy"), not acts.get("dynamic", True)
        if acts.get("type", "float") != "float" or acts.get("num_bits", 8) != 8:
            raise Fp8CheckpointError("compressed-tensors: input activations must be 8-bit float")
        if a_strategy not in ("token", "tensor", "group"):
            raise Fp8CheckpointError(f"compressed-tensors: input activation strategy={a_strategy!r}; supported: token, tensor, group")
        if a_strategy == "group" and acts.get("group_size") != BLOCK:
            raise Fp8CheckpointError(f"compressed-tensors: activation group_size={acts.get('group_size')!r}; supported: 128")
        if static and a_strategy != "tensor":
            raise Fp8CheckpointError(f"compressed-tensors: static activations need strategy 'tensor', got {a_strategy!r}")
    if qc.get("kv_cache_scheme"):
        logger.warning("compressed-tensors: kv_cache_scheme is not applied; KV-cache scales stay 1.0")
    patterns = list(qc.get("ignore") or [])

    def is_ignored(name: str) -> bool:
        return any(re.match(p[3:], name) if p.startswith("re:") else fnmatch.fnmatchcase(name, p) for p in patterns)

    return Fp8Checkpoint("compressed-tensors", _ACT_TO_SCHEME[a_strategy], _fused_ignore(cfg, is_ignored),
                         "weight_scale", static)


# ---------------------------------------------------------------------------------------- load


class Fp8Loader:
    """Sits between the checkpoint stream and `load_weights`.

    `filter()` keeps the scale tensors and passes every weight on as stored: an e4m3 weight stays e4m3,
    and `load_weights` fuses and shape-checks it into a parameter allocated in e4m3 on the device when
    its first shard arrives (1 byte per weight, never the model in high precision: the peak is the FP8
    weights plus the tensor in flight). A layer kept in high precision receives the e4m3 values upcast
    (exact in fp32, bf16 and fp16). `install()` then gives each Linear its fused scale.
    """

    def __init__(self, spec: Fp8Checkpoint, cfg: ModelConfig):
        self.spec, self.cfg = spec, cfg
        self.scales: dict[tuple[str, str], torch.Tensor] = {}  # (HF module, leaf) -> fp32 scale
        self.fp8_modules: set[str] = set()

    def filter(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            module, _, leaf = name.rpartition(".")
            if leaf in SCALE_LEAVES:
                self.scales[(module, leaf)] = tensor.float()
            elif leaf in SKIPPED_LEAVES:
                continue
            elif leaf == "weight" and tensor.dtype == FP8_DTYPE:
                self.fp8_modules.add(module)
                yield name, tensor
            else:
                yield name, tensor

    def install(self, model: torch.nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, Linear):
                self._install_one(m)

    def _install_one(self, m: Linear) -> None:
        shards = shard_names(m.name)
        is_fp8 = [s in self.fp8_modules for s in shards]
        if not any(is_fp8):
            if m.name not in self.spec.ignore and m.scheme != "none":
                raise Fp8CheckpointError(f"{m.name}: quantization_config says it is quantized, "
                                         f"but the checkpoint stores its weight in {m.weight.dtype}, not F8_E4M3")
            return
        if not all(is_fp8):
            raise Fp8CheckpointError(f"{m.name}: shards {shards} mix F8_E4M3 and high-precision weights")
        leaf = self.spec.scale_leaf
        missing = [s for s in shards if (s, leaf) not in self.scales]
        if missing:
            raise Fp8CheckpointError(f"{m.name}: F8_E4M3 weight without {leaf} for {missing}")
        q = m.weight.data
        rows = m.part_sizes if len(shards) > 1 else [m.out_features]  # this rank's rows of each shard
        try:
            scale = fuse_scales([self.scales[(s, leaf)] for s in shards], rows, m.in_features)
        except ValueError as e:
            raise Fp8CheckpointError(f"{m.name}: {e}") from e
        if _has_nan(q) or not torch.isfinite(scale).all() or (scale <= 0).any():
            raise Fp8CheckpointError(f"{m.name}: NaN/Inf in the F8_E4M3 weight or a non-positive/non-finite {leaf}")
        if m.scheme == "none":  # kept in high precision (user ignore): dequantize exactly
            m.weight.data.copy_(dequantize_fp8(q.float(), scale.to(q.device)).to(q.dtype))
            return
        m.set_fp8_weight(q.to(FP8_DTYPE), scale.to(q.device))
        if self.spec.static_input:
            inputs = [self.scales.get((s, "input_scale")) for s in shards]
            if any(s is None for s in inputs):
                raise Fp8CheckpointError(f"{m.name}: static activation scheme but no input_scale for {shards}")
            m.input_scale = torch.stack([s.reshape(()) for s in inputs]).max().reshape(1).to(q.device)


def _has_nan(q: torch.Tensor) -> bool:
    """NaN in an e4m3 weight (e4m3fn has no inf; NaN is S.1111.111), or NaN/inf in an upcast one, checked
    without a high-precision copy of the whole weight."""
    if q.dtype == FP8_DTYPE:
        return bool(((q.view(torch.uint8) & 0x7F) == 0x7F).any())
    return not bool(torch.isfinite(q).all())


def fuse_scales(scales: list[torch.Tensor], rows: list[int], cols: int) -> torch.Tensor:
    """One exact scale for shards stacked along rows (see the module docstring). Raises ValueError."""
    norm = []
    for s, r in zip(scales, rows):
        s = s.float()
        if s.numel() == 1:
            norm.append(("tensor", s.reshape(1)))
        elif s.dim() <= 2 and s.numel() == r and (s.dim() == 1 or s.shape[-1] == 1):
            norm.append(("channel", s.reshape(r, 1)))
        else:
            expand_scale(s, r, cols, BLOCK)  # raises for a layout that fits nothing
            norm.append(("block", s.reshape(-1, s.shape[-1])))
    kinds = {k for k, _ in norm}
    if len(norm) == 1:
        return norm[0][1]
    if kinds == {"tensor"} and all(torch.equal(s, norm[0][1]) for _, s in norm):
        return norm[0][1]
    if "block" not in kinds:  # per-tensor and per-channel shards -> per-row, exact
        return torch.cat([s.expand(r, 1) for (_, s), r in zip(norm, rows)])
    if kinds != {"block"}:
        raise ValueError(f"shards mix block scales with other layouts: {[k for k, _ in norm]}")
    if all(r % BLOCK == 0 for r in rows[:-1]):
        return torch.cat([s for _, s in norm])  # [ceil(N/128), ceil(K/128)]
    return torch.cat([s.repeat_interleave(BLOCK, dim=0)[:r] for (_, s), r in zip(norm, rows)])  # [N, Kb]


# ---------------------------------------------------------------------------------------- write


def _ct_args(strategy: str | None, *, dynamic: bool, weights: bool) -> dict | None:
    """One compressed-tensors QuantizationArgs dict, with every field llm-compressor writes."""
    if strategy is None:
        return None
    return {"actorder": None, "block_structure": [BLOCK, BLOCK] if strategy == "block" else None,
            "dynamic": dynamic, "group_size": BLOCK if strategy == "group" else None, "num_bits": 8,
            "observer": "minmax" if weights else None, "observer_kwargs": {}, "strategy": strategy,
            "symmetric": True, "type": "float"}


def compressed_tensors_config(scheme: str, ignore: list[str], static_input: bool = False) -> dict:
    """The quantization_config vLLM reads for our scheme (as llm-compressor writes FP8 models)."""
    if scheme not in CT_STRATEGIES:
        raise ValueError(f"scheme must be one of {tuple(CT_STRATEGIES)}, got {scheme!r}")
    w_strategy, a_strategy = CT_STRATEGIES[scheme]
    if static_input and a_strategy != "tensor":
        raise ValueError(f"static input scales need scheme 'fp8-tensor', got {scheme!r}")
    return {
        "config_groups": {"group_0": {
            "input_activations": _ct_args(a_strategy, dynamic=not static_input, weights=False),
            "output_activations": None, "targets": ["Linear"], "format": "float-quantized",
            "weights": _ct_args(w_strategy, dynamic=False, weights=True)}},
        "format": "float-quantized", "ignore": ignore, "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed",
    }


def quantized_tensors(tensors: Iterator[tuple[str, torch.Tensor]], quant: QuantConfig,
                      scale_leaf: str = "weight_scale",
                      input_scales: dict[str, torch.Tensor] | None = None,
                      weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                      hp_tensors: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors -> the same tensors with each quantized linear weight replaced by an e4m3 weight,
    its fp32 scale (and a static input_scale when given). Each HF module is quantized on its own, as
    llm-compressor does; `quant.applies_to` is asked with both the HF and the fused module name.

    Calibrated checkpoints (engine.lab.recipe) bring their own results: `weights` maps each quantized HF
    module to its (e4m3 weight, scale), written as given; `hp_tensors` replaces high-precision tensors
    by name (norm weights with smoothing folded in), stored in the source tensor's dtype, which must hold
    them exactly."""
    w_gran = CT_STRATEGIES[quant.scheme][0]
    hp_left = dict(hp_tensors or {})
    for name, t in tensors:
        module, _, leaf = name.rpartition(".")
        is_linear = leaf == "weight" and (module == "lm_head" or module.rpartition(".")[2] in LINEAR_SUFFIXES)
        if not (is_linear and quant.applies_to(module) and quant.applies_to(fused_name(module))):
            yield name, _replacement(name, t, hp_left.pop(name)) if name in hp_left else t
            continue
        if weights is not None:
            if module not in weights:
                raise ValueError(f"{name}: quantized by the config, but the calibrated weights have no entry for {module}")
            w_fp8, scale = weights[module]
            if w_fp8.dtype != FP8_DTYPE or tuple(w_fp8.shape) != tuple(t.shape):
                raise ValueError(f"{name}: calibrated weight is {w_fp8.dtype} {tuple(w_fp8.shape)}, "
                                 f"expected {FP8_DTYPE} {tuple(t.shape)}")
            scale = scale.float()
        else:
            try:
                w_fp8, scale = quantize_weight(t, w_gran, BLOCK)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from e
        yield name, w_fp8
        yield f"{module}.{scale_leaf}", scale.reshape(1) if scale.numel() == 1 else scale
        if input_scales is not None:
            yield f"{module}.input_scale", input_scales[fused_name(module)].float().reshape(1).clone()
    if hp_left:
        raise ValueError(f"hp_tensors names not in the checkpoint (or quantized): {sorted(hp_left)[:4]}")


def _replacement(name: str, source: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`new` in the dtype of the tensor it replaces; refuses a value that dtype cannot hold exactly."""
    if tuple(new.shape) != tuple(source.shape):
        raise ValueError(f"{name}: replacement has shape {tuple(new.shape)}, the checkpoint {tuple(source.shape)}")
    out = new.to(source.dtype)
    if not torch.equal(out.to(new.dtype), new):
        raise ValueError(f"{name}: the replacement is not exactly representable in {source.dtype}")
    return out


def save_quantized(model: str, out: str | Path, scheme: str = "fp8", ignore: tuple[str, ...] = DEFAULT_IGNORE,
                   input_scales: dict[str, torch.Tensor] | None = None, *,
                   weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                   hp_tensors: dict[str, torch.Tensor] | None = None, recipe: dict | None = None,
                   device: torch.device | str | None = None) -> Path:
    """Write `model` (an HF dir, .gguf file or model id) as a compressed-tensors FP8 checkpoint in `out`:
    config.json with quantization_config, tokenizer files, model.safetensors with F8_E4M3 weights,
    fp32 scales and unfused HF names. "fp8" is written as the scheme it means on `device` (None: this
    machine's default device; engine.model.schemes.fp8_scheme). `input_scales` (fused module name ->
    amax / 448) makes the fp8-tensor activations static. `weights` / `hp_tensors`: a calibrated result
    (see `quantized_tensors`); `recipe` is recorded in the safetensors metadata (`fp8_turbo_recipe`)."""
    from safetensors.torch import save_file

    from fp8_turbo.tokenizer import load_tokenizer

    source = resolve_model(model)
    hf_config = read_hf_config(source)
    if hf_config.get("quantization_config"):
        raise ValueError(f"{model} is already quantized ({hf_config['quantization_config'].get('quant_method')})")
    cfg = ModelConfig.from_hf_dict(hf_config)
    if cfg.tie_word_embeddings:  # lm_head is the embedding matrix: stored once, unquantized
        ignore = (*ignore, "lm_head")
    quant = QuantConfig(scheme, ignore, device).for_model(cfg.num_layers)
    if quant.scheme == "none":
        raise ValueError("save_quantized: scheme 'none' writes nothing quantized; pick an fp8 scheme")
    if quant.scheme not in CT_STRATEGIES:
        raise ValueError(f"save_quantized: scheme {quant.scheme!r} cannot be written as a checkpoint yet; "
                         f"writable: {tuple(CT_STRATEGIES)} (or 'fp8')")
    scheme = quant.scheme
    ignored = [n for n in linear_names(cfg) if not (quant.applies_to(n) and quant.applies_to(fused_name(n)))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = dict(quantized_tensors(iter_checkpoint_tensors(source), quant, input_scales=input_scales,
                                   weights=weights, hp_tensors=hp_tensors))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    metadata = {"format": "pt"}
    if recipe is not None:
        metadata["fp8_turbo_recipe"] = json.dumps(recipe, sort_keys=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata=metadata)
    hf_config = dict(hf_config, quantization_config=compressed_tensors_config(scheme, ignored, input_scales is not None))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if source.kind == "hf":
        for name in TOKENIZER_FILES:
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, out / name)
    else:  # GGUF: transformers rebuilt the tokenizer from the file's vocabulary
        load_tokenizer(source.path).hf.save_pretrained(str(out))
    return out
