"""The Llama decoder, by hand: RMSNorm -> rotary -> Attention -> MLP -> Block -> Model.

Tokens of all sequences in a step are packed into one [T, hidden] batch; attention reads and writes
the paged KV cache through the kernels (`kernels.write_kv`, `kernels.paged_attention_*`), described
by an explicit `AttentionMetadata`. q/k/v and gate/up are fused at load time (`engine.checkpoints.loader`).
"""
from __future__ import annotations

import torch
from torch import nn

from fp8_turbo import kernels
from fp8_turbo.kernels.backend import use_triton
from fp8_turbo.kernels.cpu import ops as cpu_ops
from fp8_turbo.engine.model.attention_metadata import AttentionMetadata
from fp8_turbo.engine.model.config import ModelConfig, rope_inv_freq
from fp8_turbo.engine.model.linear import Linear, QuantConfig
from fp8_turbo.engine.model.module_version import Versioned
from fp8_turbo.engine.model.native_step import native_step
from fp8_turbo.engine.model.parallel import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, TensorParallel,
                                   VocabParallelEmbedding, attention_shard, split_evenly)

KVCache = tuple[torch.Tensor, torch.Tensor]  # k, v: [num_blocks, block_size, KVH, D] each
# How the embedding and a high-precision lm_head are stored (LlamaModel.store_vocab_matrices)
VOCAB_DTYPES = ("model", "bfloat16", "fp8")


def _fused_cpu(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Our fused CPU kernels (fp8_turbo/kernels/cpu/ops.py: one pass per row, batch-invariant) take this call;
    otherwise the torch code beside each hook runs (and is their reference)."""
    return not use_triton(x) and cpu_ops.supports(x, *others)


class RMSNorm(Versioned):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x); with a residual, (RMSNorm(x + residual), x + residual), the add fused on CPU."""
        if _fused_cpu(x, self.weight, *(() if residual is None else (residual,))):
            return cpu_ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            return self.forward(x), x
        # Normalize in fp32 then scale in the model dtype, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the "rotate half" convention of HF Llama checkpoints.

    On the CPU the values come from fp32 tables by position (`table`), grown on demand in pieces of
    _TABLE_PIECE positions: each piece is one vectorized torch cos/sin call, so a position's values never
    depend on how many tokens the step holds (an elementwise op's scalar tail may round differently),
    and the native step (native_step.py) reads the same tables."""

    _TABLE_PIECE = 256

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # CPU fp32 (cos, sin) [P, D]

    def _compute(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return emb.cos(), emb.sin()

    def table(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (cos, sin) [P, D] on the CPU with P >= positions (rows: positions 0..P-1)."""
        have = 0 if self._table is None else self._table[0].shape[0]
        if positions > have:
            size = max(positions, 2 * have, self._TABLE_PIECE)
            size = -(-size // self._TABLE_PIECE) * self._TABLE_PIECE
            pieces = [self._compute(torch.arange(p, p + self._TABLE_PIECE, device=self.inv_freq.device))
                      for p in range(have, size, self._TABLE_PIECE)]
            old = [] if self._table is None else [self._table]
            self._table = tuple(torch.cat([t[i] for t in old + pieces]).cpu() for i in range(2))
        return self._table

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, max_positions: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D] in `dtype`; `max_positions` bounds the positions (+1) when the caller knows it."""
        if positions.device.type == "cpu":
            if max_positions is None:
                max_positions = int(positions.max()) + 1 if positions.numel() else 0
            cos, sin = self.table(max_positions)
            return cos[positions].to(dtype), sin[positions].to(dtype)
        cos, sin = self._compute(positions)
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D]. On CPU x is rotated in place (the same bits as the torch code)."""
    if _fused_cpu(x, cos, sin):
        return cpu_ops.rotary_(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(Versioned):
    """This rank's heads (all of them without tensor parallelism: fp8_turbo/engine/model/parallel.py)."""

    def __init__(self, cfg: ModelConfig, quant: QuantConfig, prefix: str, tp: TensorParallel):
        super().__init__()
        shard = attention_shard(cfg, tp)
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = shard.num_heads * cfg.head_dim, shard.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, shard.qkv_parts(cfg), bias=cfg.attention_bias, quant=quant,
                                             name=f"{prefix}.qkv_proj", tp=tp)
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, bias=cfg.attention_bias, quant=quant,
                                        name=f"{prefix}.o_proj", tp=tp)
        # Per-layer FP8 KV-cache scales (1.0 unless the checkpoint or a calibration pass sets them): floats
        # here, mirrored in a device tensor that the kernels read (no sync, and CUDA graphs see updates).
        self._kv_scales = (1.0, 1.0)
        self._kv_scale_tensor: torch.Tensor | None = None  # fp32 [2] on the cache's device
        self.kv_observer = None  # callable(k, v) during KV-scale calibration (fp8_turbo/engine/core/kv_calibration.py)
        self.deterministic = False  # every token through the prefill kernel, no split-KV (batch invariant)

    @property
    def k_scale(self) -> float:
        return self._kv_scales[0]

    @k_scale.setter
    def k_scale(self, value: float) -> None:
        self._set_kv_scales(float(value), self._kv_scales[1])

    @property
    def v_scale(self) -> float:
        return self._kv_scales[1]

    @v_scale.setter
    def v_scale(self, value: float) -> None:
        self._set_kv_scales(self._kv_scales[0], float(value))

    def _set_kv_scales(self, k_scale: float, v_scale: float) -> None:
        self._kv_scales = (k_scale, v_scale)
        if self._kv_scale_tensor is not None:  # in place (a fill kernel, no sync): captured graphs read it
            self._kv_scale_tensor[0].fill_(k_scale)
            self._kv_scale_tensor[1].fill_(v_scale)

    def kv_scale_args(self, device: torch.device) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """(k_scale, v_scale) for the kernels: floats on the CPU, fp32 [1] device views on a GPU."""
        if device.type == "cpu":
            return self._kv_scales
        t = self._kv_scale_tensor
        if t is None or t.device != device:
            t = self._kv_scale_tensor = torch.tensor(self._kv_scales, dtype=torch.float32, device=device)
        return t[0:1], t[1:2]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        T = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads sit side by side in the fused projection: rotate them in one pass.
        qk = apply_rotary(qk.view(T, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.kv_observer is not None:
            self.kv_observer(k, v)
        k_cache, v_cache = kv_cache
        k_scale, v_scale = self.kv_scale_args(k_cache.device)
        kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        if meta.is_decode and not self.deterministic:
            out = kernels.paged_attention_decode(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale, k_scale, v_scale,
                max_seq_len=meta.max_seq_len,
            )
        else:  # deterministic: decode tokens too, so a token's arithmetic never depends on its batch
            out = kernels.paged_attention_prefill(
                q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens, self.scale, k_scale, v_scale,
                max_query_len=meta.max_query_len,
            )
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(Versioned):
    def __init__(self, cfg: ModelConfig, quant: QuantConfig, prefix: str, tp: TensorParallel):
        super().__init__()
        self.intermediate_size = split_evenly(cfg.intermediate_size, tp.size, "intermediate_size")  # this rank's
        part = (cfg.intermediate_size, tp.rank * self.intermediate_size, self.intermediate_size)
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [part, part], bias=cfg.mlp_bias, quant=quant,
                                                 name=f"{prefix}.gate_up_proj", tp=tp)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, quant=quant,
                                           name=f"{prefix}.down_proj", tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if _fused_cpu(gate_up):
            return self.down_proj(cpu_ops.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class Block(Versioned):
    def __init__(self, cfg: ModelConfig, quant: QuantConfig, layer_idx: int, tp: TensorParallel):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, quant, f"{prefix}.self_attn", tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, quant, f"{prefix}.mlp", tp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        # h = x + attn(norm(x)); the add fused into the second norm
        normed, h = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache), x)
        return h + self.mlp(normed)


class LlamaModel(Versioned):
    """The whole model, or with `tp` one rank's shard of it (fp8_turbo/engine/model/parallel.py); the forward pass is
    the same, the parallel layers do the collectives."""

    def __init__(self, cfg: ModelConfig, quant: QuantConfig | None = None, tp: TensorParallel | None = None):
        super().__init__()
        quant = (quant or QuantConfig()).for_model(cfg.num_layers)
        self.cfg, self.quant = cfg, quant  # quant.scheme: what its quantized Linears run
        self.tp = tp = tp or TensorParallel()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList([Block(cfg, quant, i, tp) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # lm_head stays in high precision by default (QuantConfig decides); tied to the embedding when
        # the checkpoint says so (the loader then shares the tensor).
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, quant=quant, tp=tp)

    @property
    def num_kv_heads(self) -> int:
        """KV heads in this rank's cache."""
        return self.layers[0].self_attn.num_kv_heads

    def set_deterministic(self, deterministic: bool) -> None:
        """Batch-invariant kernels (LLM(deterministic=True)): one GEMM config for every M, no split-K,
        attention of every token through the prefill kernel (no split-KV)."""
        for m in self.modules():
            if isinstance(m, (Linear, Attention)):
                m.deterministic = deterministic
    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations, norms, KV cache unless FP8)."""
        return self.norm.weight.dtype

    @property
    def is_quantized(self) -> bool:
        """True when some linear layer computes in FP8."""
        return any(isinstance(m, Linear) and m.scheme != "none" for m in self.modules())

    @torch.no_grad()
    def store_vocab_matrices(self, kind: str) -> None:
        """Store the embedding and a high-precision lm_head (its scheme "none") smaller, after loading.

        kind: "model" (unchanged), "bfloat16" (half the bytes of fp32; lm_head runs a bf16-weight
        GEMM), or "fp8" (e4m3, one scale per vocabulary row: a quarter of fp32; lm_head runs
        weight-only FP8, its activations unquantized). A tied pair stays one shared matrix. An
        FP8-quantized lm_head (not in the ignore list) is left as it is.
        """
        if kind not in VOCAB_DTYPES:
            raise ValueError(f"lm_head_dtype must be one of {VOCAB_DTYPES}, got {kind!r}")
        if kind == "model":
            return
        from fp8_turbo.kernels.fp8 import quantize_weight

        emb, head = self.embed_tokens, self.lm_head
        tied = head.weight is emb.weight
        compute = self.dtype
        emb.out_dtype = compute
        if kind == "bfloat16":
            emb.weight = nn.Parameter(emb.weight.data.to(torch.bfloat16), requires_grad=False)
            if tied:
                head.weight = emb.weight
            elif head.scheme == "none":
                head.weight = nn.Parameter(head.weight.data.to(torch.bfloat16), requires_grad=False)
            return
        q, scale = quantize_weight(emb.weight.data, "channel")
        if tied:
            head.scheme = "fp8-weight-only"
            head.set_fp8_weight(q, scale)
            emb.weight_fp8, emb.weight_scale = head.weight_fp8, head.weight_scale
        else:
            emb.weight_fp8, emb.weight_scale = q, scale
            if head.scheme == "none":
                head.scheme = "fp8-weight-only"
                head.finalize()
        emb.weight = None

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: list[KVCache]) -> torch.Tensor:
        """input_ids [T] -> logits [len(meta.logits_indices), vocab] in fp32 (on rank 0 of a tensor-parallel
        group; the other ranks get their vocabulary shard's).

        On the CPU the whole forward runs as one native call when it can (native_step.py: the same
        kernels and the same bits, without Python between the layers); this code is its reference."""
        step = native_step(self, input_ids)
        if step is not None:
            return step(input_ids, meta, kv_caches)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(meta.positions, x.dtype, meta.max_seq_len)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, meta, kv_cache)
        x = self.norm(x[meta.logits_indices])
        return self.lm_head(x).float()
