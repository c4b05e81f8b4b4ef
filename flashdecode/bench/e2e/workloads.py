"""Workload data: random prompts and the throughput workload's requests."""

from __future__ import annotations

import random


from flashdecode.bench.e2e.config import Workload


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(length)]


def throughput_requests(wl: Workload, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) of every request; the same for every implementation of a model."""
    rng = random.Random(seed * 7919 + 17)
    out = []
    for _ in range(wl.requests):
        p = rng.randint(*wl.prompt_range)
        o = rng.randint(*wl.output_range)
        out.append((random_prompt(rng, p, vocab), o))
    return out


def hf_batches(requests: list[tuple[list[int], int]], batch_size: int) -> list[list[int]]:
    """Indices of the requests in each padded transformers batch: sorted by output length (then
    prompt length), longest first, so each batch's lengths are close (favourable to transformers)."""
    order = sorted(range(len(requests)), key=lambda i: (requests[i][1], len(requests[i][0])), reverse=True)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
