"""Merge split-KV partial results by their log-sum-exp (second pass of flash-decoding).

Up to ``COMBINE_TILE_ELEMENTS`` (launch.py) partial-output elements per row load in one go with the
LSEs; more splits are read chunk by chunk.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flashdecode.attention.kernels.constants import LN2
from flashdecode.attention.kernels.rounding import cast_to


@triton.jit
def combine_splits_kernel(
    O_PART,
    LSE_PART,
    OUT,
    LSE,
    num_splits,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    stride_od,
    stride_lse_h,
    stride_lse_t,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Grid ``(total_q, H)``: one program per query row and head, so that even a batch of one
    spreads the (splits x D) reads over many SMs.

    ``O_PART`` (splits, total_q, H, D) float32 holds each split's normalised output (last dim
    contiguous) and ``LSE_PART`` (splits, total_q, H) its log2-domain LSE (-inf: the split saw no
    key). Writes ``OUT`` (total_q, H, D) and ``LSE`` (H, total_q) natural log, +inf and zeros when
    no split saw a key. ``USE_PDL``: as in `attention_split_kernel`.
    """
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    l_row = LSE_PART + t * stride_lt + h * stride_lh
    o_row = O_PART + t * stride_pt + h * stride_ph
    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_ok = offs_d < HEAD_DIM
    offs_s = tl.arange(0, SPLITS_P2)
    s_ok = offs_s < num_splits
    lse = tl.load(l_row + offs_s.to(tl.int64) * stride_ls, mask=s_ok, other=float("-inf"))
    if SPLIT_CHUNK >= SPLITS_P2:
        # Every split in one tile: the partial outputs load together with the LSEs (their
        # addresses do not depend on them), one memory round trip instead of two.
        o = tl.load(o_row + offs_s.to(tl.int64)[:, None] * stride_ps + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w_all = tl.exp2(lse - m)
    denom = tl.sum(w_all, 0)

    if SPLIT_CHUNK >= SPLITS_P2:
        # An empty split has w == 0; `where` also keeps it from spreading a stray NaN.
        acc = tl.sum(tl.where((w_all > 0.0)[:, None], w_all[:, None] * o, 0.0), 0)
    else:
        offs_c = tl.arange(0, SPLIT_CHUNK)
        acc = tl.zeros([HEAD_DIM_P2], dtype=tl.float32)
        for s0 in range(0, num_splits, SPLIT_CHUNK):
            s = s0 + offs_c
            c_ok = s < num_splits
            s64 = s.to(tl.int64)
            w = tl.exp2(tl.load(l_row + s64 * stride_ls, mask=c_ok, other=float("-inf")) - m)
            o = tl.load(o_row + s64[:, None] * stride_ps + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc += tl.sum(tl.where((w > 0.0)[:, None], w[:, None] * o, 0.0), 0)

    if USE_PDL:  # as in `attention_split_kernel`: the next kernel launches for this one's tail
        tl.extra.cuda.gdc_launch_dependents()
    has_key = denom > 0.0
    out = acc / tl.where(has_key, denom, 1.0)
    out_lse = tl.where(has_key, (m + tl.log2(tl.where(has_key, denom, 1.0))) * LN2, float("inf"))
    tl.store(OUT + t * stride_ot + h * stride_oh + offs_d * stride_od, cast_to(out, OUT.dtype.element_ty), mask=d_ok)
    tl.store(LSE + h * stride_lse_h + t * stride_lse_t, out_lse)
