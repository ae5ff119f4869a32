"""Tensor parallelism, Megatron style: the group every layer reduces over, the shard math, the layers.

One `TensorParallel` per process, made once by fp8_turbo/engine/core/workers.py and given to the model's
constructor; each layer keeps it and knows its shard. With size 1 (the default) no collective runs and
every layer is exactly the unsharded one.

Rank r of N holds (H heads, KVH KV heads, D head_dim, I intermediate, V vocab):
    qkv_proj      column-parallel: q heads r*H/N.. (H/N of them); KV heads split the same way when N
                  divides KVH, else replicated (N a multiple of KVH: rank r holds KV head r // (N/KVH))
    o_proj        row-parallel: input columns of its q heads; one all-reduce (sum) of the output
    gate_up_proj  column-parallel: rows r*I/N.. of gate and of up
    down_proj     row-parallel: input columns r*I/N..; one all-reduce (sum)
    embed_tokens  vocab-parallel: rows r*ceil(V/N).. (zero-padded); each rank looks up its own ids, one
                  all-reduce (sum) of the embeddings (exact: one rank contributes, the others add zeros)
    lm_head       vocab-parallel like the embedding (shares it when tied); logits gathered to rank 0
    norms, rotary replicated. Each rank's KV cache holds only its KV heads.

FP8 scales are those of the unsharded model, so every rank quantizes exactly the values TP=1 would:
    per-channel weight scales   column-parallel: the rows' own (split with the rows); row-parallel: the
                                max over ranks of the partial-row amax (one all-reduce max at load)
    per-tensor weight scales    shared: max over ranks of the shard amax (one all-reduce max at load)
    128x128 block scales        split on block boundaries; a shard that is not 128-aligned is refused
    per-token activation scales column-parallel inputs are whole rows on every rank; row-parallel inputs
                                are shards of the row, so their amax is all-reduced (max, T floats) and
                                every rank quantizes its shard with the whole row's scale
    per-tensor dynamic activations: the same with one float; 1x128 groups lie inside a 128-aligned shard
    static input scales, pre-quantized checkpoints: read whole (per-tensor) or sliced as above.
What differs from TP=1 is only where the sums of row-parallel layers are split: each rank sums its K/N
products, the all-reduce adds the N partial sums (tests/test_tensor_parallel.py derives the tolerance).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fp8_turbo.engine.model.config import ModelConfig
from fp8_turbo.engine.model.linear import Linear, QuantConfig
from fp8_turbo.engine.model.module_version import Versioned
from fp8_turbo.engine.model.schemes import SCHEMES
from fp8_turbo.kernels.fp8 import compute_scale, weight_amax

BLOCK = 128  # FP8 block-scale edge (fp8-block)

# (dim, start, stop) of a checkpoint tensor this rank reads; None: the whole tensor
Slice = tuple[int, int, int] | None


@dataclass(slots=True, eq=False)
class TensorParallel:
    """This process's place in the tensor-parallel group (size 1: no collectives, no group)."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup of the model's collectives (None: the default group)
    timing: bool = False  # add each collective's wall time to collective_seconds (bench/tp.py)
    collective_seconds: float = 0.0
    collective_calls: int = 0

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """x summed (or max-ed) over ranks, in place; x must be contiguous."""
        if self.size == 1:
            return x
        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        t0 = self._tick(x)
        dist.all_reduce(x, op=reduce_op, group=self.group)
        self._tock(x, t0)
        return x

    def gather_to_first(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0: the ranks' x concatenated along the last dim; other ranks: their own x."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        t0 = self._tick(x)
        dist.gather(x, parts, dst=0, group=self.group)
        self._tock(x, t0)
        return torch.cat(parts, dim=-1) if self.rank == 0 else x

    def _tick(self, x: torch.Tensor) -> float:
        if self.timing and x.is_cuda:
            torch.cuda.synchronize(x.device)
        return time.perf_counter()

    def _tock(self, x: torch.Tensor, t0: float) -> None:
        if self.timing:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            self.collective_seconds += time.perf_counter() - t0
            self.collective_calls += 1


# ---------------------------------------------------------------------------------------- shard math


def split_evenly(total: int, size: int, what: str) -> int:
    if total % size:
        raise ValueError(f"tensor_parallel_size={size} does not divide {what}={total}")
    return total // size


@dataclass(slots=True, frozen=True)
class AttentionShard:
    """The heads one rank holds: q heads head_start.. and KV heads kv_head_start.. (local counts)."""

    num_heads: int
    num_kv_heads: int
    head_start: int
    kv_head_start: int

    def qkv_parts(self, cfg: ModelConfig) -> list[tuple[int, int, int]]:
        """(rows in the checkpoint tensor, first row here, rows here) of q, k and v."""
        d = cfg.head_dim
        kv = (cfg.kv_size, self.kv_head_start * d, self.num_kv_heads * d)
        return [(cfg.q_size, self.head_start * d, self.num_heads * d), kv, kv]


def attention_shard(cfg: ModelConfig, tp: TensorParallel) -> AttentionShard:
    n, kvh = tp.size, cfg.num_kv_heads
    heads = split_evenly(cfg.num_heads, n, "num_attention_heads")
    if kvh % n == 0:  # split
        local_kv, kv_start = kvh // n, tp.rank * (kvh // n)
    elif n % kvh == 0:  # replicated: N/KVH ranks share each KV head (its q heads all sit on them)
        local_kv, kv_start = 1, tp.rank // (n // kvh)
    else:
        raise ValueError(f"tensor_parallel_size={n} and num_key_value_heads={kvh}: KV heads are split when "
                         f"the size divides them and replicated when they divide the size; neither holds")
    return AttentionShard(heads, local_kv, tp.rank * heads, kv_start)


def check_tensor_parallel(cfg: ModelConfig, size: int, scheme: str) -> None:
    """Raise ValueError, naming both numbers, when `size` cannot shard this model (with this scheme)."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if size == 1:
        return
    shard = attention_shard(cfg, TensorParallel(0, size))
    inter = split_evenly(cfg.intermediate_size, size, "intermediate_size")
    if scheme == "fp8-block":
        # Each rank's rows (column-parallel) and input columns (row-parallel) must start and end on
        # block edges, or its 128x128 blocks (and 1x128 activation groups) are not those of TP=1.
        local = {"q rows (heads x head_dim)": shard.num_heads * cfg.head_dim,
                 "k/v rows": shard.num_kv_heads * cfg.head_dim, "intermediate_size": inter}
        bad = {k: v for k, v in local.items() if v % BLOCK}
        if bad:
            raise ValueError(f"fp8-block with tensor_parallel_size={size}: each rank's shard must be a multiple "
                             f"of {BLOCK} to keep the 128x128 weight blocks of the unsharded model; per rank: {bad}")
    elif scheme in SCHEMES and SCHEMES[scheme].weight in ("group", "mx"):
        # Row-parallel layers split K: each rank's input columns must hold whole 1 x g groups.
        g = SCHEMES[scheme].group
        local = {"o_proj input (heads x head_dim)": shard.num_heads * cfg.head_dim, "down_proj input": inter}
        bad = {k: v for k, v in local.items() if v % g}
        if bad:
            raise ValueError(f"{scheme} with tensor_parallel_size={size}: each rank's input columns must be a "
                             f"multiple of {g} to keep the 1x{g} scale groups of the unsharded model; per rank: {bad}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _scale_slice(shape: tuple[int, ...], dim: int, full: int, start: int, stop: int, name: str) -> Slice:
    """The slice of a weight's scale tensor that goes with weight[start:stop] along `dim`."""
    if math.prod(shape) == 1:
        return None  # per-tensor: shared
    if dim == 0 and shape[0] == full:
        return (0, start, stop)  # per-channel [N] / [N, 1]: split with the rows
    if dim == 1 and (len(shape) < 2 or shape[-1] == 1):
        return None  # per-channel scales of a row-parallel layer: its rows are whole
    # 128x128 blocks [ceil(N/128), ceil(K/128)]
    if start % BLOCK or (stop % BLOCK and stop != full):
        raise ValueError(f"{name}: block scales cannot be split at [{start}, {stop}) of {full}: the shard must "
                         f"start and end on a {BLOCK}-boundary")
    return (dim, start // BLOCK, _cdiv(stop, BLOCK))


# ---------------------------------------------------------------------------------------- layers


class ColumnParallelLinear(Linear):
    """y = x @ W_r.T: this rank's rows of W, of each fused part (q/k/v, gate/up; one part otherwise).
    x is the whole row on every rank, so activation scales need nothing from the other ranks."""

    def __init__(self, in_features: int, parts: list[tuple[int, int, int]], *, bias: bool, quant: QuantConfig,
                 name: str, tp: TensorParallel):
        # parts: (rows in the checkpoint tensor, first row here, rows here)
        super().__init__(in_features, sum(p[2] for p in parts), bias=bias, quant=quant, name=name)
        self.tp, self.parts = tp, parts

    @property
    def part_sizes(self) -> list[int]:
        return [p[2] for p in self.parts]

    def checkpoint_slice(self, part: int | None, leaf: str, shape: tuple[int, ...]) -> Slice:
        full, start, rows = self.parts[part or 0]
        if self.tp.size == 1 or (start == 0 and rows == full):
            return None
        stop = min(start + rows, full)  # a vocab-parallel shard may run past the vocabulary (padding)
        if leaf in ("weight", "bias"):
            return (0, start, stop)
        return _scale_slice(shape, 0, full, start, stop, self.name)

    def finalize(self) -> None:
        if self.tp.size > 1 and self.scheme != "none" and self.weight_fp8 is None and self.weight_granularity == "tensor":
            _finalize_with_global_amax(self)  # rows of the other ranks count too
        else:
            super().finalize()


class RowParallelLinear(Linear):
    """y = sum over ranks of x_r @ W_r.T: this rank's input columns of W; one all-reduce of the output.
    The bias is added on rank 0 only."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, quant: QuantConfig, name: str,
                 tp: TensorParallel):
        local = split_evenly(in_features, tp.size, f"{name} input features")
        super().__init__(local, out_features, bias=bias, quant=quant, name=name)
        self.tp, self.full_in, self.in_start = tp, in_features, tp.rank * local

    @property
    def part_sizes(self) -> list[int]:
        return [self.out_features]

    def checkpoint_slice(self, part: int | None, leaf: str, shape: tuple[int, ...]) -> Slice:
        if self.tp.size == 1 or leaf == "bias":
            return None
        start, stop = self.in_start, self.in_start + self.in_features
        if leaf == "weight":
            return (1, start, stop)
        return _scale_slice(shape, 1, self.full_in, start, stop, self.name)

    def finalize(self) -> None:
        if self.tp.size > 1 and self.scheme != "none" and self.weight_fp8 is None \
                and self.weight_granularity in ("channel", "tensor"):
            _finalize_with_global_amax(self)  # a row's amax spans every rank's columns
        else:
            super().finalize()
        if self.tp.rank > 0 and self.bias is not None:
            self.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        return self.tp.all_reduce(super().forward(x, act_scale=self._whole_row_scale(x)))

    def _whole_row_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The activation scale TP=1 would compute from the whole row: this shard's amax, max-reduced."""
        act = self.act_granularity
        if act == "token":
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=1, keepdim=True).float()  # [T, 1]
        elif act == "tensor" and self.input_scale is None:
            amax = x.abs().amax().float().reshape(1)
        else:
            return None  # none, weight-only, a static input scale, or 1x128 groups inside the shard
        return compute_scale(self.tp.all_reduce(amax, op="max"))


def _finalize_with_global_amax(m: Linear) -> None:
    from fp8_turbo.kernels.fp8 import quantize_weight

    gran = m.weight_granularity
    amax = m.tp.all_reduce(weight_amax(m.weight.data, gran).contiguous(), op="max")
    try:
        w_fp8, scale = quantize_weight(m.weight.data, gran, scale=compute_scale(amax))
    except ValueError as e:
        raise ValueError(f"{m.name}: {e}") from e
    m.set_fp8_weight(w_fp8, scale)


class VocabParallelEmbedding(Versioned):
    """Rows start..start+ceil(V/N) of the embedding (zero past V); ids outside them contribute zeros.

    The rows are `weight` (the model dtype, or bf16), or an e4m3 matrix with one scale per row
    (`weight_fp8`, `weight_scale`, shared with a tied FP8 lm_head): LlamaModel.store_vocab_matrices.
    Looked-up rows come back in `out_dtype` (the model's compute dtype; None: the weight's)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel):
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.rows = _cdiv(vocab_size, tp.size)
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)
        self.weight_fp8: torch.Tensor | None = None
        self.weight_scale: torch.Tensor | None = None  # [rows, 1] fp32
        self.out_dtype: torch.dtype | None = None

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight_fp8 is not None:
            return (self.weight_fp8[ids].float() * self.weight_scale[ids]).to(self.out_dtype)
        x = nn.functional.embedding(ids, self.weight)
        return x if self.out_dtype is None else x.to(self.out_dtype)

    def checkpoint_slice(self, part: int | None, leaf: str, shape: tuple[int, ...]) -> Slice:
        return None if self.tp.size == 1 else (0, self.start, min(self.start + self.rows, self.vocab_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = self._lookup(local.clamp(0, self.rows - 1))
        return self.tp.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0.0))


class ParallelLMHead(ColumnParallelLinear):
    """Vocab-parallel lm_head, partitioned as VocabParallelEmbedding (so a tied head shares its shard);
    rank 0 gets the gathered logits [T, V], the other ranks their own [T, ceil(V/N)]."""

    def __init__(self, hidden_size: int, vocab_size: int, *, quant: QuantConfig, tp: TensorParallel):
        rows = _cdiv(vocab_size, tp.size)
        super().__init__(hidden_size, [(vocab_size, tp.rank * rows, rows)], bias=False, quant=quant,
                         name="lm_head", tp=tp)
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor, act_scale: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.tp.gather_to_first(super().forward(x, act_scale))
        return logits[..., :self.vocab_size] if self.tp.rank == 0 else logits


def shard_selector(model: nn.Module, hf_to_param: Callable[[str], tuple[str, int | None]]
                   ) -> Callable[[str, tuple[int, ...]], Slice]:
    """select(hf_name, shape) -> the slice of that checkpoint tensor this rank reads (None: all of it).
    `hf_to_param` maps a checkpoint name to (parameter name, fused part), as the loader does."""
    modules = dict(model.named_modules())

    def select(hf_name: str, shape: tuple[int, ...]) -> Slice:
        target, part = hf_to_param(hf_name)
        owner, _, leaf = target.rpartition(".")
        slicer = getattr(modules.get(owner), "checkpoint_slice", None)
        return slicer(part, leaf, tuple(shape)) if slicer is not None else None

    return select
