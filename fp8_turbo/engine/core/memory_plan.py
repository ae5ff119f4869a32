"""Where a GPU's memory goes: weights, the activation peak of one step, the CUDA context and graphs, and
the KV cache that fills the rest; from that, how many tokens and concurrent sequences fit.

`plan_memory` estimates everything from the config alone (the model built on the meta device: no
memory, no GPU), for `fp8-turbo plan --model DIR --gpu-memory-gb 141`. On a GPU the engine measures
instead (fp8_turbo/engine/core/llm_engine.py): weights as allocated after loading, the activation peak of a
warm-up forward of `max_num_batched_tokens` tokens, and what the device reports free after emptying
torch's cache, and prints the same table at start-up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8_turbo.engine.core.kv_cache import kv_bytes_per_token
from fp8_turbo.engine.model.config import ModelConfig
from fp8_turbo.engine.model.linear import Linear, QuantConfig
from fp8_turbo.engine.model.model import LlamaModel

GiB = 1 << 30
CUDA_RESERVE_BYTES = GiB  # CUDA context, cuBLAS workspace, captured decode graphs (not in torch's counters)


@dataclass(slots=True)
class MemoryPlan:
    gpu_bytes: int  # the device's memory
    utilization: float  # share of it the engine may use
    weight_bytes: int
    activation_bytes: int  # peak of one step's transient tensors (prefill of max_num_batched_tokens)
    reserved_bytes: int  # CUDA context, workspaces, graphs
    kv_bytes_per_token: int
    block_size: int
    max_model_len: int
    measured: bool  # True: read off the GPU; False: estimated from the config

    @property
    def kv_bytes(self) -> int:
        budget = int(self.gpu_bytes * self.utilization) - self.weight_bytes - self.activation_bytes - self.reserved_bytes
        return max(0, budget)

    @property
    def kv_tokens(self) -> int:
        blocks = self.kv_bytes // (self.kv_bytes_per_token * self.block_size)
        return blocks * self.block_size

    def max_concurrent_seqs(self, seq_len: int | None = None) -> int:
        """Sequences of `seq_len` tokens (default max_model_len) whose KV fits at once."""
        return self.kv_tokens // max(1, seq_len or self.max_model_len)

    def table(self) -> str:
        rows = [("GPU memory", self.gpu_bytes), (f"usable ({self.utilization:.0%})", int(self.gpu_bytes * self.utilization)),
                ("weights", self.weight_bytes), ("activation peak", self.activation_bytes),
                ("CUDA context, graphs", self.reserved_bytes), ("KV cache", self.kv_bytes)]
        how = "measured" if self.measured else "estimated"
        lines = [f"memory plan ({how})", "| | GiB |", "|---|---:|"]
        lines += [f"| {name} | {value / GiB:.2f} |" for name, value in rows]
        lines.append(f"KV: {self.kv_bytes_per_token / 1024:.0f} KiB per token -> {self.kv_tokens:,} tokens; "
                     f"concurrent sequences of {self.max_model_len} tokens: {self.max_concurrent_seqs()}, "
                     f"of 4096: {self.max_concurrent_seqs(4096)}")
        return "\n".join(lines)


def weight_bytes(model: LlamaModel, dtype: torch.dtype) -> int:
    """Bytes the weights take once loaded: e4m3 + fp32 scales for quantized Linears, `dtype` for the rest
    (works on a model built on the meta device)."""
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    linear_params = set()
    for m in model.modules():
        if isinstance(m, Linear) and m.scheme != "none":
            n, k = m.out_features, m.in_features
            g = m.spec.group
            scale_bytes = {"channel": 4 * n, "tensor": 4, "block": 4 * -(-n // 128) * -(-k // 128),
                           "group": 4 * n * -(-k // g), "mx": n * -(-k // g)}[m.weight_granularity]
            total += n * k + scale_bytes
            linear_params.add(id(m.weight))
    for p in model.parameters():  # deduplicated: a tied lm_head counts once
        if id(p) not in linear_params:
            total += p.numel() * item
    return total


def activation_bytes(cfg: ModelConfig, num_tokens: int, num_seqs: int, dtype: torch.dtype) -> int:
    """Peak of one forward of `num_tokens` tokens (`num_seqs` of them sampled) plus the sampler, at the
    widest point: the MLP (gate/up output, silu * up, its e4m3 copy) beside the residual stream and the
    attention input, then fp32 logits with the sampler's few full-vocabulary temporaries."""
    item = torch.empty((), dtype=dtype).element_size()
    hidden = num_tokens * cfg.hidden_size * item * 4  # x, h, the norm output, the attention output
    mlp = num_tokens * cfg.intermediate_size * (2 * item + item + 1 + 4)  # gate_up, silu*up, e4m3, scales slack
    qkv = num_tokens * (cfg.q_size + 2 * cfg.kv_size) * item
    logits = num_seqs * cfg.vocab_size * 4 * 4  # logits + softmax/sort/mask temporaries in fp32
    return hidden + max(mlp, qkv) + logits


def plan_memory(cfg: ModelConfig, quant: QuantConfig, *, gpu_bytes: int, utilization: float = 0.9,
                dtype: torch.dtype = torch.bfloat16, kv_dtype: torch.dtype = torch.bfloat16, block_size: int = 16,
                max_num_batched_tokens: int = 2048, max_num_seqs: int = 64, max_model_len: int | None = None) -> MemoryPlan:
    """Estimate the plan from the config: the model is built on the meta device (no memory)."""
    with torch.device("meta"):
        model = LlamaModel(cfg, quant).to(dtype)
    return MemoryPlan(
        gpu_bytes=gpu_bytes, utilization=utilization, weight_bytes=weight_bytes(model, dtype),
        activation_bytes=activation_bytes(cfg, max_num_batched_tokens, max_num_seqs, dtype),
        reserved_bytes=CUDA_RESERVE_BYTES,
        kv_bytes_per_token=kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype),
        block_size=block_size, max_model_len=min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings),
        measured=False,
    )
