"""The block allocator, per-sequence page lists and the paged KV pool (plain Python, no model)."""

from __future__ import annotations

import pytest
import torch

from flashdecode.cache import BlockAllocator, OutOfBlocksError, PagedKVPool, SequenceBlocks


def test_allocate_and_free_round_trip():
    a = BlockAllocator(4)
    got = a.allocate(3)
    assert sorted(got) == got and len(set(got)) == 3
    assert (a.num_free, a.num_used) == (1, 3)
    assert all(a.refcount(b) == 1 for b in got)
    a.free(got)
    assert a.num_free == 4 and all(a.refcount(b) == 0 for b in got)


def test_exhaustion_is_all_or_nothing():
    a = BlockAllocator(3)
    a.allocate(2)
    assert not a.can_allocate(2) and a.can_allocate(1)
    with pytest.raises(OutOfBlocksError, match="2 free"):
        a.allocate(2)
    assert a.num_free == 1  # nothing was taken


def test_reference_counts_keep_shared_pages():
    a = BlockAllocator(2)
    [b] = a.allocate(1)
    assert a.share(b) == 2
    a.free([b])
    assert a.refcount(b) == 1 and a.num_free == 1
    a.free([b])
    assert a.refcount(b) == 0 and a.num_free == 2


def test_freed_pages_are_reused_least_recent_first():
    a = BlockAllocator(4)
    first = a.allocate(4)
    a.free([first[2]])
    a.free([first[0]])
    assert a.allocate(2) == [first[2], first[0]]


def test_errors():
    with pytest.raises(ValueError):
        BlockAllocator(0)
    a = BlockAllocator(2)
    with pytest.raises(ValueError, match="double free"):
        a.free([0])
    with pytest.raises(ValueError, match="outside"):
        a.refcount(5)
    with pytest.raises(ValueError, match="free"):
        a.share(1)
    b = a.allocate(1)
    with pytest.raises(ValueError, match="double free"):
        a.free(b + b)  # checked before anything is released
    assert a.refcount(b[0]) == 1


def test_sequence_blocks_grow_truncate_release():
    a = BlockAllocator(10)
    s = SequenceBlocks(a, page_size=4)
    s.ensure_capacity(1)
    assert len(s.blocks) == 1 and s.capacity == 4
    s.ensure_capacity(4)
    assert len(s.blocks) == 1
    assert s.pages_needed(9) == 2
    s.ensure_capacity(9)
    assert len(s.blocks) == 3 and a.num_free == 7
    s.truncate(5)
    assert len(s.blocks) == 2 and a.num_free == 8
    with pytest.raises(OutOfBlocksError):
        s.ensure_capacity(4 * 20)
    assert len(s.blocks) == 2
    s.release()
    assert s.blocks == [] and a.num_free == 10


def test_pool_is_one_allocation_with_per_layer_views():
    pool = PagedKVPool(num_layers=3, num_blocks=5, page_size=4, num_kv_heads=2, head_dim=8)
    assert pool.storage.shape == (2, 3, 5, 4, 2, 8) and pool.num_tokens == 20
    k1, v1 = pool.k_cache(1), pool.v_cache(1)
    assert k1.shape == (5, 4, 2, 8) and k1.is_contiguous()
    assert k1.data_ptr() != v1.data_ptr()
    k1[2, 3] = 1.0
    assert pool.storage[0, 1, 2, 3].eq(1).all() and pool.storage.sum() == 16
    assert PagedKVPool.bytes_per_block(3, 4, 2, 8, torch.bfloat16) == 2 * 3 * 4 * 2 * 8 * 2
    with pytest.raises(ValueError, match="page_size"):
        PagedKVPool(1, 1, 0, 1, 8)
