"""Merge of the split partials by the last split to finish (``COMBINE_IN_KERNEL``), instead of a
second kernel (`combine.py`).

Every program of a split launch stores its partial output and LSE, then counts itself in on one
counter per (query tile, KV head, sequence), zero before the launch. The program that arrives
last sets it back to zero, reads every split's partials for its rows and writes the final output.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flashdecode.attention.kernels.constants import LN2
from flashdecode.attention.kernels.rounding import cast_to


@triton.jit
def merge_if_last(
    COUNTER,
    num_splits,
    O_PART,
    LSE_PART,
    stride_os,
    stride_ls,
    o_rows,
    l_offs,
    offs_d,
    o_mask,
    row_ok,
    FINAL_OUT,
    FINAL_LSE,
    f_rows,
    stride_fod,
    f_lse,
    BLOCK_M: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
):
    """``O_PART + s * stride_os + o_rows`` / ``LSE_PART + s * stride_ls + l_offs``: split s's
    partial rows, as `attention_split_kernel` stores them (log2-domain LSE, -inf for a split that
    saw no key). Writes ``FINAL_OUT + f_rows`` in its dtype and ``FINAL_LSE + f_lse`` in natural
    log (+inf and zeros for a row no split saw a key for), as `combine_splits_kernel` does."""
    # Every thread's partial stores come before the counter's release; the acquire of the last
    # program orders its reads after every other program's stores.
    tl.debug_barrier()
    arrived = tl.atomic_add(COUNTER, 1, sem="acq_rel")
    if arrived == num_splits - 1:
        tl.atomic_xchg(COUNTER, 0)  # every split has arrived: zero for the next launch
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)
        for s in range(0, num_splits):
            s64 = tl.full([], 0, tl.int64) + s  # (no `.to`: the interpreter's loop index is an int)
            # .cg: from L2, never from a line this SM's L1 may hold from before the stores.
            lse = tl.load(LSE_PART + s64 * stride_ls + l_offs, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
            o = tl.load(O_PART + s64 * stride_os + o_rows[:, None] + offs_d[None, :], mask=o_mask, other=0.0,
                        cache_modifier=".cg")
            m_new = tl.maximum(m, lse)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_use)
            w = tl.exp2(lse - m_use)
            denom = denom * alpha + w
            # An empty split has w == 0; `where` also keeps it from spreading a stray NaN.
            acc = acc * alpha[:, None] + tl.where((w > 0.0)[:, None], w[:, None] * o, 0.0)
            m = m_new
        has_key = denom > 0.0
        out = acc / tl.where(has_key, denom, 1.0)[:, None]
        m_fin = tl.where(m == float("-inf"), 0.0, m)
        out_lse = tl.where(has_key, (m_fin + tl.log2(tl.where(has_key, denom, 1.0))) * LN2, float("inf"))
        tl.store(FINAL_OUT + f_rows[:, None] + offs_d[None, :] * stride_fod, cast_to(out, FINAL_OUT.dtype.element_ty),
                 mask=o_mask)
        tl.store(FINAL_LSE + f_lse, out_lse, mask=row_ok)
