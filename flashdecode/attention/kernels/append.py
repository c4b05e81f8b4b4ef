"""Append new keys/values into the paged cache in place, applying rotary to the keys."""

from __future__ import annotations

import triton
import triton.language as tl

from flashdecode.attention.kernels.rotary import load_rotated
from flashdecode.attention.kernels.rounding import cast_to


@triton.jit
def load_new_rows(
    K_NEW,
    V_NEW,
    rows,
    valid,
    rpos,
    hk,
    COS,
    SIN,
    stride_cos,
    seqlen_ro,
    stride_knt,
    stride_knh,
    stride_knd,
    stride_vnt,
    stride_vnh,
    stride_vnd,
    K_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """New keys and values of packed rows ``rows`` (KV head ``hk``) exactly as the cache stores
    them: keys rotated at positions ``rpos`` and rounded to ``K_DTYPE``, values in ``V_DTYPE``.
    Rows with ``valid`` false read as zeros."""
    offs_d = tl.arange(0, HEAD_DIM_P2)
    mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    row64 = rows.to(tl.int64)
    k_src = K_NEW + row64 * stride_knt + hk * stride_knh
    if ROTARY_DIM > 0:
        k = load_rotated(
            k_src, valid, rpos, COS, SIN, stride_cos, seqlen_ro, stride_knd,
            HEAD_DIM, HEAD_DIM_P2, ROTARY_DIM, INTERLEAVED,
        )
    else:
        k = tl.load(k_src[:, None] + offs_d[None, :] * stride_knd, mask=mask, other=0.0)
    v = tl.load(V_NEW + row64[:, None] * stride_vnt + hk * stride_vnh + offs_d[None, :] * stride_vnd, mask=mask,
                other=0.0)
    return cast_to(k, K_DTYPE), v.to(V_DTYPE)


@triton.jit
def locate_new_rows(BT_ROW, n0, new_len, old_end, offs_t, total_new, num_pages, max_pages, page_size):
    """Where new keys ``offs_t`` of one sequence come from and go: (packed rows of ``K_NEW``, cache
    slots, page ids, writable). A key is writable when it exists (``offs_t < new_len``, its row
    inside ``K_NEW``), its slot is inside the block table and its page in the pool (the lengths may
    be bad when value checks are off)."""
    rows = n0 + offs_t
    slots = old_end + offs_t
    ok = (offs_t < new_len) & (rows >= 0) & (rows < total_new) & (slots >= 0)
    pidx = slots // page_size
    ok = ok & (pidx < max_pages)
    page = tl.load(BT_ROW + pidx, mask=ok, other=-1)
    return rows, slots, page, ok & (page >= 0) & (page < num_pages)


@triton.jit
def store_new_rows(
    k,
    v,
    K_CACHE,
    V_CACHE,
    page,
    slot,
    ok,
    hk,
    page_size,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_vd,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
):
    """Write rows ``k``/``v`` to cache slots ``slot`` on pages ``page`` where ``ok``."""
    offs_d = tl.arange(0, HEAD_DIM_P2)
    mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    in_page = (slot % page_size).to(tl.int64)
    page64 = page.to(tl.int64)
    k_dst = K_CACHE + page64 * stride_kp + in_page * stride_ks + hk * stride_kh
    tl.store(k_dst[:, None] + offs_d[None, :] * stride_kd, k, mask=mask)
    v_dst = V_CACHE + page64 * stride_vp + in_page * stride_vs + hk * stride_vh
    tl.store(v_dst[:, None] + offs_d[None, :] * stride_vd, v, mask=mask)


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
    row, slot, page, ok = locate_new_rows(
        BLOCK_TABLE + b.to(tl.int64) * stride_bt, n0, new_len, tl.load(CACHE_SEQLENS + b), offs_t, total_new,
        num_pages, max_pages, page_size,
    )
    rpos = offs_t
    if ROTARY_DIM > 0:
        rpos = tl.load(ROTARY_SEQLENS + b) + offs_t
    k, v = load_new_rows(
        K_NEW, V_NEW, row, ok, rpos, hk, COS, SIN, stride_cos, seqlen_ro,
        stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd,
        K_CACHE.dtype.element_ty, V_CACHE.dtype.element_ty, HEAD_DIM, HEAD_DIM_P2, ROTARY_DIM, INTERLEAVED,
    )
    store_new_rows(
        k, v, K_CACHE, V_CACHE, page, slot, ok, hk, page_size,
        stride_kp, stride_ks, stride_kh, stride_kd, stride_vp, stride_vs, stride_vh, stride_vd,
        HEAD_DIM, HEAD_DIM_P2,
    )
