"""A block allocator for a paged KV pool, in plain Python.

Pages are identified by their index in the pool. Each page carries a reference count so that
several sequences can share one page (prefix caching, forked sequences); a page returns to the
free list when its count drops to zero. Freed pages are reused least-recently-freed first, which
keeps recently freed pages (and whatever prefix they hold) around longest.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class OutOfBlocksError(RuntimeError):
    """Raised when more pages are requested than the pool has free."""


class BlockAllocator:
    """Hands out page indices ``0 .. num_blocks - 1`` with reference counts."""

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        self._check_index(block)
        return self._refcount[block]

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int = 1) -> list[int]:
        """Take ``n`` free pages (reference count 1 each); all or nothing."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} free KV pages, only {len(self._free)} of {self.num_blocks} are free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refcount[b] = 1
        return blocks

    def share(self, block: int) -> int:
        """Add a reference to a page in use (another sequence reads it); returns the new count."""
        self._check_index(block)
        if self._refcount[block] == 0:
            raise ValueError(f"block {block} is free and cannot be shared")
        self._refcount[block] += 1
        return self._refcount[block]

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each page; pages that reach zero go back to the free list."""
        blocks = list(blocks)
        drops: dict[int, int] = {}
        for b in blocks:
            self._check_index(b)
            drops[b] = drops.get(b, 0) + 1
        for b, n in drops.items():
            if self._refcount[b] < n:
                raise ValueError(f"block {b} is already free (double free)")
        for b in blocks:
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free.append(b)

    def _check_index(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block index {block} outside the pool of {self.num_blocks} blocks")


class SequenceBlocks:
    """The pages of one sequence, in logical order, and how many token slots they hold."""

    def __init__(self, allocator: BlockAllocator, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self.blocks: list[int] = []

    @property
    def capacity(self) -> int:
        """Token slots covered by the pages held."""
        return len(self.blocks) * self.page_size

    def pages_needed(self, num_tokens: int) -> int:
        """Extra pages required to hold ``num_tokens`` tokens in total."""
        return max(0, -(-num_tokens // self.page_size) - len(self.blocks))

    def ensure_capacity(self, num_tokens: int) -> None:
        """Grow to hold ``num_tokens`` tokens (raises OutOfBlocksError, holding nothing new)."""
        need = self.pages_needed(num_tokens)
        if need:
            self.blocks.extend(self.allocator.allocate(need))

    def truncate(self, num_tokens: int) -> None:
        """Release the pages past the first ``num_tokens`` tokens."""
        keep = -(-num_tokens // self.page_size)
        if keep < len(self.blocks):
            self.allocator.free(self.blocks[keep:])
            del self.blocks[keep:]

    def release(self) -> None:
        """Return every page held."""
        self.truncate(0)
