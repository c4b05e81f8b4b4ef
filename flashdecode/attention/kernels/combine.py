"""Merge split-KV partial results by their log-sum-exp (second pass of flash-decoding)."""

from __future__ import annotations

import triton
import triton.language as tl

from flashdecode.attention.kernels.rounding import cast_to

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def combine_splits_kernel(
    O_PART,
    LSE_PART,
    OUT,
    LSE,
    num_splits,
    num_heads,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    stride_ot,
    stride_oh,
    stride_od,
    stride_lse_h,
    stride_lse_t,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):
    """Grid ``(total_q, cdiv(H, BLOCK_H))``.

    ``O_PART`` (splits, total_q, H, D) float32 holds each split's normalised output and
    ``LSE_PART`` (splits, total_q, H) its log2-domain LSE (-inf: the split saw no key). Writes
    ``OUT`` (total_q, H, D) and ``LSE`` (H, total_q) natural log, +inf and zeros when no split saw
    a key.
    """
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < num_heads
    offs_s = tl.arange(0, SPLITS_P2)
    lse = tl.load(
        LSE_PART + offs_s.to(tl.int64)[:, None] * stride_ls + t * stride_lt + offs_h[None, :],
        mask=(offs_s < num_splits)[:, None] & h_ok[None, :],
        other=float("-inf"),
    )
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp2(lse - m[None, :]), 0)

    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_ok = offs_d < HEAD_DIM
    mask = h_ok[:, None] & d_ok[None, :]
    acc = tl.zeros([BLOCK_H, HEAD_DIM_P2], dtype=tl.float32)
    # Pointers advance split by split (64-bit pointer arithmetic, no int32 product).
    p_rows = O_PART + t * stride_pt + offs_h[:, None] * stride_ph + offs_d[None, :]
    l_row = LSE_PART + t * stride_lt + offs_h
    for _ in range(num_splits):
        ls = tl.load(l_row, mask=h_ok, other=float("-inf"))
        w = tl.exp2(ls - m)
        o = tl.load(p_rows, mask=mask, other=0.0)
        # An empty split has w == 0; `where` also keeps it from spreading a stray NaN.
        acc += tl.where((w > 0.0)[:, None], w[:, None] * o, 0.0)
        p_rows += stride_ps
        l_row += stride_ls

    has_key = denom > 0.0
    out = acc / tl.where(has_key, denom, 1.0)[:, None]
    out_lse = tl.where(has_key, (m + tl.log2(tl.where(has_key, denom, 1.0))) * LN2, float("inf"))
    tl.store(OUT + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od,
             cast_to(out, OUT.dtype.element_ty), mask=mask)
    tl.store(LSE + offs_h * stride_lse_h + t * stride_lse_t, out_lse, mask=h_ok)
