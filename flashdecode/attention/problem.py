"""One normalised description of a `flash_attn_with_kvcache` call.

The public function accepts many layouts (padded or packed queries, contiguous or paged caches,
int or tensor lengths, ...). After validation, `interface.py` rewrites every call into a
`PackedProblem`, so the reference implementation and the Triton kernels each handle one layout:

* queries are packed: ``q`` is ``(total_q, H, D)`` and sequence ``b`` owns rows
  ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]``;
* the cache is always paged: a contiguous cache ``(B_cache, S_cache, Hk, D)`` is a pool of
  ``B_cache`` pages of ``page_size = S_cache`` slots, and ``block_table[b] = [cache_batch_idx[b]]``;
* ``block_table`` already has its rows picked by ``cache_batch_idx`` (row ``b`` is sequence ``b``);
* new keys/values are packed ``(total_new, Hk, D)`` with ``cu_seqlens_k_new``;
* every per-sequence quantity is an int32 tensor of shape ``(B,)`` on the query's device.

Logical slot ``t`` of sequence ``b`` lives in page ``block_table[b, t // page_size]`` at offset
``t % page_size``. The valid keys of sequence ``b`` are slots
``[cache_leftpad[b], cache_seqlens[b] + new_len[b])`` where
``new_len[b] = cu_seqlens_k_new[b + 1] - cu_seqlens_k_new[b]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedProblem:
    q: torch.Tensor  # (total_q, H, D), last dim contiguous
    k_pages: torch.Tensor  # (num_pages, page_size, Hk, D), any strides but the last
    v_pages: torch.Tensor  # (num_pages, page_size, Hk, D)
    block_table: torch.Tensor  # (B, max_pages) int32, rows already chosen by cache_batch_idx
    cu_seqlens_q: torch.Tensor  # (B + 1,) int32
    max_seqlen_q: int  # upper bound on any sequence's query count (grid sizing only)
    cache_seqlens: torch.Tensor  # (B,) int32, end slot of the existing cache (absolute)
    cache_leftpad: torch.Tensor  # (B,) int32, first valid slot
    k_new: torch.Tensor | None  # (total_new, Hk, D) or None
    v_new: torch.Tensor | None  # (total_new, Hk, D) or None
    cu_seqlens_k_new: torch.Tensor  # (B + 1,) int32; all zeros when nothing is appended
    max_seqlen_k_new: int  # upper bound on any sequence's new-key count (0 without append)
    rotary_cos: torch.Tensor | None  # (seqlen_ro, rotary_dim // 2), same dtype as q
    rotary_sin: torch.Tensor | None
    rotary_interleaved: bool
    rotary_seqlens: torch.Tensor  # (B,) int32, rotary position of new key 0 (defaults to cache_seqlens)
    softmax_scale: float
    causal: bool
    window_left: int  # -1 = unbounded
    window_right: int  # -1 = unbounded; 0 when causal
    softcap: float  # 0.0 = off
    alibi_slopes: torch.Tensor | None  # (B, H) float32 or None
    num_splits: int  # 0 = heuristic, 1 = no split, n = at most n splits

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[1]

    @property
    def rotary_dim(self) -> int:
        return 0 if self.rotary_cos is None else 2 * self.rotary_cos.shape[1]

    @property
    def local(self) -> bool:
        """True when a window is set; queries then take per-position rotary like causal."""
        return self.window_left >= 0 or self.window_right >= 0
