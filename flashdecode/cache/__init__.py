"""KV cache storage: the paged pool shared by all layers and the block allocator that hands out pages."""

from flashdecode.cache.allocator import BlockAllocator, OutOfBlocksError, SequenceBlocks
from flashdecode.cache.paged import PagedKVPool

__all__ = ["BlockAllocator", "OutOfBlocksError", "PagedKVPool", "SequenceBlocks"]
