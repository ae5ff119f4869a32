"""Stream a checkpoint's tensors into a `LlamaModel`.

Tensors (from engine/checkpoints/source.py) are read one at a time and copied into preallocated
(fused) parameters, so the model is never held twice in memory; pre-quantized FP8 checkpoints go
through engine/checkpoints/fp8.py.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from engine.checkpoints.fp8 import Fp8Loader, detect
from engine.checkpoints.source import CheckpointError, ModelSource, iter_checkpoint_tensors, read_hf_config
from engine.model.config import ModelConfig
from engine.model.linear import Linear, QuantConfig
from engine.model.model import LlamaModel, RotaryEmbedding

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

    A pre-quantized FP8 checkpoint (engine.checkpoints.fp8) decides the scheme itself and brings its
    own e4m3 weights and scales; other checkpoints are quantized here by `Linear.finalize()`."""
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
