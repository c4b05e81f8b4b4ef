"""Append new keys/values into the paged cache in place, applying rotary to the keys."""

from __future__ import annotations

import triton
import triton.language as tl

from flashdecode.attention.kernels.rotary import load_rotated
from flashdecode.attention.kernels.rounding import cast_to


@triton.jit
def append_kv_kernel(
    K_NEW,
    V_NEW,
    K_CACHE,
    V_CACHE,
    BLOCK_TABLE,
    CACHE_SEQLENS,
    CU_SEQLENS_K_NEW,
    ROTARY_SEQLENS,
    COS,
    SIN,
    total_new,
    num_pages,
    max_pages,
    page_size,
    seqlen_ro,
    stride_knt,
    stride_knh,
    stride_knd,
    stride_vnt,
    stride_vnh,
    stride_vnd,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_bt,
    stride_cos,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """Grid ``(cdiv(max_seqlen_k_new, BLOCK_T), batch, num_kv_heads)``.

    New key j of sequence b goes to slot ``cache_seqlens[b] + j``. Rows whose slot is outside the
    block table's capacity, or whose page id is outside ``[0, num_pages)``, are not written: the
    lengths may be bad during CUDA-graph capture, where the host checks are skipped.
    """
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    n0 = tl.load(CU_SEQLENS_K_NEW + b)
    new_len = tl.load(CU_SEQLENS_K_NEW + b + 1) - n0
    if pid_t * BLOCK_T >= new_len:
        return
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row = n0 + offs_t
    valid = (offs_t < new_len) & (row >= 0) & (row < total_new)
    slot = tl.load(CACHE_SEQLENS + b) + offs_t
    pidx = slot // page_size
    valid = valid & (slot >= 0) & (pidx < max_pages)
    page = tl.load(BLOCK_TABLE + b.to(tl.int64) * stride_bt + pidx, mask=valid, other=-1)
    valid = valid & (page >= 0) & (page < num_pages)
    in_page = (slot - pidx * page_size).to(tl.int64)

    offs_d = tl.arange(0, HEAD_DIM_P2)
    mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    row64 = row.to(tl.int64)

    k_src = K_NEW + row64 * stride_knt + hk * stride_knh
    if ROTARY_DIM > 0:
        rpos = tl.load(ROTARY_SEQLENS + b) + offs_t
        k = load_rotated(
            k_src, valid, rpos, COS, SIN, stride_cos, seqlen_ro, stride_knd,
            HEAD_DIM, HEAD_DIM_P2, ROTARY_DIM, INTERLEAVED,
        )
    else:
        k = tl.load(k_src[:, None] + offs_d[None, :] * stride_knd, mask=mask, other=0.0)
    k_dst = K_CACHE + page.to(tl.int64) * stride_kp + in_page * stride_ks + hk * stride_kh
    tl.store(k_dst[:, None] + offs_d[None, :] * stride_kd, cast_to(k, K_CACHE.dtype.element_ty), mask=mask)

    v = tl.load(V_NEW + row64[:, None] * stride_vnt + hk * stride_vnh + offs_d[None, :] * stride_vnd, mask=mask)
    v_dst = V_CACHE + page.to(tl.int64) * stride_vp + in_page * stride_vs + hk * stride_vh
    tl.store(v_dst[:, None] + offs_d[None, :] * stride_vd, v, mask=mask)
