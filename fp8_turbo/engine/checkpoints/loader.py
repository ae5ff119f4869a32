"""Stream a checkpoint's tensors into a `LlamaModel`.

Tensors (from fp8_turbo/engine/checkpoints/source.py) are read one at a time and copied into preallocated
(fused) parameters, so the model is never held twice in memory; pre-quantized FP8 checkpoints go
through fp8_turbo/engine/checkpoints/fp8.py. A tensor-parallel rank reads only its slice of each tensor (the
layers say which: fp8_turbo/engine/model/parallel.py), so no rank ever holds the whole model.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fp8_turbo.engine.checkpoints.fp8 import Fp8Loader, detect
from fp8_turbo.engine.checkpoints.source import CheckpointError, ModelSource, iter_checkpoint_tensors, read_hf_config
from fp8_turbo.engine.model.config import ModelConfig
from fp8_turbo.engine.model.linear import Linear, QuantConfig
from fp8_turbo.engine.model.model import LlamaModel, RotaryEmbedding
from fp8_turbo.engine.model.parallel import TensorParallel, VocabParallelEmbedding, check_tensor_parallel, shard_selector
from fp8_turbo.kernels.fp8 import FP8_DTYPE

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_LOAD_MMAP_THRESHOLD = 64 << 10
_RUN_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold


@contextmanager
def _host_memory_returned():
    """Loading frees one high-precision weight per layer as it is quantized. glibc keeps freed blocks
    below its mmap threshold in the heap, and raises that threshold each time a large block is freed,
    so without this the process keeps (and its RSS peaks at) nearly every freed weight. While loading,
    blocks above 64 KiB are mmapped and go back to the OS when freed; afterwards a fixed 32 MiB
    threshold (the top of glibc's dynamic range) and a trim. A no-op without glibc."""
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    if libc is None or not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _RUN_MMAP_THRESHOLD)
        libc.malloc_trim(0)


# HF name suffix -> (fused parameter suffix, shard index); shards are stacked along dim 0.
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


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
            # a quantized Linear of a pre-quantized checkpoint keeps the stored e4m3 (1 byte per weight)
            fp8 = tensor.dtype == FP8_DTYPE and isinstance(modules[owner], Linear) and modules[owner].scheme != "none"
            dtype = FP8_DTYPE if fp8 else param.dtype
            param = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False)
            setattr(modules[owner], leaf, param)
            params[target] = param
        owner = modules[target.rpartition(".")[0]]
        if shard is None:
            dst = param.data
        else:  # this part's rows of the fused parameter (this rank's rows under tensor parallelism)
            sizes = owner.part_sizes
            dst = param.data[sum(sizes[:shard]) : sum(sizes[: shard + 1])]
        if isinstance(owner, VocabParallelEmbedding) or owner is model.lm_head:
            # the last rank's vocabulary shard runs past the vocabulary: zero rows
            dst[tensor.shape[0]:].zero_()
            dst = dst[: tensor.shape[0]]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(dst.shape)}")
        dst.copy_(tensor)
        filled[target] = filled.get(target, 0) + 1
        if stream_quantize and isinstance(owner, Linear) and target.endswith(".weight") and filled[target] == _num_shards(target):
            owner.finalize()
            if owner.weight is None:  # only the e4m3 copy stays: let the high-precision one go now
                params[target] = owner.weight_fp8
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


def build_model(source: ModelSource, cfg: ModelConfig, quant: QuantConfig, device: torch.device, dtype: torch.dtype,
                tp: TensorParallel | None = None) -> LlamaModel:
    """Build on the meta device (no memory), allocate once on `device`, then stream weights in.

    A pre-quantized FP8 checkpoint (engine.checkpoints.fp8) decides the scheme itself and brings its
    own e4m3 weights and scales; other checkpoints are quantized here by `Linear.finalize()`.
    With `tp`, this rank's shard is built and read; every rank of the group must call this together
    (FP8 scales that span ranks are max-reduced while loading)."""
    tp = tp or TensorParallel()
    fp8_spec = detect(read_hf_config(source), cfg) if source.kind == "hf" else None
    if fp8_spec is not None:
        quant = fp8_spec.quant_config(quant)
    check_tensor_parallel(cfg, tp.size, quant.scheme)
    with torch.device("meta"):
        model = LlamaModel(cfg, quant, tp).to(dtype)
    # Allocate everything now except the weights of quantized Linears: those arrive one at a time in
    # load_weights, allocated on their first shard, and are quantized as soon as they are complete (ours)
    # or stay as stored, in e4m3 (a pre-quantized checkpoint's).
    for m in model.modules():
        deferred = isinstance(m, Linear) and m.scheme != "none"
        if not deferred:
            m.to_empty(device=device, recurse=False)
        elif m.bias is not None:
            m.bias = nn.Parameter(torch.empty(m.out_features, dtype=dtype, device=device), requires_grad=False)
    model.rotary = RotaryEmbedding(cfg).to(device)  # to_empty left its buffer uninitialized
    if cfg.attention_bias or cfg.mlp_bias:
        for m in model.modules():
            if isinstance(m, Linear) and m.bias is not None:
                m.bias.data.zero_()
    tensors = iter_checkpoint_tensors(source, shard_selector(model, _target_param) if tp.size > 1 else None)
    with _host_memory_returned():
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
