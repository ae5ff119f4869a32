"""Turns a scheduled batch into model inputs (token ids + AttentionMetadata), runs the model, and
returns the logits the engine samples from."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model.attention_metadata import AttentionMetadata
from engine.model.model import KVCache, LlamaModel
from engine.core.scheduler import ScheduledSeq


@dataclass(slots=True)
class StepLogits:
    """Logits of one step, split by use.

    sample_logits [S, V]: one row per sequence in `sample_seqs` (those that reached their last token).
    prompt_logits: per sequence that wants prompt logprobs, (first prompt position the rows predict,
    logits [n, V]): row i holds the distribution of prompt token `first + i`.
    """

    sample_seqs: list[ScheduledSeq]
    sample_logits: torch.Tensor
    prompt_logits: dict[int, tuple[int, torch.Tensor]]


@dataclass(slots=True)
class HostStep:
    """One step's model inputs as host lists (what a tensor-parallel rank 0 sends its workers)."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    logits_indices: list[int]
    block_tables: list[list[int]]
    seq_lens: list[int]
    cu_seqlens_q: list[int]
    max_query_len: int
    prompt_rows: list[tuple[int, int, int]]  # (seq position in batch, first predicted prompt index, rows)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_caches: list[KVCache], block_size: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device

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
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_slice(start, start + n))
            pos = range(start, start + n)
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
            if item.completes:
                logits_indices.append(cu[-1] + n - 1)
            cu.append(cu[-1] + n)
            seq_lens.append(start + n)
        return HostStep(input_ids, positions, slots, logits_indices, [list(i.seq.block_table) for i in batch],
                        seq_lens, cu, max(i.num_new_tokens for i in batch), prompt_rows)

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, AttentionMetadata, list[tuple[int, int, int]]]:
        """Input ids [T], metadata, and for each sequence wanting prompt logprobs (seq position in batch,
        first predicted prompt index, rows)."""
        host = self.host_step(batch)
        max_blocks = max(len(t) for t in host.block_tables)
        tables = torch.zeros((len(batch), max_blocks), dtype=torch.int32)
        for b, table in enumerate(host.block_tables):
            tables[b, :len(table)] = torch.tensor(table, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            positions=torch.tensor(host.positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(host.slot_mapping, dtype=torch.int64, device=dev),
            block_tables=tables.to(dev),
            seq_lens=torch.tensor(host.seq_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(host.cu_seqlens_q, dtype=torch.int32, device=dev),
            max_query_len=host.max_query_len,
            logits_indices=torch.tensor(host.logits_indices, dtype=torch.int64, device=dev),
        )
        return torch.tensor(host.input_ids, dtype=torch.int64, device=dev), meta, host.prompt_rows

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> StepLogits:
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
                sample_rows.append(row)
                sample_seqs.append(item)
                row += 1
        return StepLogits(sample_seqs, logits[sample_rows], prompt_logits)
