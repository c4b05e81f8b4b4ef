"""Rotary embedding applied on load (shared by the append and the attention kernels)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rotated(
    row_ptrs,
    row_mask,
    rpos,
    COS,
    SIN,
    stride_cos,
    seqlen_ro,
    stride_d,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """Load rows ``(R, HEAD_DIM_P2)`` (``row_ptrs`` points at channel 0 of each row) and rotate them.

    Row r is rotated by table row ``rpos[r]`` of ``COS``/``SIN`` (``(seqlen_ro, ROTARY_DIM // 2)``).
    Interleaved rotates channel pairs (2c, 2c + 1); otherwise (c, c + ROTARY_DIM / 2). Channels past
    ROTARY_DIM, and rows whose table position is out of range, pass through. Returns float32; the
    caller rounds to the storage dtype once, as the reference does.
    """
    HALF: tl.constexpr = ROTARY_DIM // 2
    offs_d = tl.arange(0, HEAD_DIM_P2)
    dmask = offs_d < HEAD_DIM
    x = tl.load(row_ptrs[:, None] + offs_d[None, :] * stride_d, mask=row_mask[:, None] & dmask[None, :], other=0.0)
    x = x.to(tl.float32)
    rot = offs_d < ROTARY_DIM
    if INTERLEAVED:
        partner = offs_d ^ 1
        cidx = offs_d // 2
        sign = tl.where((offs_d % 2) == 0, -1.0, 1.0)
    else:
        first = offs_d < HALF
        partner = tl.where(first, offs_d + HALF, offs_d - HALF)
        cidx = tl.where(first, offs_d, offs_d - HALF)
        sign = tl.where(first, -1.0, 1.0)
    pmask = row_mask[:, None] & rot[None, :]
    xp = tl.load(row_ptrs[:, None] + partner[None, :] * stride_d, mask=pmask, other=0.0).to(tl.float32)
    tmask = pmask & ((rpos >= 0) & (rpos < seqlen_ro))[:, None]
    toffs = rpos.to(tl.int64)[:, None] * stride_cos + cidx[None, :]
    c = tl.load(COS + toffs, mask=tmask, other=1.0).to(tl.float32)
    s = tl.load(SIN + toffs, mask=tmask, other=0.0).to(tl.float32)
    return tl.where(rot[None, :], x * c + sign[None, :] * xp * s, x)
