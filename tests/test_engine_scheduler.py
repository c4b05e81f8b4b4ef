"""The scheduler alone (plain Python, no model): continuous batching, chunked prefill under a token
budget, prefix hits, preemption under page pressure, exhaustion, order.

A fake model stands in for the network: it "computes" a token by writing its id into a fake KV
pool at the slot the block table gives, checks that every cached slot it reads holds the right
id (so shared, preempted and recomputed pages are checked for content), refuses to write into a
registered (shared, immutable) page, and picks the next token as a function of the whole sequence,
like greedy decoding.
"""

from __future__ import annotations

import pytest

from flashdecode.cache import BlockAllocator, SequenceBlocks
from flashdecode.engine import SamplingParams
from flashdecode.engine.scheduler import Scheduler
from flashdecode.engine.sequence import Sequence

PAGE = 4


def _seq(alloc: BlockAllocator, i: int, prompt, max_tokens: int, page: int = PAGE) -> Sequence:
    prompt = list(range(prompt)) if isinstance(prompt, int) else list(prompt)
    return Sequence(seq_id=i, token_ids=prompt, num_prompt_tokens=len(prompt),
                    params=SamplingParams(max_tokens=max_tokens), blocks=SequenceBlocks(alloc, page), max_length=1000)


def _next_token(ids: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(ids)) * 7919) % 997


class FakeModel:
    def __init__(self, alloc: BlockAllocator, page: int = PAGE) -> None:
        self.alloc = alloc
        self.page = page
        self.kv: dict[tuple[int, int], int] = {}
        self.steps: list[list[tuple[int, int]]] = []  # per step: (seq_id, new tokens)

    def run(self, sched: Scheduler, step) -> list[Sequence]:
        """Run a scheduled step like the runner + LLM do; returns the sequences that finished."""
        finished = []
        self.steps.append([(s.seq_id, n) for s, n in zip(step.seqs, step.num_new_tokens)])
        assert step.num_tokens <= sched.max_num_batched_tokens or len(step.seqs) == 1
        for i, (s, n) in enumerate(zip(step.seqs, step.num_new_tokens)):
            blocks = s.blocks.blocks
            for t in range(s.num_cached):  # read the cache
                assert self.kv[(blocks[t // self.page], t % self.page)] == s.token_ids[t], (s.seq_id, t)
            for t in range(s.num_cached, s.num_cached + n):  # write the new tokens
                b = blocks[t // self.page]
                assert not self.alloc.is_registered(b), "wrote into a cached (immutable) page"
                self.kv[(b, t % self.page)] = s.token_ids[t]
            sampled = step.samples(i)
            s.num_cached += n
            s.blocks.commit(s.token_ids, s.num_cached)
            if sampled:
                s.token_ids.append(_next_token(s.token_ids))
                if s.num_outputs >= s.params.max_tokens:
                    sched.finish(s)
                    finished.append(s)
        return finished


def _drain(sched: Scheduler, model: FakeModel, max_steps: int = 10_000) -> list[Sequence]:
    done = []
    for _ in range(max_steps):
        step = sched.schedule()
        if step is None:
            return done
        done += model.run(sched, step)
    raise AssertionError("did not finish")


def _alone(prompt, max_tokens: int) -> list[int]:
    alloc = BlockAllocator(1000)
    sched = Scheduler(alloc, PAGE, max_num_seqs=1, max_num_batched_tokens=10_000)
    s = _seq(alloc, 0, prompt, max_tokens)
    sched.add(s)
    _drain(sched, FakeModel(alloc))
    return s.output_ids


def test_prefill_then_decode_then_leave():
    alloc = BlockAllocator(16)
    sched = Scheduler(alloc, page_size=PAGE, max_num_seqs=8, max_num_batched_tokens=100)
    model = FakeModel(alloc)
    a, b = _seq(alloc, 0, 5, 2), _seq(alloc, 1, 3, 3)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert step.is_prefill and step.seqs == [a, b] and step.num_new_tokens == [5, 3]
    model.run(sched, step)
    step = sched.schedule()
    assert not step.is_prefill and step.seqs == [a, b] and step.num_new_tokens == [1, 1]
    assert model.run(sched, step) == [a]  # reached its 2 tokens
    assert alloc.num_used == len(b.blocks.blocks)
    step = sched.schedule()
    assert step.seqs == [b]
    model.run(sched, step)
    assert sched.schedule() is None and alloc.num_free == 16
    assert sched.stats.prefilled_tokens == 8 and sched.stats.decode_tokens == 3


def test_new_requests_join_while_others_decode():
    alloc = BlockAllocator(64)
    sched = Scheduler(alloc, PAGE, max_num_seqs=8, max_num_batched_tokens=100)
    model = FakeModel(alloc)
    a = _seq(alloc, 0, 6, 10)
    sched.add(a)
    model.run(sched, sched.schedule())
    model.run(sched, sched.schedule())
    b = _seq(alloc, 1, range(50, 59), 3)
    sched.add(b)
    step = sched.schedule()
    assert step.seqs == [a, b] and step.num_new_tokens == [1, 9]  # a keeps decoding while b prefills
    _drain(sched, model)
    assert a.output_ids == _alone(range(6), 10) and b.output_ids == _alone(range(50, 59), 3)


def test_chunked_prefill_respects_the_budget_and_decodes_go_first():
    alloc = BlockAllocator(64)
    sched = Scheduler(alloc, PAGE, max_num_seqs=8, max_num_batched_tokens=8)
    model = FakeModel(alloc)
    a = _seq(alloc, 0, 3, 12)
    sched.add(a)
    model.run(sched, sched.schedule())
    long = _seq(alloc, 1, 30, 4)
    sched.add(long)
    steps = []
    while long.num_outputs == 0:
        step = sched.schedule()
        assert step.num_tokens <= 8
        steps.append(list(zip([s.seq_id for s in step.seqs], step.num_new_tokens)))
        model.run(sched, step)
    # the decoding request runs every step (1 token), the long prompt gets the other 7 per step
    assert steps == [[(0, 1), (1, 7)]] * 4 + [[(0, 1), (1, 2)]]
    assert long.num_cached == 30
    _drain(sched, model)
    assert long.output_ids == _alone(range(30), 4) and a.output_ids == _alone(range(3), 12)


def test_budget_of_one_token_still_completes():
    alloc = BlockAllocator(64)
    sched = Scheduler(alloc, PAGE, max_num_seqs=4, max_num_batched_tokens=1)
    model = FakeModel(alloc)
    seqs = [_seq(alloc, i, 3 + i, 3) for i in range(3)]
    for s in seqs:
        sched.add(s)
    _drain(sched, model)
    assert all(len(step) == 1 and step[0][1] == 1 for step in model.steps)
    assert [s.output_ids for s in seqs] == [_alone(range(3 + i), 3) for i in range(3)]


def test_slot_limit_and_first_come_first_served():
    alloc = BlockAllocator(100)
    sched = Scheduler(alloc, PAGE, max_num_seqs=2, max_num_batched_tokens=100)
    model = FakeModel(alloc)
    seqs = [_seq(alloc, i, 6, 2 + i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    step = sched.schedule()
    assert step.seqs == seqs[:2]  # 2 slots
    model.run(sched, step)
    assert sched.schedule().seqs == seqs[:2]
    done = _drain(sched, model)
    assert [s.seq_id for s in done] == [0, 1, 2, 3]  # admitted in order, as slots free up


def test_prefix_hit_reuses_pages_and_computes_only_the_rest():
    alloc = BlockAllocator(32)
    sched = Scheduler(alloc, PAGE, max_num_seqs=8, max_num_batched_tokens=100)
    model = FakeModel(alloc)
    shared = list(range(100, 110))  # 2 full pages + 2 tokens
    a = _seq(alloc, 0, shared + [1, 2, 3], 3)
    sched.add(a)
    _drain(sched, model)
    assert alloc.num_used == 0 and alloc.num_cached >= 3  # freed pages stay cached
    b = _seq(alloc, 1, shared + [7], 3)
    sched.add(b)
    step = sched.schedule()
    assert b.num_cached == 8 and step.num_new_tokens == [3]  # 2 pages hit, 3 tokens computed
    assert sched.stats.prefix_hit_tokens == 8
    _drain(sched, model)
    assert b.output_ids == _alone(shared + [7], 3)


def test_full_hit_still_computes_the_last_page():
    alloc = BlockAllocator(32)
    sched = Scheduler(alloc, PAGE, max_num_seqs=8, max_num_batched_tokens=100)
    model = FakeModel(alloc)
    prompt = list(range(200, 208))  # exactly 2 pages
    for i in range(2):
        s = _seq(alloc, i, prompt, 2)
        sched.add(s)
        step = sched.schedule()
        assert step.num_new_tokens == ([8] if i == 0 else [4])  # never 0: the last page is recomputed
        _drain(sched, model)
        assert s.output_ids == _alone(prompt, 2)


def test_shared_prefix_pages_are_shared_while_both_run():
    alloc = BlockAllocator(32)
    sched = Scheduler(alloc, PAGE, max_num_seqs=8, max_num_batched_tokens=100)
    model = FakeModel(alloc)
    shared = list(range(300, 308))
    a = _seq(alloc, 0, shared + [1], 5)
    sched.add(a)
    model.run(sched, sched.schedule())
    b = _seq(alloc, 1, shared + [2, 3], 5)
    sched.add(b)
    model.run(sched, sched.schedule())
    assert a.blocks.blocks[:2] == b.blocks.blocks[:2]
    assert all(alloc.refcount(p) == 2 for p in a.blocks.blocks[:2])
    _drain(sched, model)
    assert a.output_ids == _alone(shared + [1], 5) and b.output_ids == _alone(shared + [2, 3], 5)


def test_hash_collision_is_not_trusted():
    from flashdecode.cache import allocator as mod

    alloc = BlockAllocator(16)
    s = SequenceBlocks(alloc, PAGE)
    s.ensure_capacity(8)
    s.commit([1, 2, 3, 4, 5, 6, 7, 8], 8)
    assert alloc.num_cached == 2
    h0 = mod.chain_hash(None, [1, 2, 3, 4])
    assert alloc.lookup(h0, [1, 2, 3, 4], None) == s.blocks[0]
    assert alloc.lookup(h0, [1, 2, 3, 9], None) is None  # same hash key, other ids
    h1 = mod.chain_hash(h0, [5, 6, 7, 8])
    assert alloc.lookup(h1, [5, 6, 7, 8], s.blocks[0]) == s.blocks[1]
    assert alloc.lookup(h1, [5, 6, 7, 8], None) is None  # wrong parent


def test_preemption_frees_the_newest_and_recomputes_it():
    alloc = BlockAllocator(8)  # 32 token slots
    sched = Scheduler(alloc, PAGE, max_num_seqs=8, max_num_batched_tokens=100)
    model = FakeModel(alloc)
    prompts = [list(range(10 * i, 10 * i + 6)) for i in range(3)]
    seqs = [_seq(alloc, i, p, 9) for i, p in enumerate(prompts)]  # each reaches 15 tokens = 4 pages
    for s in seqs:
        sched.add(s)
    done = _drain(sched, model)
    assert sched.stats.preemptions >= 1
    assert sched.stats.preempted_ids[0] == 2  # the most recently admitted goes first
    assert sorted(s.seq_id for s in done) == [0, 1, 2]
    for s, p in zip(seqs, prompts):
        assert s.output_ids == _alone(p, 9)
    assert alloc.num_used == 0


def test_a_preempted_request_resumes_before_newer_ones():
    alloc = BlockAllocator(6)  # 24 slots
    sched = Scheduler(alloc, PAGE, max_num_seqs=8, max_num_batched_tokens=100)
    model = FakeModel(alloc)
    a, b = _seq(alloc, 0, range(0, 8), 12), _seq(alloc, 1, range(40, 48), 8)  # reach 20 and 16 tokens
    sched.add(a)
    sched.add(b)
    while sched.stats.preemptions == 0:
        model.run(sched, sched.schedule())
    assert list(sched.waiting) == [b] and sched.running == [a]  # the newest gave way
    c = _seq(alloc, 2, range(80, 83), 2)
    sched.add(c)
    admitted = []
    while sched.has_work:
        step = sched.schedule()
        admitted += [s.seq_id for s in step.seqs if s.seq_id not in admitted]
        model.run(sched, step)
    assert admitted == [0, 1, 2]  # b (preempted, back at the front of the queue) before c (newer)
    assert b.output_ids == _alone(range(40, 48), 8) and c.output_ids == _alone(range(80, 83), 2)


def test_heavy_pressure_many_requests_all_complete():
    alloc = BlockAllocator(10)
    sched = Scheduler(alloc, PAGE, max_num_seqs=16, max_num_batched_tokens=16)
    model = FakeModel(alloc)
    prompts = [[(7 * i + j) % 50 for j in range(3 + (i * 5) % 11)] for i in range(12)]
    seqs = [_seq(alloc, i, p, 4 + i % 9) for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    _drain(sched, model)
    assert sched.stats.preemptions > 0
    for s, p in zip(seqs, prompts):
        assert s.output_ids == _alone(p, s.params.max_tokens)
    assert alloc.num_used == 0


def test_lru_eviction_only_when_a_free_page_is_needed():
    alloc = BlockAllocator(4)
    a, b = SequenceBlocks(alloc, PAGE), SequenceBlocks(alloc, PAGE)
    a.ensure_capacity(4)
    a.commit([1, 2, 3, 4], 4)
    b.ensure_capacity(4)
    b.commit([5, 6, 7, 8], 4)
    pa, pb = a.blocks[0], b.blocks[0]
    a.release()
    b.release()
    assert alloc.num_cached == 2 and alloc.num_free == 4
    c = SequenceBlocks(alloc, PAGE)
    c.ensure_capacity(8)  # 2 plain pages are free: nothing evicted
    assert alloc.num_cached == 2 and alloc.num_evictions == 0 and pa not in c.blocks
    c.ensure_capacity(12)  # one more: evicts the least recently freed cached page (a's)
    assert alloc.num_evictions == 1 and c.blocks[2] == pa
    d = SequenceBlocks(alloc, PAGE)
    assert d.match_prefix([1, 2, 3, 4, 0], 4) == 0  # a's prefix is gone
    assert d.match_prefix([5, 6, 7, 8, 0], 4) == 4 and d.blocks == [pb] and alloc.refcount(pb) == 1


def test_truncate_keeps_shared_pages_immutable():
    alloc = BlockAllocator(8)
    a = SequenceBlocks(alloc, PAGE)
    a.ensure_capacity(8)
    a.commit(list(range(8)), 8)
    assert a.truncate(6) == 6 and a.num_hashed == 1  # its own page: kept, made writable
    assert not alloc.is_registered(a.blocks[1])
    a.ensure_capacity(8)
    a.commit(list(range(8)), 8)
    b = SequenceBlocks(alloc, PAGE)
    assert b.match_prefix(list(range(8)) + [9], 8) == 8
    assert a.truncate(6) == 4 and len(a.blocks) == 1  # shared with b: dropped, recompute from 4
    assert alloc.is_registered(b.blocks[1])


def test_a_request_that_can_never_fit_is_refused_up_front():
    alloc = BlockAllocator(2)
    sched = Scheduler(alloc, page_size=PAGE, max_num_seqs=4, max_num_batched_tokens=100)
    with pytest.raises(ValueError, match="KV pages"):
        sched.add(_seq(alloc, 0, 8, 8))
    sched.add(_seq(alloc, 1, 4, 4))  # exactly the pool: fine
    _drain(sched, FakeModel(alloc))


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
