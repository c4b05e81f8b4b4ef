"""The scheduler alone (plain Python): admission by pages, slots and token budget."""

from __future__ import annotations

import pytest

from flashdecode.cache import BlockAllocator, SequenceBlocks
from flashdecode.engine import SamplingParams
from flashdecode.engine.scheduler import Scheduler
from flashdecode.engine.sequence import Sequence


def _seq(alloc: BlockAllocator, i: int, prompt_len: int, max_tokens: int, page: int = 4) -> Sequence:
    return Sequence(seq_id=i, token_ids=list(range(prompt_len)), num_prompt_tokens=prompt_len,
                    params=SamplingParams(max_tokens=max_tokens), blocks=SequenceBlocks(alloc, page), max_length=1000)


def _run_step(step):
    """What the runner does: take pages for every token, mark them cached, append one token."""
    for s in step.seqs:
        s.blocks.ensure_capacity(len(s.token_ids))
        s.num_cached = len(s.token_ids)
        s.token_ids.append(0)


def test_prefill_then_decode_then_leave():
    alloc = BlockAllocator(16)
    sched = Scheduler(alloc, page_size=4, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _seq(alloc, 0, 5, 2), _seq(alloc, 1, 3, 3)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert step.is_prefill and step.seqs == [a, b]
    _run_step(step)
    step = sched.schedule()
    assert not step.is_prefill and step.seqs == [a, b]
    _run_step(step)
    sched.finish(a)  # reached its 2 tokens
    assert alloc.num_free == 16 - len(b.blocks.blocks)
    step = sched.schedule()
    assert step.seqs == [b]
    _run_step(step)
    sched.finish(b)
    assert sched.schedule() is None and alloc.num_free == 16


def test_admission_waits_for_pages_reserved_by_running_requests():
    alloc = BlockAllocator(4)  # 16 token slots
    sched = Scheduler(alloc, page_size=4, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _seq(alloc, 0, 4, 8), _seq(alloc, 1, 4, 4)  # a may reach 12 tokens = 3 pages; b needs 2
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert step.seqs == [a]  # b would not fit next to a's worst case
    _run_step(step)
    assert sched.schedule().seqs == [a] and list(sched.waiting) == [b]
    sched.finish(a)
    assert sched.schedule().seqs == [b]


def test_slot_and_token_budget_limits():
    alloc = BlockAllocator(100)
    sched = Scheduler(alloc, page_size=4, max_num_seqs=2, max_num_batched_tokens=10)
    seqs = [_seq(alloc, i, 6, 2) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule().seqs == [seqs[0]]  # 6 + 6 tokens would pass the budget of 10
    assert sched.schedule().seqs == [seqs[1]]  # next step admits the next one
    step = sched.schedule()
    assert not step.is_prefill and step.seqs == seqs[:2]  # 2 slots full


def test_a_long_prompt_alone_is_admitted_past_the_budget():
    alloc = BlockAllocator(100)
    sched = Scheduler(alloc, page_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    s = _seq(alloc, 0, 50, 1)
    sched.add(s)
    assert sched.schedule().seqs == [s]


def test_a_request_that_can_never_fit_is_reported():
    alloc = BlockAllocator(2)
    sched = Scheduler(alloc, page_size=4, max_num_seqs=4, max_num_batched_tokens=100)
    sched.add(_seq(alloc, 0, 8, 8))
    with pytest.raises(RuntimeError, match="KV pages"):
        sched.schedule()


def test_package_exports():
    import flashdecode
    import flashdecode.engine as engine

    assert flashdecode.LLM is engine.LLM and flashdecode.SamplingParams is engine.SamplingParams


def test_block_table_width_is_bucketed():
    from flashdecode.engine.runner import block_table, table_width

    assert [table_width(n) for n in (1, 2, 3, 4, 5, 33, 64)] == [1, 2, 4, 4, 8, 64, 64]
    assert table_width(33, max_pages=40) == 40 and table_width(3, max_pages=40) == 4
    alloc = BlockAllocator(20)
    a, b = _seq(alloc, 0, 9, 1), _seq(alloc, 1, 2, 1)
    a.blocks.ensure_capacity(9)
    b.blocks.ensure_capacity(2)
    table = block_table([a, b])
    assert table.dtype.is_floating_point is False and tuple(table.shape) == (2, 4)
    assert table[0, :3].tolist() == a.blocks.blocks and table[1].tolist() == b.blocks.blocks + [0, 0, 0]
