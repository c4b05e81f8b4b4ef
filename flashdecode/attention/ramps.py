"""Small constant int32 tensors a call needs (query/key offsets, zero left-padding, row indices).

A decode step calls the op once per layer with the same batch, so ``[0, step, 2 * step, ...]``
is made once per (length, step, device) and reused. Making one is a kernel launch, and inside a
CUDA graph that launch is replayed with every call: on an H200 (2026-11-28) a batch-1 decode
graph took 16.7 µs where its attention and combine kernels took 11.2 (run 23), and 11.6 µs once
it stopped making four ramps inside the graph (run 24).

CUDA graphs: a ramp first made *during* a capture is only filled when the graph replays, so it
is used by that graph alone and never cached. A ramp made earlier (the warm-up call before a
capture) is reused by the graph, and from then on it is pinned: the graph reads its memory at
every replay, so it must never be freed. Unpinned ramps are kept in a bounded LRU.
"""

from __future__ import annotations

import collections
import threading

import torch

# Ramps kept for eager calls (those no graph has pinned); each is a few int32 values per sequence.
MAX_CACHED_RAMPS = 256

_Key = tuple[int, int, torch.device]
_lock = threading.Lock()
_recent: collections.OrderedDict[_Key, torch.Tensor] = collections.OrderedDict()
_pinned: dict[_Key, torch.Tensor] = {}


def _make(length: int, step: int, device: torch.device) -> torch.Tensor:
    if step:
        return torch.arange(0, length * step, step, dtype=torch.int32, device=device)
    return torch.zeros(length, dtype=torch.int32, device=device)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def ramp(length: int, step: int, device: torch.device) -> torch.Tensor:
    """``[0, step, 2 * step, ...]`` (``length`` int32 values) on ``device``; read-only."""
    key = (length, step, device)
    capturing = _capturing(device)
    with _lock:
        if key in _pinned:
            return _pinned[key]
        if key in _recent:
            if capturing:  # a graph now reads this memory at every replay
                _pinned[key] = _recent.pop(key)
                return _pinned[key]
            _recent.move_to_end(key)
            return _recent[key]
    made = _make(length, step, device)
    if capturing:
        return made
    with _lock:
        _recent[key] = made
        while len(_recent) > MAX_CACHED_RAMPS:
            _recent.popitem(last=False)
    return made


def offsets(batch: int, step: int, device: torch.device) -> torch.Tensor:
    """Start offsets of ``batch`` sequences of ``step`` rows each, plus the end: ``batch + 1`` values."""
    return ramp(batch + 1, step, device)
