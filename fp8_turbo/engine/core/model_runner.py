"""Turns a scheduled batch into model inputs (token ids + AttentionMetadata), runs the model, and
returns the logits the engine samples from.

A step's integer inputs (token ids, positions, slots, logits rows, block tables, lengths) are packed on
the host into one staging buffer (pinned on CUDA) and reach the device in one asynchronous copy; the
device tensors are views into it. Bounds the kernels need (longest chunk, longest sequence) come from
the host lists, so a step issues no device sync before the sampler reads its tokens. Decode batches
replay a captured CUDA graph when a `CudaGraphRunner` is attached (fp8_turbo/engine/core/cuda_graphs.py).

Speculative decoding changes only this bookkeeping, never the forward's contract: a sequence with
draft tokens runs its last token and the drafts as one chunk (a chunked-prefill row of 1 + k tokens)
and asks for logits at all 1 + k positions; `StepLogits` returns them as that sequence's sample rows.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from fp8_turbo.engine.core.scheduler import ScheduledSeq
from fp8_turbo.engine.model.attention_metadata import AttentionMetadata
from fp8_turbo.engine.model.model import KVCache, LlamaModel

# (name, dtype) of the packed step inputs, int64 fields first so every field stays aligned
INT64_FIELDS = ("input_ids", "positions", "slot_mapping", "logits_indices")
INT32_FIELDS = ("block_tables", "seq_lens", "cu_seqlens_q")


@dataclass(slots=True)
class StepLogits:
    """Logits of one step, split by use.

    sample_logits [R, V]: for each sequence in `sample_seqs` (those that reached their last token), in
    order, 1 + len(draft_token_ids) rows: row 0 predicts the token after its last token, row j + 1 the
    token after its draft j (speculative decoding; one row without drafts).
    prompt_logits: per sequence that wants prompt logprobs, (first prompt position the rows predict,
    logits [n, V]): row i holds the distribution of prompt token `first + i`.
    """

    sample_seqs: list[ScheduledSeq]
    sample_logits: torch.Tensor
    prompt_logits: dict[int, tuple[int, torch.Tensor]]


@dataclass(slots=True)
class HostStep:
    """One step's model inputs as host lists (what a tensor-parallel rank 0 sends its workers). A decode
    step may be padded to a CUDA-graph bucket: padding tokens have slot -1 (not written) and padding
    sequences length 0."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    logits_indices: list[int]
    block_tables: list[list[int]]
    seq_lens: list[int]
    cu_seqlens_q: list[int]
    max_query_len: int
    max_seq_len: int
    prompt_rows: list[tuple[int, int, int]]  # (seq position in batch, first predicted prompt index, rows)

    def pad_decode(self, num_seqs: int) -> None:
        """Pad a decode batch (one token per sequence) to `num_seqs` sequences."""
        n = len(self.seq_lens)
        assert self.max_query_len == 1 and len(self.input_ids) == n and n <= num_seqs, (n, num_seqs, self.max_query_len)
        extra = num_seqs - n
        self.input_ids += [0] * extra
        self.positions += [0] * extra
        self.slot_mapping += [-1] * extra
        self.logits_indices += list(range(n, num_seqs))
        self.block_tables += [[]] * extra
        self.seq_lens += [0] * extra
        self.cu_seqlens_q += list(range(n + 1, num_seqs + 1))


def step_layout(num_tokens: int, num_seqs: int, num_logits: int, max_blocks: int) -> dict[str, tuple[int, torch.dtype, tuple[int, ...]]]:
    """Byte offset, dtype and shape of each field in the packed buffer."""
    shapes = {"input_ids": (num_tokens,), "positions": (num_tokens,), "slot_mapping": (num_tokens,),
              "logits_indices": (num_logits,), "block_tables": (num_seqs, max_blocks), "seq_lens": (num_seqs,),
              "cu_seqlens_q": (num_seqs + 1,)}
    layout, offset = {}, 0
    for names, dtype in ((INT64_FIELDS, torch.int64), (INT32_FIELDS, torch.int32)):
        for name in names:
            layout[name] = (offset, dtype, shapes[name])
            n = 1
            for d in shapes[name]:
                n *= d
            offset += n * dtype.itemsize
    layout["_nbytes"] = (offset, torch.uint8, ())
    return layout


def pack_step(host: HostStep, max_blocks: int, pin: bool) -> torch.Tensor:
    """The step's fields in one uint8 buffer laid out by step_layout (pinned for an async copy): the
    int64 fields, then the int32 ones (block tables padded with 0), built with Python's array module
    and wrapped by one torch.frombuffer (a handful of small torch ops per step cost more than the step's
    host work on a CPU)."""
    i64 = array("q", host.input_ids)
    i64.extend(host.positions)
    i64.extend(host.slot_mapping)
    i64.extend(host.logits_indices)
    i32 = array("i")
    zeros = array("i", bytes(4 * max_blocks))
    for table in host.block_tables:
        i32.extend(table)
        i32.extend(zeros[: max_blocks - len(table)])
    i32.extend(host.seq_lens)
    i32.extend(host.cu_seqlens_q)
    data = bytearray(i64.tobytes())
    data += i32.tobytes()
    buf = torch.frombuffer(data, dtype=torch.uint8)  # shares (and keeps) `data`
    if pin:
        buf = torch.empty(len(data), dtype=torch.uint8, pin_memory=True).copy_(buf)
    return buf


def unpack_step(buf: torch.Tensor, host: HostStep, max_blocks: int) -> tuple[torch.Tensor, AttentionMetadata]:
    """Views of a packed buffer (on any device): input ids and the AttentionMetadata."""
    T, B, N = len(host.input_ids), len(host.seq_lens), len(host.logits_indices)
    n64 = 8 * (3 * T + N)
    i64 = buf[:n64].view(torch.int64)
    i32 = buf[n64:n64 + 4 * (B * max_blocks + 2 * B + 1)].view(torch.int32)
    tables = B * max_blocks
    meta = AttentionMetadata(
        positions=i64[T:2 * T], slot_mapping=i64[2 * T:3 * T], block_tables=i32[:tables].view(B, max_blocks),
        seq_lens=i32[tables:tables + B], cu_seqlens_q=i32[tables + B:], max_query_len=host.max_query_len,
        logits_indices=i64[3 * T:], max_seq_len=host.max_seq_len,
    )
    return i64[:T], meta


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_caches: list[KVCache], block_size: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.graphs = None  # a CudaGraphRunner once decode graphs are captured (fp8_turbo/engine/core/cuda_graphs.py)

    def host_step(self, batch: list[ScheduledSeq]) -> HostStep:
        """Pack the new tokens of every sequence as host lists."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        prompt_rows: list[tuple[int, int, int]] = []
        for b, item in enumerate(batch):
            seq, n, drafts = item.seq, item.num_new_tokens, item.draft_token_ids
            assert not drafts or item.completes, f"drafts follow a sequence's last token: {item}"
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_slice(start, start + n))
            input_ids.extend(drafts)
            total = n + len(drafts)
            pos = range(start, start + total)
            positions.extend(pos)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if seq.wants_prompt_logprobs():
                # Row at position p predicts token p + 1; prompt token 0 has no prediction.
                first = max(len(seq.prompt_logprobs), 1)  # next prompt index still to fill
                lo = max(first - 1, start)
                hi = min(start + n, seq.num_prompt_tokens - 1)
                if hi > lo:
                    prompt_rows.append((b, lo + 1, hi - lo))
                    logits_indices.extend(cu[-1] + (p - start) for p in range(lo, hi))
            if item.completes:  # the last token's row, then one per draft
                logits_indices.extend(range(cu[-1] + n - 1, cu[-1] + total))
            cu.append(cu[-1] + total)
            seq_lens.append(start + total)
        return HostStep(input_ids, positions, slots, logits_indices, [list(i.seq.block_table) for i in batch],
                        seq_lens, cu, max(i.num_scheduled_tokens for i in batch), max(seq_lens), prompt_rows)

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, AttentionMetadata, list[tuple[int, int, int]]]:
        """Input ids [T], metadata, and for each sequence wanting prompt logprobs (seq position in batch,
        first predicted prompt index, rows). One host-to-device copy."""
        host = self.host_step(batch)
        max_blocks = max(len(t) for t in host.block_tables)
        buf = pack_step(host, max_blocks, pin=self.device.type == "cuda")
        if self.device.type != "cpu":
            buf = buf.to(self.device, non_blocking=True)
        input_ids, meta = unpack_step(buf, host, max_blocks)
        return input_ids, meta, host.prompt_rows

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> StepLogits:
        graphs = self.graphs
        if graphs is not None and graphs.can_run(batch):
            logits, prompt_rows = graphs.run(self.host_step(batch)), []
        else:
            input_ids, meta, prompt_rows = self.prepare(batch)
            logits = self.model(input_ids, meta, self.kv_caches)  # [N, V] in the order of logits_indices
        # Split rows back: per sequence, prompt rows (if any) come before its sample row.
        prompt_logits: dict[int, tuple[int, torch.Tensor]] = {}
        sample_rows: list[int] = []
        sample_seqs: list[ScheduledSeq] = []
        row = 0
        prompt_by_batch = {b: (first, count) for b, first, count in prompt_rows}
        for b, item in enumerate(batch):
            if b in prompt_by_batch:
                first, count = prompt_by_batch[b]
                prompt_logits[item.seq.seq_id] = (first, logits[row:row + count])
                row += count
            if item.completes:
                count = 1 + len(item.draft_token_ids)
                sample_rows.extend(range(row, row + count))
                sample_seqs.append(item)
                row += count
        return StepLogits(sample_seqs, _rows(logits, sample_rows), prompt_logits)


def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """logits[rows]: a view when the rows are consecutive (every step without prompt logprobs), else one
    index_select with a tensor index (never a Python-list index, which copies the list synchronously)."""
    if not rows:
        return logits[:0]
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return logits[rows[0]:rows[0] + len(rows)]
    index = torch.tensor(rows, dtype=torch.int64)
    if logits.is_cuda:
        index = index.pin_memory().to(logits.device, non_blocking=True)
    return logits.index_select(0, index)
