"""The paged KV pool: one tensor holding every layer's key and value pages."""

from __future__ import annotations

import torch


class PagedKVPool:
    """K and V pages for all layers in one allocation.

    The storage is ``(2, num_layers, num_blocks, page_size, num_kv_heads, head_dim)``; layer ``l``
    reads its caches as the contiguous views ``k_cache(l)`` and ``v_cache(l)`` of shape
    ``(num_blocks, page_size, num_kv_heads, head_dim)``, the paged layout of
    ``flash_attn_with_kvcache``. Page ``p`` means the same page index in every layer, so one
    block table serves the whole model. The pool is zero-filled so that unwritten slots hold
    finite values.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("page_size", page_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.page_size = page_size
        self.storage = torch.zeros(
            (2, num_layers, num_blocks, page_size, num_kv_heads, head_dim), dtype=dtype, device=device
        )

    @staticmethod
    def bytes_per_block(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one page costs across all layers, keys and values."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * itemsize

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.page_size

    def k_cache(self, layer: int) -> torch.Tensor:
        return self.storage[0, layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.storage[1, layer]
