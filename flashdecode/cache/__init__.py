"""KV cache storage: the paged pool shared by all layers and the block manager that hands out pages
and caches full pages by a chained hash of their token ids (prefix caching)."""

from flashdecode.cache.allocator import BlockAllocator, OutOfBlocksError, SequenceBlocks, chain_hash
from flashdecode.cache.paged import PagedKVPool

__all__ = ["BlockAllocator", "OutOfBlocksError", "PagedKVPool", "SequenceBlocks", "chain_hash"]
