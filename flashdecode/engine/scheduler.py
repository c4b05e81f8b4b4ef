"""Continuous batching with chunked prefill, prefix caching and preemption, in plain Python.

Every step has a budget of ``max_num_batched_tokens`` new tokens. Running requests are served
first, oldest first: a decoding request costs one token, a request still prefilling gets the next
chunk of its prompt that fits in what is left of the budget. Then waiting requests are admitted,
first come first served, while slots (``max_num_seqs``), budget and pages last; a new request first
takes the cached pages that hold a prefix of its prompt and computes only the rest (at least the
tokens of its last page, so one token at least is always computed and no shared page is written).

Pages are taken only for the tokens a step computes. When a running request needs a page and none
is free, the most recently admitted running request is preempted: its pages are released (they
stay in the prefix cache until evicted) and it goes back to the front of the queue, to be
recomputed later from its prompt and the tokens it has generated so far. A request that could not
fit even alone in the pool is refused up front with a ValueError.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from flashdecode.cache import BlockAllocator, OutOfBlocksError
from flashdecode.engine.sequence import Sequence


@dataclass(frozen=True)
class ScheduledStep:
    """One forward pass: ``seqs[i]`` computes ``num_new_tokens[i]`` tokens starting at its ``num_cached``."""

    seqs: list[Sequence]
    num_new_tokens: list[int]

    @property
    def is_prefill(self) -> bool:
        """True when some sequence feeds more than one token (the packed varlen form of the op)."""
        return any(n != 1 for n in self.num_new_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether sequence ``i`` reaches its last token this step (and so samples the next one)."""
        s = self.seqs[i]
        return s.num_cached + self.num_new_tokens[i] == len(s.token_ids)


@dataclass
class SchedulerStats:
    """Counters since the scheduler was made (`LLM.stats`)."""

    steps: int = 0
    prompt_tokens: int = 0  # tokens to prefill at (re)admission, before prefix hits
    prefix_hit_tokens: int = 0  # of those, found in the prefix cache
    prefilled_tokens: int = 0  # of those, computed
    decode_tokens: int = 0
    preemptions: int = 0
    ahead_steps: int = 0  # decode steps launched before the previous step's tokens were read
    preempted_ids: deque[int] = field(default_factory=lambda: deque(maxlen=1024))  # the latest victims


class Scheduler:
    def __init__(self, allocator: BlockAllocator, page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.allocator = allocator
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.stats = SchedulerStats()

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def check(self, seq: Sequence) -> None:
        """ValueError when the request could not fit in the whole pool even alone."""
        need = self.pages_for(seq.max_total_tokens)
        if need > self.allocator.num_blocks:
            raise ValueError(f"request {seq.seq_id} may reach {seq.max_total_tokens} tokens = {need} KV pages, "
                             f"but the pool has {self.allocator.num_blocks}; lower max_tokens or enlarge the cache")

    def add(self, seq: Sequence) -> None:
        self.check(seq)
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ scheduling
    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        try:
            seq.blocks.ensure_capacity(num_tokens)
            return True
        except OutOfBlocksError:
            return False

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s pages and queue it (first) to be recomputed from all its tokens."""
        self.running.remove(seq)
        seq.blocks.release()
        seq.num_cached = 0
        seq.extra.pop("prefill_end", None)
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1
        self.stats.preempted_ids.append(seq.seq_id)

    def schedule(self) -> ScheduledStep | None:
        """The next step to run (pages already taken for it), or None when nothing is left."""
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.token_ids) - seq.num_cached, budget)
            if n <= 0:  # nothing to compute (cannot happen for requests run by the engine)
                i += 1
                continue
            while not self._grow(seq, seq.num_cached + n):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                counts.append(n)
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: it was the last one
        if not preempted:
            # never more running requests than budget tokens, so every decode fits in one step
            slots = min(self.max_num_seqs, self.max_num_batched_tokens)
            while self.waiting and budget > 0 and len(self.running) < slots:
                seq = self.waiting[0]
                fresh = not seq.blocks.blocks and seq.num_cached == 0
                if fresh:
                    seq.num_cached = seq.blocks.match_prefix(seq.token_ids, len(seq.token_ids) - 1)
                n = min(len(seq.token_ids) - seq.num_cached, budget)
                if not self._grow(seq, seq.num_cached + n):
                    if fresh:  # give the prefix pages back; they stay cached
                        seq.blocks.release()
                        seq.num_cached = 0
                    break
                self.waiting.popleft()
                self.running.append(seq)
                seq.extra["prefill_end"] = len(seq.token_ids)
                self.stats.prompt_tokens += len(seq.token_ids)
                self.stats.prefix_hit_tokens += seq.num_cached if fresh else 0
                seqs.append(seq)
                counts.append(n)
                budget -= n
        if not seqs:
            if preempted:  # the only running request gave its pages up: start over from the queue
                return self.schedule()
            if self.waiting and not self.running:
                seq = self.waiting[0]
                raise RuntimeError(f"request {seq.seq_id} needs {self.pages_for(len(seq.token_ids))} KV pages but "
                                   f"only {self.allocator.num_free} of {self.allocator.num_blocks} are free")
            return None
        self.stats.steps += 1
        for s, n in zip(seqs, counts):
            pre = max(0, min(s.num_cached + n, s.extra.get("prefill_end", 0)) - s.num_cached)
            self.stats.prefilled_tokens += pre
            self.stats.decode_tokens += n - pre
        return ScheduledStep(seqs, counts)

    def record_decode_step(self, num_seqs: int) -> None:
        """Count a decode step the engine ran for the running requests without `schedule` (one
        launched ahead, before the previous step's tokens were known; the row of a request that
        ended with the previous token is counted too, as computed)."""
        self.stats.steps += 1
        self.stats.ahead_steps += 1
        self.stats.decode_tokens += num_seqs

    # ------------------------------------------------------------------ after a step
    def finish(self, seq: Sequence, release: bool = True) -> None:
        """Remove a finished request; return its pages unless the caller keeps them (chat sessions)."""
        self.running.remove(seq)
        if release:
            seq.blocks.release()

    def abort_all(self) -> list[Sequence]:
        """Drop every request (after an error or an abandoned stream); pages go back to the pool."""
        dropped = list(self.waiting) + self.running
        for seq in dropped:
            if not seq.extra.get("keep_pages"):
                seq.blocks.release()
        self.waiting.clear()
        self.running.clear()
        return dropped
