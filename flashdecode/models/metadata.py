"""Per-step attention metadata, passed explicitly to every forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Where one forward pass's tokens sit in the paged KV cache.

    A step runs ``B`` sequences. Its new tokens are packed one sequence after another; sequence
    ``b`` already has ``cache_seqlens[b]`` tokens cached in the pages ``block_table[b]`` and
    appends its new tokens right after them (rotary positions follow from the same numbers).

    * ``cu_seqlens_q`` ``(B + 1,)`` int32 marks each sequence's new tokens in the packed batch
      (prefill, or any step with several new tokens per sequence); ``None`` means exactly one new
      token per sequence (a decode step), which runs the op in its padded ``(B, 1, H, D)`` form.
      ``cu_seqlens_q`` also serves as ``cu_seqlens_k_new``: the new keys are the new tokens.
    * ``logits_indices`` picks the packed rows whose logits are wanted (usually each sequence's
      last token); ``None`` computes logits for every row.
    """

    cache_seqlens: torch.Tensor  # (B,) int32
    block_table: torch.Tensor  # (B, max_blocks) int32
    cu_seqlens_q: torch.Tensor | None = None  # (B + 1,) int32
    max_seqlen_q: int = 1
    logits_indices: torch.Tensor | None = None  # (N,) int64
    # False when the builder guarantees valid values (the engine): the op then skips its host-synced
    # value checks (lengths within the cache, page ids within the pool).
    check_values: bool = True

    @property
    def batch_size(self) -> int:
        return self.cache_seqlens.shape[0]

    @property
    def is_decode(self) -> bool:
        return self.cu_seqlens_q is None
