"""The block manager of a paged KV pool, in plain Python: reference counts and prefix caching.

Pages are identified by their index in the pool. Each page carries a reference count so that
several sequences can share one page; a page is free when its count is zero.

Prefix caching: once a page is full and its keys/values are computed, its owner registers it
under a hash chained over token ids (the parent page's hash and the page's own ids). A later
sequence whose tokens start the same way finds those pages by hash and takes a reference
instead of recomputing them. A hit is never trusted on the hash alone: the page's stored ids
must equal the request's, and its stored parent must be the page matched just before (checked
by page index and a generation number that changes whenever a page is handed out again), so the
whole prefix is verified exactly. Registered pages are immutable: nothing is ever written into
them again until they are evicted.

Free pages come in two kinds: plain ones (never registered, or evicted) and cached ones (free but
still holding a registered prefix). Allocation takes plain pages first and only then evicts the
least recently freed cached page, so a freed prefix survives as long as the pool allows.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence


class OutOfBlocksError(RuntimeError):
    """Raised when more pages are requested than the pool has free."""


def chain_hash(parent: int | None, ids: Sequence[int]) -> int:
    """Hash of one full page: its parent page's hash (None for the first page) and its token ids."""
    return hash((-1 if parent is None else parent, tuple(ids)))


class BlockAllocator:
    """Hands out page indices ``0 .. num_blocks - 1`` with reference counts and a prefix cache."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))  # plain free pages, oldest first
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free but registered, LRU first
        self._refcount = [0] * num_blocks
        self._generation = [0] * num_blocks
        # registration of a page: (hash, ids, parent page or -1, parent's generation)
        self._meta: list[tuple[int, tuple[int, ...], int, int] | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        self.num_evictions = 0

    # ------------------------------------------------------------------ counts
    @property
    def num_free(self) -> int:
        """Pages that an allocation can take (plain free + cached free)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered pages (in use or free) that a prefix lookup can find."""
        return len(self._by_hash)

    def refcount(self, block: int) -> int:
        self._check_index(block)
        return self._refcount[block]

    def is_registered(self, block: int) -> bool:
        self._check_index(block)
        return self._meta[block] is not None

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self.num_free

    # ------------------------------------------------------------------ allocation
    def allocate(self, n: int = 1) -> list[int]:
        """Take ``n`` free pages (reference count 1 each); all or nothing."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > self.num_free:
            raise OutOfBlocksError(f"need {n} free KV pages, only {self.num_free} of {self.num_blocks} are free")
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._cached_free.popitem(last=False)
                self._unregister(b)
                self.num_evictions += 1
            self._refcount[b] = 1
            self._generation[b] += 1
            blocks.append(b)
        return blocks

    def share(self, block: int) -> int:
        """Add a reference to a page in use (another sequence reads it); returns the new count."""
        self._check_index(block)
        if self._refcount[block] == 0:
            raise ValueError(f"block {block} is free and cannot be shared")
        self._refcount[block] += 1
        return self._refcount[block]

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each page; at zero a page becomes free (cached if registered)."""
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
                if self._meta[b] is not None:
                    self._cached_free[b] = None  # most recently freed last
                else:
                    self._free.append(b)

    # ------------------------------------------------------------------ prefix cache
    def register(self, block: int, block_hash: int, ids: Sequence[int], parent: int | None) -> bool:
        """Record that full page ``block`` holds ``ids`` after the page ``parent`` (None: first page).

        Returns False (and records nothing) when caching is off or another page already holds
        this hash. A registered page must never be written again.
        """
        self._check_index(block)
        if not self.enable_prefix_caching or self._meta[block] is not None:
            return False
        if self._refcount[block] == 0:
            raise ValueError(f"block {block} is free and cannot be registered")
        if block_hash in self._by_hash:
            return False
        parent_idx = -1 if parent is None else parent
        parent_gen = -1 if parent is None else self._generation[parent]
        self._meta[block] = (block_hash, tuple(ids), parent_idx, parent_gen)
        self._by_hash[block_hash] = block
        return True

    def lookup(self, block_hash: int, ids: Sequence[int], parent: int | None) -> int | None:
        """The registered page holding exactly ``ids`` after page ``parent``, or None."""
        if not self.enable_prefix_caching:
            return None
        b = self._by_hash.get(block_hash)
        if b is None:
            return None
        h, stored, parent_idx, parent_gen = self._meta[b]  # type: ignore[misc]
        if h != block_hash or stored != tuple(ids):
            return None  # a hash collision: ids differ
        if parent is None:
            return b if parent_idx == -1 else None
        if parent_idx != parent or parent_gen != self._generation[parent]:
            return None
        return b

    def acquire(self, block: int) -> None:
        """Take a reference to a registered page found by `lookup` (reviving it if it was free)."""
        self._check_index(block)
        if self._meta[block] is None:
            raise ValueError(f"block {block} is not a cached page")
        if self._refcount[block] == 0:
            del self._cached_free[block]
        self._refcount[block] += 1

    def make_private(self, block: int) -> bool:
        """Make a page writable again for its only holder: forget its registration. False when
        another sequence also holds it (it must then stay immutable)."""
        self._check_index(block)
        if self._refcount[block] != 1:
            return False
        self._unregister(block)
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every registered prefix (pages in use stay allocated)."""
        for b in list(self._by_hash.values()):
            self._unregister(b)
        while self._cached_free:
            b, _ = self._cached_free.popitem(last=False)
            self._free.append(b)

    def _unregister(self, block: int) -> None:
        meta = self._meta[block]
        if meta is not None:
            if self._by_hash.get(meta[0]) == block:
                del self._by_hash[meta[0]]
            self._meta[block] = None
            self._generation[block] += 1  # pages registered after it no longer chain to it

    def _check_index(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block index {block} outside the pool of {self.num_blocks} blocks")


class SequenceBlocks:
    """The pages of one sequence, in logical order, and which of them are registered in the cache.

    Invariant: the first ``num_hashed`` pages are full, computed and registered (or shareable),
    hence immutable; new keys/values are only ever written past them.
    """

    def __init__(self, allocator: BlockAllocator, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self.blocks: list[int] = []
        self.hashes: list[int] = []  # chained hash of each full, computed page (len == num_hashed)

    @property
    def num_hashed(self) -> int:
        return len(self.hashes)

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

    def match_prefix(self, token_ids: Sequence[int], max_tokens: int) -> int:
        """Take the cached pages that hold a prefix of ``token_ids`` (only full pages within the
        first ``max_tokens`` tokens); returns the number of tokens they cover. Only on an empty list."""
        if self.blocks:
            raise ValueError("match_prefix needs a sequence that holds no pages yet")
        ps, alloc = self.page_size, self.allocator
        parent_hash: int | None = None
        parent: int | None = None
        for i in range(max(0, max_tokens) // ps):
            ids = token_ids[i * ps:(i + 1) * ps]
            h = chain_hash(parent_hash, ids)
            b = alloc.lookup(h, ids, parent)
            if b is None:
                break
            alloc.acquire(b)
            self.blocks.append(b)
            self.hashes.append(h)
            parent_hash, parent = h, b
        return len(self.blocks) * ps

    def commit(self, token_ids: Sequence[int], num_computed: int) -> None:
        """Register the pages that ``num_computed`` computed tokens have filled since the last call."""
        ps, alloc = self.page_size, self.allocator
        full = min(num_computed // ps, len(self.blocks))
        for i in range(self.num_hashed, full):
            parent_hash = self.hashes[-1] if self.hashes else None
            parent = self.blocks[i - 1] if i else None
            ids = token_ids[i * ps:(i + 1) * ps]
            h = chain_hash(parent_hash, ids)
            alloc.register(self.blocks[i], h, ids, parent)
            self.hashes.append(h)

    def truncate(self, num_tokens: int) -> int:
        """Release the pages past the first ``num_tokens`` tokens; returns the tokens still held.

        A page cut in the middle will be written again, so its registration in the prefix cache
        is dropped; when another sequence shares it, it is dropped whole instead: the result is
        then rounded down to a page boundary and the caller must recompute the tokens past it.
        """
        num_tokens = max(0, num_tokens)
        full = num_tokens // self.page_size  # pages kept whole
        keep = -(-num_tokens // self.page_size)
        if keep > full and keep <= self.num_hashed and not self.allocator.make_private(self.blocks[keep - 1]):
            keep, num_tokens = full, full * self.page_size
        if keep < len(self.blocks):
            self.allocator.free(self.blocks[keep:])
            del self.blocks[keep:]
        del self.hashes[full:]
        return num_tokens

    def release(self) -> None:
        """Return every page held."""
        self.truncate(0)
