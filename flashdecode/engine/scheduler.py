"""A simple batch scheduler: prefill the waiting prompts together, then decode every live request.

Each step is either a prefill (the uncached tokens of newly admitted requests, packed into one
forward pass) or a decode (one token for every running request, one forward pass). A request is
admitted only when the pool can hold its worst-case length on top of what running requests may
still need, so no request ever runs out of pages mid-way (issue 6 replaces this with preemption).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from flashdecode.cache import BlockAllocator
from flashdecode.engine.sequence import Sequence


@dataclass(frozen=True)
class ScheduledStep:
    seqs: list[Sequence]
    is_prefill: bool


class Scheduler:
    def __init__(self, allocator: BlockAllocator, page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _outstanding_pages(self, seq: Sequence) -> int:
        return max(0, self.pages_for(seq.max_total_tokens) - len(seq.blocks.blocks))

    def schedule(self) -> ScheduledStep | None:
        """The next step to run, or None when nothing is left."""
        admitted: list[Sequence] = []
        if self.waiting:
            budget = self.max_num_batched_tokens
            reserved = sum(self._outstanding_pages(s) for s in self.running)
            while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
                seq = self.waiting[0]
                new_tokens = len(seq.token_ids) - seq.num_cached
                need = self._outstanding_pages(seq)
                if admitted and new_tokens > budget:
                    break
                if reserved + need > self.allocator.num_free:
                    break
                self.waiting.popleft()
                admitted.append(seq)
                budget -= new_tokens
                reserved += need
        if admitted:
            self.running.extend(admitted)
            return ScheduledStep(admitted, is_prefill=True)
        if self.running:
            return ScheduledStep(list(self.running), is_prefill=False)
        if self.waiting:
            seq = self.waiting[0]
            raise RuntimeError(
                f"request {seq.seq_id} needs {self.pages_for(seq.max_total_tokens)} KV pages but only "
                f"{self.allocator.num_free} are free"
            )
        return None

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
