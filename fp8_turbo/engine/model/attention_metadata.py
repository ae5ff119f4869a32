"""What the attention layers need to know about one forward pass, passed explicitly (never global)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Describes a packed batch of T new tokens from B sequences.

    Sequence b contributes the tokens cu_seqlens_q[b]:cu_seqlens_q[b+1] of the batch; after this step
    its cache holds seq_lens[b] tokens, the new ones included (written at slot_mapping).
    """

    positions: torch.Tensor  # [T] int64, position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, KV-cache slot (block_id * block_size + offset)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    max_query_len: int  # 1 -> every sequence decodes one token: the decode kernel runs
    logits_indices: torch.Tensor  # [N] int64, rows of the batch whose logits are computed
    max_seq_len: int | None = None  # host-side bound on seq_lens (no device sync in the decode launcher)

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1
