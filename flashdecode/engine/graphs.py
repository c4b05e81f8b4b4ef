"""Decode steps replayed as CUDA graphs, one per (batch-size bucket, block-table width).

On by default for CUDA (``LLM(cuda_graphs=None)``). The plumbing (static buffers, padding,
bucketing) is tested on the CPU with an eager stand-in for capture; replay against eager
execution is tested on the GPU (``tests/test_engine_serving.py -m gpu``).

A decode step (one new token for each of ``n`` sequences) runs the model on static input
buffers: token ids, ``cache_seqlens`` and a block table of ``bucket(n)`` rows. The rows past
``n`` are padding: length 0 and a block table pointing only at a scratch page that the block
manager never hands out, so they read nothing real and write only into that page. The op picks
its grid from shapes alone (never from values), so one capture per (bucket, width) stays valid
while lengths and tables change. Graphs are captured lazily, the first time a shape is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from flashdecode.cache import PagedKVPool
from flashdecode.models import AttentionMetadata, LlamaForCausalLM

Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two up to the first one that holds ``max_batch``."""
    out = [1]
    while out[-1] < max_batch:
        out.append(out[-1] * 2)
    return out


def cuda_capture(pool_handle) -> Capture:
    """Capture ``fn`` as a CUDA graph (after a warm-up run on a side stream); returns (replay, output)."""

    def capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up: Triton compiles and autotunes outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool_handle):
            out = fn()
        return graph.replay, out

    return capture


def eager_capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """Stand-in for `cuda_capture` (CPU tests): same static buffers, the model simply runs again."""
    out = fn()
    return (lambda: out.copy_(fn())), out


class DecodeGraphs:
    """Static buffers and captured decode graphs for one model and KV pool."""

    def __init__(self, model: LlamaForCausalLM, pool: PagedKVPool, scratch_page: int, max_batch: int,
                 capture: Capture | None = None) -> None:
        if not 0 <= scratch_page < pool.num_blocks:
            raise ValueError(f"scratch_page {scratch_page} is not a page of the pool")
        self.model = model
        self.pool = pool
        self.scratch_page = scratch_page
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        device = model.device
        if capture is None:
            if device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device")
            capture = cuda_capture(torch.cuda.graph_pool_handle())
        self.capture = capture
        self.device = device
        self.input_ids = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self.cache_seqlens = torch.zeros(self.max_batch, dtype=torch.int32, device=device)
        self.tables: dict[int, torch.Tensor] = {}
        self.graphs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        self.replays = 0

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"batch of {n} exceeds the largest graph bucket {self.max_batch}")

    def can_run(self, n: int) -> bool:
        return 1 <= n <= self.max_batch

    def is_captured(self, n: int, width: int) -> bool:
        """Whether a step of ``n`` rows and table ``width`` replays without a new capture (a capture
        overwrites the input buffers, so a step fed on the device must not need one)."""
        return self.can_run(n) and (self.bucket(n), width) in self.graphs

    def _table(self, width: int) -> torch.Tensor:
        if width not in self.tables:
            self.tables[width] = torch.full((self.max_batch, width), self.scratch_page, dtype=torch.int32,
                                            device=self.device)
        return self.tables[width]

    def _graph(self, bs: int, width: int) -> tuple[Callable[[], None], torch.Tensor]:
        key = (bs, width)
        if key not in self.graphs:
            table = self._table(width)
            self.input_ids[:bs].zero_()  # capture (and its warm-up run) on padding rows only
            self.cache_seqlens[:bs].zero_()
            table[:bs].fill_(self.scratch_page)
            meta = AttentionMetadata(cache_seqlens=self.cache_seqlens[:bs], block_table=table[:bs], check_values=False)
            ids = self.input_ids[:bs]
            self.graphs[key] = self.capture(lambda: self.model(ids, meta, self.pool))
        return self.graphs[key]

    def _upload(self, dst: torch.Tensor, src: np.ndarray) -> None:
        """Host-to-device copy that does not wait for the GPU: from page-locked memory (a copy from
        pageable memory would first wait for all work queued before it)."""
        host = torch.from_numpy(src)
        if dst.is_cuda:
            host = host.pin_memory()
        dst.copy_(host, non_blocking=True)

    def feed(self, next_ids: torch.Tensor) -> None:
        """Write a step's sampled tokens into the input ids, for a decode step launched before
        they reach the host (``run(None, ...)``)."""
        self.input_ids[:next_ids.shape[0]].copy_(next_ids)

    def run(self, ids: list[int] | None, cache_seqlens: list[int], table: np.ndarray) -> torch.Tensor:
        """Logits ``(n, vocab)`` of one decode step: ``ids[i]`` is appended at ``cache_seqlens[i]``
        of the sequence whose pages are ``table[i]`` (``(n, width)`` int32). ``ids=None`` keeps the
        ids already on the device (written by `feed`)."""
        n, width = table.shape
        bs = self.bucket(n)
        replay, out = self._graph(bs, width)
        if ids is not None:
            host_ids = np.zeros(bs, dtype=np.int64)
            host_ids[:n] = ids
            self._upload(self.input_ids[:bs], host_ids)
        host_lens = np.zeros(bs, dtype=np.int32)
        host_lens[:n] = cache_seqlens
        host_table = np.full((bs, width), self.scratch_page, dtype=np.int32)
        host_table[:n] = table
        self._upload(self.cache_seqlens[:bs], host_lens)
        self._upload(self.tables[width][:bs], host_table)
        replay()
        self.replays += 1
        return out[:n]
