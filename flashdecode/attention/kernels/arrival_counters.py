"""Arrival counters of the in-kernel merge (`last_split.merge_if_last`), reused across calls.

The merging program of each group sets its counter back to zero, so a buffer is all zeros
whenever no launch that uses it is running.

- Uncaptured calls: one buffer per (device, stream). Launches on one stream run in order (with
  programmatic dependent launch, a kernel's first load still waits for the previous kernel to
  finish), so no two launches share a buffer at the same time.
- CUDA-graph capture: every graph captured on a device uses that device's capture buffer, made
  (zeroed) by an uncaptured call beforehand, as the warm-up before a capture is; it is a buffer of
  its own, never one an uncaptured call launches with. Graphs that share
  it must not be replayed concurrently. A capture with no such buffer, or too small a one, gets a
  buffer of its own whose zero fill becomes a node of the graph, run at each replay; it is not
  kept for other calls, since its zeros exist only once the graph has run.
"""

from __future__ import annotations

import threading

import torch

from flashdecode.attention import ramps


class ArrivalCounters:
    """Zeroed int32 buffers, grown by replacement."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_stream: dict[tuple, torch.Tensor] = {}
        self._for_capture: dict[tuple, torch.Tensor] = {}
        # Replaced buffers stay alive: a captured graph may still use one.
        self._replaced: list[torch.Tensor] = []

    def get(self, device: torch.device, count: int) -> torch.Tensor:
        """At least ``count`` int32 counters on ``device``, all zero, for a launch on the current
        stream (or the capture under way)."""
        dev = (device.type, device.index)
        if ramps.capturing(device):
            with self._lock:
                shared = self._for_capture.get(dev)
            if shared is not None and shared.numel() >= count:
                return shared
            return torch.zeros(count, dtype=torch.int32, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        with self._lock:
            self._grown(self._for_capture, dev, device, count)
            return self._grown(self._by_stream, dev + (stream,), device, count)

    def _grown(self, buffers: dict, key: tuple, device: torch.device, count: int) -> torch.Tensor:
        buffer = buffers.get(key)
        if buffer is not None and buffer.numel() >= count:
            return buffer
        size = max(count, 2 * buffer.numel()) if buffer is not None else count
        if buffer is not None:
            self._replaced.append(buffer)
        buffers[key] = torch.zeros(size, dtype=torch.int32, device=device)
        return buffers[key]
