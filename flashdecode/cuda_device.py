"""Launching on the device of the tensors, not on the current CUDA device.

Triton kernels, CUDA streams, events and graphs act on the *current* CUDA device, whatever device
the tensors they are given live on. A kernel launched on ``cuda:0`` with pointers into ``cuda:1``
memory faults, or with peer access on reads across the interconnect, on a stream not ordered after
the work queued on ``cuda:1``. Every entry point that launches work therefore makes its tensors'
device current for the launch, as FlashAttention's C++ does with a device guard.
"""

from __future__ import annotations

import contextlib

import torch


def launch_on(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which ``device`` is the current CUDA device (nothing to do for a CPU device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
