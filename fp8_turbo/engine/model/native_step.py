"""The forward of a LlamaModel on the CPU as one native call (fp8_turbo/kernels/cpu/step.py).

`native_step(model, input_ids)` gives the model's NativeStep, or None when the module path must run:
not on the CPU, the native step off or not built, tensor parallelism, a compute dtype other than fp32,
a layer or an embedding the step does not take (see `unsupported`), a forward hook or pre-hook on any
module (the module path calls them; the native step would skip them), or KV-scale calibration
observing a layer. The NativeStep reads the model's tensors once (it holds them: in-place changes are
seen) and is rebuilt when a module attribute changes (fp8_turbo/engine/model/module_version.py).
Its logits are bit-identical to the module path's on the same kernels (tests/test_cpu_step.py).
"""
from __future__ import annotations

import torch
from torch.nn.modules import module as torch_module

from fp8_turbo.engine.model.attention_metadata import AttentionMetadata
from fp8_turbo.engine.model.linear import Linear
from fp8_turbo.engine.model.module_version import model_version
from fp8_turbo.kernels.cpu import step as native
from fp8_turbo.kernels.cpu.gemm import selected_isa

def _activations(m: Linear) -> tuple[str | None, int, bool]:
    """(granularity, group along K, power-of-two scales) of a quantized layer's activations."""
    spec = getattr(m, "spec", None)  # the scheme table, where Linear has one
    if spec is not None:
        return spec.act, spec.group, spec.act_pow2
    return m.act_granularity, 128, False


def _linear(m: Linear):
    """The step's view of one linear layer (weights and activation handling as the module path's CPU
    kernels take them: Linear.forward's fp8_linear / dense_linear call)."""
    ext = native.extension()
    if m.scheme == "none":
        return ext.Linear(m.weight, None, native.ACT[None], None, m.bias, 128, False)
    act, group, pow2 = _activations(m)
    return ext.Linear(m.weight_fp8, m.weight_scale, native.ACT[act], m.input_scale, m.bias, group, pow2)


def unsupported(model) -> str | None:
    """Why the native step cannot run this model (None: it can)."""
    if not native.available():
        return "the native step is off (FP8_TURBO_NATIVE_STEP=0) or not built"
    if model.tp.size != 1:
        return "tensor parallelism"
    if model.dtype != torch.float32:
        return f"compute dtype {model.dtype} (the native step computes in fp32)"
    cfg = model.cfg
    if cfg.head_dim % 8:
        return f"head_dim {cfg.head_dim} (a multiple of 8)"
    for m in model.modules():
        if isinstance(m, Linear):
            if m.scheme == "none":
                if m.weight is None or m.weight.dtype not in (torch.float32, torch.bfloat16):
                    return f"{m.name}: weight dtype"
            elif _activations(m)[0] not in native.ACT:
                return f"{m.name}: activations {_activations(m)[0]}"
            elif m.weight_fp8 is None or m.weight is not None:
                return f"{m.name}: FP8 weights not on the CPU kernels"
            elif m.input_scale is not None and _activations(m)[0] != "tensor":
                return f"{m.name}: a static input scale with {m.scheme}"
        if getattr(m, "kv_observer", None) is not None:
            return "KV-scale calibration is observing the layers"
    emb = model.embed_tokens
    if emb.weight_fp8 is None and (emb.weight is None or emb.weight.dtype not in (torch.float32, torch.bfloat16)):
        return "embedding dtype"
    return None


class NativeStep:
    """One model's native step: its tensors as the C++ step holds them, the rotary tables and the bound
    KV caches. Call it as the model: (input_ids [T], meta, kv_caches) -> logits [len(logits_indices), V]."""

    def __init__(self, model):
        ext = native.extension()
        cfg = model.cfg
        layers = []
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            layers.append(ext.Layer(_linear(attn.qkv_proj), _linear(attn.o_proj), _linear(mlp.gate_up_proj),
                                    _linear(mlp.down_proj), block.input_layernorm.weight,
                                    block.post_attention_layernorm.weight))
        emb = model.embed_tokens
        if emb.weight_fp8 is not None:
            embed, embed_scale = emb.weight_fp8, emb.weight_scale
        else:
            embed, embed_scale = emb.weight, None
        self.model = model
        self.step = ext.Model(cfg.hidden_size, model.layers[0].self_attn.num_heads, model.num_kv_heads, cfg.head_dim,
                              mlp.intermediate_size, model.norm.eps, model.layers[0].self_attn.scale, embed,
                              embed_scale, model.norm.weight, _linear(model.lm_head), layers)
        self.kv_caches = None
        self.tables = None
        # every hook dict a forward would consult (they are mutated in place, never replaced)
        self.hook_dicts = [torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks]
        for m in model.modules():
            self.hook_dicts += [m._forward_hooks, m._forward_pre_hooks]

    def reserve(self, max_tokens: int, max_len: int) -> None:
        """Buffers for every step of up to `max_tokens` tokens over up to `max_len` keys, written now: the
        step's memory is taken at start-up rather than by the first large step (see `workspace_bytes`)."""
        self.step.reserve(max_tokens, max_len, torch.get_num_threads())

    def workspace_bytes(self) -> int:
        return self.step.workspace()[3]

    def hooked(self) -> bool:
        return any(self.hook_dicts)

    def __call__(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        if kv_caches is not self.kv_caches:
            attns = [block.self_attn for block in self.model.layers]
            self.step.set_kv([k for k, _ in kv_caches], [v for _, v in kv_caches], [a.k_scale for a in attns],
                             [a.v_scale for a in attns])
            self.kv_caches = kv_caches
        positions = meta.max_seq_len if meta.max_seq_len is not None else int(meta.seq_lens.max())
        tables = self.model.rotary.table(positions)
        if tables is not self.tables:
            self.step.set_rotary(*tables)
            self.tables = tables
        return self.step.step(input_ids, meta.positions, meta.slot_mapping, meta.block_tables, meta.seq_lens,
                              meta.cu_seqlens_q, meta.logits_indices, torch.get_num_threads(), selected_isa())


def native_step(model, input_ids: torch.Tensor) -> NativeStep | None:
    """The model's NativeStep for this call, or None (the module path runs): see the module docstring."""
    if input_ids.device.type != "cpu" or not native.enabled():
        return None
    version = model_version()
    cached = model.__dict__.get("_native_step")  # (version, NativeStep | None), kept outside nn.Module's attrs
    if cached is None or cached[0] != version:
        step = NativeStep(model) if unsupported(model) is None else None
        model.__dict__["_native_step"] = cached = (model_version(), step)
    step = cached[1]
    if step is None or step.hooked():
        return None
    return step


def reserve_native_step(model, max_tokens: int, max_len: int) -> int:
    """Reserve the CPU model's native step buffers for the engine's largest step (its token budget) and
    context; returns their bytes (0 where the module path runs)."""
    step = native_step(model, torch.empty(0, dtype=torch.long))
    if step is None:
        return 0
    step.reserve(max_tokens, max_len)
    return step.workspace_bytes()
