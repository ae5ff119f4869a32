"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed instead of ~25 launches per
layer (~2,300 for Llama-3.3-70B).

Each graph reads its inputs from one static device buffer laid out as the model runner packs a step
(engine/core/model_runner.step_layout), so a replay costs one host-to-device copy of the packed, padded
step plus the replay. A batch of n decode tokens runs in the smallest bucket >= n: padding tokens write
no KV (slot -1) and padding sequences have length 0 (their attention output is zeros, never NaN), and
only the first n logits rows are returned. Block tables are padded to the model's maximum length, and the
decode attention sizes its split-KV partitions per sequence inside the kernel, so one graph serves every
sequence length. KV-cache scales are device tensors the kernels read, so a graph sees their values.

Graphs cover sequences up to `max_seq_len_to_capture` tokens (vLLM's name; 8192 by default): the block
tables of a bucket are [bucket, that / block_size] and travel with every step, so covering a 128k
context would copy 32 KB per sequence each step; longer sequences run eagerly.

Capture happens once at start-up, after the KV cache is allocated: each bucket first runs eagerly on the
static buffers (GEMM autotuning for its token bucket, Triton compiles; tuning inside a capture would
break it), then is captured, largest first, into one shared memory pool.

Without a GPU the same bookkeeping runs eagerly (`capture=False`), which the CPU tests use.
"""
from __future__ import annotations

import logging
import time

import torch

from fp8_turbo.engine.core.model_runner import HostStep, pack_step, step_layout, unpack_step
from fp8_turbo.engine.core.scheduler import ScheduledSeq
from fp8_turbo.engine.model.model import KVCache, LlamaModel

logger = logging.getLogger("fp8_turbo")


def graph_buckets(max_num_seqs: int, max_bucket: int = 256) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 8 up to 64, then every
    multiple of 32, up to min(max_num_seqs, max_bucket) (always included)."""
    top = max(1, min(max_num_seqs, max_bucket))
    sizes = [s for s in (1, 2, 4, 8) if s <= top]
    sizes += list(range(16, min(top, 64) + 1, 8)) + list(range(96, top + 1, 32))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket >= n, or None when n exceeds the largest (the step runs eagerly)."""
    for b in buckets:
        if b >= n:
            return b
    return None


class CudaGraphRunner:
    def __init__(self, model: LlamaModel, kv_caches: list[KVCache], block_size: int, max_model_len: int,
                 max_num_seqs: int, device: torch.device, capture: bool = True, max_bucket: int = 256):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.buckets = graph_buckets(max_num_seqs, max_bucket)
        self.capture_graphs = capture
        largest = step_layout(self.buckets[-1], self.buckets[-1], self.buckets[-1], self.max_blocks)["_nbytes"][0]
        # one static input buffer shared by every bucket (replays never overlap)
        self.static = torch.zeros(largest, dtype=torch.uint8, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> static logits [bucket, V]
        self.capture_seconds = 0.0

    # ---- bookkeeping (no GPU needed) ----------------------------------------------------------------
    def can_run(self, batch: list[ScheduledSeq]) -> bool:
        """Pure decode (one token per sequence, each sampled, no prompt logprobs) within the largest bucket
        and the captured length (longer sequences run eagerly, as vLLM's max_seq_len_to_capture).
        A step verifying speculative drafts (1 + k tokens for a sequence) runs eagerly: graphs are
        captured for one-token decode shapes only."""
        return (len(batch) <= self.buckets[-1]
                and all(i.num_new_tokens == 1 and not i.draft_token_ids and i.completes
                        and not i.seq.wants_prompt_logprobs()
                        and i.seq.num_computed_tokens < self.max_model_len
                        and len(i.seq.block_table) <= self.max_blocks for i in batch))

    def padded(self, host: HostStep) -> tuple[int, HostStep]:
        """(bucket, the step padded to it), the step's sequence lengths bounded by the model's maximum."""
        bucket = bucket_for(len(host.seq_lens), self.buckets)
        assert bucket is not None, (len(host.seq_lens), self.buckets)
        host.pad_decode(bucket)
        host.max_seq_len = self.max_model_len  # baked into the graph: split-KV count for any length
        return bucket, host

    def _load(self, host: HostStep) -> None:
        """Copy the packed step into the static buffer (one async host-to-device copy)."""
        buf = pack_step(host, self.max_blocks, pin=self.device.type == "cuda")
        self.static[:buf.numel()].copy_(buf, non_blocking=True)

    def _forward(self, host: HostStep) -> torch.Tensor:
        input_ids, meta = unpack_step(self.static, host, self.max_blocks)
        return self.model(input_ids, meta, self.kv_caches)

    # ---- capture and replay ---------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket, largest first (smaller graphs reuse the pool's memory)."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if self.capture_graphs else None
        for bucket in reversed(self.buckets):
            host = self._dummy(bucket)
            self._load(host)
            self._forward(host)  # eager warm-up: autotune + compile outside the capture
            if not self.capture_graphs:
                continue
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self._forward(host)
            self.graphs[bucket] = graph
        if self.capture_graphs:
            torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1fs", len(self.graphs), self.buckets,
                    self.capture_seconds)

    def _dummy(self, bucket: int) -> HostStep:
        """A decode step of `bucket` padding sequences: writes no KV (slot -1), attends to nothing."""
        return HostStep(input_ids=[0] * bucket, positions=[0] * bucket, slot_mapping=[-1] * bucket,
                        logits_indices=list(range(bucket)), block_tables=[[]] * bucket, seq_lens=[0] * bucket,
                        cu_seqlens_q=list(range(bucket + 1)), max_query_len=1, max_seq_len=self.max_model_len,
                        prompt_rows=[])

    @torch.inference_mode()
    def run(self, host: HostStep) -> torch.Tensor:
        """Logits [n, V] of a decode step of n sequences (host lists from ModelRunner.host_step)."""
        n = len(host.seq_lens)
        bucket, host = self.padded(host)
        self._load(host)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.outputs[bucket][:n]
        return self._forward(host)[:n]  # capture=False (CPU tests): the same buffers, run eagerly
