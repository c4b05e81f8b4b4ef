"""Arrival counters of the in-kernel merge (`last_split.merge_if_last`), reused across calls.

The merging program of each group sets its counter back to zero, so a buffer is all zeros
whenever no launch that uses it is running. One buffer per (device, stream): launches on one
stream run in order (with programmatic dependent launch, a kernel's first load still waits for the
previous kernel to finish), so no two launches share a buffer at the same time.

CUDA-graph capture: a capture uses the capturing stream's buffer if one was made outside a
capture; otherwise it gets a new zeroed buffer of its own (the zero fill becomes a node of the
graph and runs at each replay), which is not kept for other calls, since its zeros exist only once
the graph has run. Graphs that share a buffer must not be replayed concurrently, nor while an
uncaptured call on the capturing stream runs.
"""

from __future__ import annotations

import torch


class ArrivalCounters:
    """Zeroed int32 buffers by (device, stream), grown by replacement."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        # Replaced buffers stay alive: a captured graph may still use one.
        self._replaced: list[torch.Tensor] = []

    def get(self, device: torch.device, count: int) -> torch.Tensor:
        """At least ``count`` zeroed int32 counters on ``device`` for the current stream."""
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (device.type, device.index, stream)
        buffer = self._buffers.get(key)
        if buffer is not None and buffer.numel() >= count:
            return buffer
        fresh = torch.zeros(max(count, 2 * buffer.numel() if buffer is not None else 0), dtype=torch.int32,
                            device=device)
        if capturing:
            return fresh
        if buffer is not None:
            self._replaced.append(buffer)
        self._buffers[key] = fresh
        return fresh
