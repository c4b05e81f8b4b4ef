"""Measured bandwidth ceilings of the card, in the same process as the benchmark.

* read: a large read-only reduction (`sum` of a bf16 tensor of >= 2 GB into fp32);
  bytes = the tensor's size. This is the ceiling decode attention is compared with.
* copy: `dst.copy_(src)` of the same size; bytes = read + written.

Median of many runs (CUDA events, after warm-up). On CPU a small tensor gives a rough figure so
the report can be exercised in smoke tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from flashdecode.bench.timing import measure


@dataclass
class Ceilings:
    read_gbs: float | None = None
    copy_gbs: float | None = None
    read_bytes: int = 0
    copy_bytes: int = 0
    read_us: float | None = None
    copy_us: float | None = None
    samples: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_ceilings(device: torch.device | str, *, size_bytes: int | None = None, quick: bool = False,
                     log=print) -> Ceilings:
    """Read and copy bandwidth (GB/s = 1e9 bytes/s). Never raises: failures land in `notes`."""
    dev = torch.device(device)
    res = Ceilings()
    if size_bytes is None:
        size_bytes = (2 << 30) if dev.type == "cuda" else (8 << 20)
    if dev.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(dev)
            # copy needs two buffers; keep 4 GB spare for the rest of the run
            limit = max(256 << 20, (free - (4 << 30)) // 2)
            if size_bytes > limit:
                res.notes.append(f"ceiling buffer cut to {limit / 1e9:.2f} GB (free memory)")
                size_bytes = int(limit)
        except Exception as exc:
            res.notes.append(f"mem_get_info failed: {exc}")
    numel = int(size_bytes // 2)
    src = dst = None
    try:
        src = torch.empty(numel, dtype=torch.bfloat16, device=dev)
        src.uniform_(-1.0, 1.0)  # real data (not zeros), written once before timing
        res.read_bytes = src.numel() * src.element_size()
        us, n = _median_us(lambda: torch.sum(src, dtype=torch.float32), dev)
        res.read_us, res.samples = us, n
        res.read_gbs = res.read_bytes / (us * 1e-6) / 1e9
        log(f"  read ceiling: {res.read_gbs:8.1f} GB/s  (sum of {res.read_bytes / 1e9:.2f} GB bf16, median {us:.1f} us)")
    except Exception as exc:
        res.notes.append(f"read ceiling failed: {type(exc).__name__}: {exc}")
        log(f"  read ceiling failed: {type(exc).__name__}: {exc}")
    try:
        if src is None:
            raise RuntimeError("no source buffer")
        dst = torch.empty_like(src)
        res.copy_bytes = 2 * src.numel() * src.element_size()
        us, _ = _median_us(lambda: dst.copy_(src), dev)
        res.copy_us = us
        res.copy_gbs = res.copy_bytes / (us * 1e-6) / 1e9
        log(f"  copy ceiling: {res.copy_gbs:8.1f} GB/s  (copy, read + write {res.copy_bytes / 1e9:.2f} GB, median {us:.1f} us)")
    except Exception as exc:
        res.notes.append(f"copy ceiling failed: {type(exc).__name__}: {exc}")
        log(f"  copy ceiling failed: {type(exc).__name__}: {exc}")
    src = dst = None  # free the buffers
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _median_us(fn, dev: torch.device) -> tuple[float, int]:
    # Buffers far exceed L2, so no rotation is needed; events around each call, many runs.
    t = measure(lambda _s: fn(), [None], device=dev, timer="events", quick=False)
    return t.median_us, t.samples
