"""One key tile of the attention kernel: find its pages, load it, update the online softmax.

Used by `attention.py`'s key loops (``key_tile``) and its extra tile of new keys (``attend``).
Scores are in log2 units (the softmax scale carries log2(e)), so the update uses ``exp2``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flashdecode.attention.kernels.constants import LOG2E
from flashdecode.attention.kernels.rounding import cast_to


@triton.jit
def page_ids(
    BT_ROW, start, max_pages, page_size, BLOCK_N: tl.constexpr, TILE_IN_PAGE: tl.constexpr, GATHER_PAGE: tl.constexpr,
    SINGLE_PAGE: tl.constexpr, TABLE_ALIGNED: tl.constexpr = False, TILE_PAGE_SCALAR: tl.constexpr = False,
):
    """Page id of each slot of the key tile at ``start`` (-1 past the block table, or any id of
    the table for the slots of a tile past it with ``GATHER_PAGE``). With ``TILE_IN_PAGE`` and
    ``TILE_PAGE_SCALAR`` (the descriptor path of `key_tile`), the tile's one page id as a scalar.

    ``SINGLE_PAGE`` (a table of one page per sequence, as every contiguous cache has): the entry's
    address does not depend on ``start``, so its load needs no earlier load (the cache lengths) and
    the K/V loads can start one memory round trip sooner. Every slot a key tile reads is then below
    the capacity (the key loops stop there), hence in that page.

    ``GATHER_PAGE`` (a power of two that divides ``BLOCK_N``, or 0): the tile's
    ``BLOCK_N // GATHER_PAGE`` block-table entries are read once as a small vector and each one is
    repeated for the ``GATHER_PAGE`` slots of its page, instead of one lookup (and one integer
    division by the runtime page size) per slot. ``start`` must then be a multiple of ``BLOCK_N``
    (every processed tile is).

    ``TABLE_ALIGNED`` (with ``GATHER_PAGE``; the launcher's `aligned_table`): the table's width is a
    multiple of the tile's page count, so a tile's pages lie all in the table or all past it. The
    tile then reads its entries as one contiguous, aligned vector from a clamped start (a tile past
    the table reads the last ones; its slots are past the capacity and masked): vector loads
    instead of one load and one clamp per entry. ``start`` need not be a tile start there: the
    read is of the tile that holds it.
    """
    if SINGLE_PAGE:
        page = tl.load(BT_ROW) + tl.zeros([BLOCK_N], dtype=tl.int32)
    elif GATHER_PAGE > 0:
        NP: tl.constexpr = BLOCK_N // GATHER_PAGE
        if TABLE_ALIGNED:
            # Rounded down to the tile: the look-ahead before a key loop also reads at a range end
            # that is no tile start (a split with no tiles ends at the last key), and an unaligned
            # vector load faults on a GPU (misaligned address; the interpreter does not check).
            first = tl.multiple_of(tl.minimum((start // BLOCK_N) * NP, max_pages - NP), NP)
            pidx = first + tl.arange(0, NP)
        else:
            # Clamped to the table instead of masked: a slot past the table is past the capacity,
            # so every key loop masks it (or never reaches it), whatever page it gets.
            pidx = tl.minimum(start // GATHER_PAGE + tl.arange(0, NP), max_pages - 1)
        pg = tl.load(BT_ROW + pidx)
        page = tl.reshape(tl.broadcast_to(pg[:, None], (NP, GATHER_PAGE)), (BLOCK_N,))
    elif TILE_IN_PAGE:  # one page for the whole tile: one lookup, repeated for every slot
        pidx = start // page_size
        page = tl.load(BT_ROW + pidx, mask=pidx < max_pages, other=-1)
        if not TILE_PAGE_SCALAR:
            page = page + tl.zeros([BLOCK_N], dtype=tl.int32)
    else:
        pidx = (start + tl.arange(0, BLOCK_N)) // page_size
        page = tl.load(BT_ROW + pidx, mask=pidx < max_pages, other=-1)
    return page


@triton.jit
def wide_product(a, stride):
    """``a * stride`` as int64 for a non-negative int32 ``a`` and an int32 stride in [2, 2**31)
    (not 1: Triton passes an argument equal to 1 as a constant): one unsigned 32 x 32 -> 64-bit
    multiply instead of a sign extension and a 64 x 64 product."""
    return (a.to(tl.uint32).to(tl.uint64) * stride.to(tl.uint32).to(tl.uint64)).to(tl.int64)


@triton.jit
def pointer_tile(
    start,
    offs_n,
    page,
    K_BASE,
    V_BASE,
    num_pages,
    page_size,
    stride_kp,
    stride_ks,
    stride_kd,
    stride_vp,
    stride_vs,
    stride_vd,
    kv_lo,
    kv_hi,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    TILE_IN_PAGE: tl.constexpr,
    GATHER_PAGE: tl.constexpr,
    SINGLE_PAGE: tl.constexpr,
    OFFSETS_32: tl.constexpr,
):
    """(k, v, key_ok) of the key tile at ``start`` through per-thread pointers: ``page`` holds each
    slot's page id (`page_ids`); a masked tile loads zeros for the slots outside
    ``[kv_lo, kv_hi)`` or on a page outside the pool. ``page`` may be one scalar for the tile
    (`page_ids` with ``TILE_PAGE_SCALAR``)."""
    offs_d = tl.arange(0, HEAD_DIM_P2)
    page = page + tl.zeros([BLOCK_N], dtype=tl.int32)  # a scalar page id: one per slot
    # Per-row page arithmetic for every layout. (A variant with one 64-bit base per tile and 32-bit
    # row offsets for TILE_IN_PAGE, commit 6e33e80, had fewer instructions but more registers and
    # made the contiguous cache slower on an H200, run 15: B=8 L=8192 32/8 heads 96.5 us against
    # 80.4 us in run 4 and 77.3 us for the paged cache in the same run. Reverted.) With OFFSETS_32
    # the row offsets are unsigned 32 x 32 -> 64-bit products: compiled by Triton 3.6 for sm_90 the
    # unmasked key loop of the contiguous decode kernel (D=128, 64-key tiles) went from 343 to 308
    # instructions and the kernel from 152 to 105 registers; paged page 16 from 355 to 327, and at
    # D=64 (128-key tiles) from 460 to 406. On an H200 (2026-11-28, run 29, A/B in one call) B=1
    # L=4096 went from 11.1 to 10.6 us, MQA from 44.5 to 43.7, 9/3 heads from 30.8 to 30.3; the
    # other shapes moved by less than 0.5%.
    if MASKED:
        row_ok = (page >= 0) & (page < num_pages)
        page = tl.where(row_ok, page, 0)
    else:
        # An invalid page id (possible only with value checks off) reads the pool's last page
        # instead (a negative id is a large unsigned one): no load of an unmasked tile needs a
        # mask, and no load leaves the cache. One unsigned min per page id instead of two
        # compares and a select: with the clamped table reads of `page_ids`, the paged 9/3-head
        # decode (D=64, page 16) went from 32.8 to 31.8 us on an H200 (run 31, A/B in one call).
        # (num_pages - 1 takes the unsigned type of the other operand; no `.to` on it: Triton
        # passes num_pages == 1 as a constant, whose Python int has no `.to`.)
        page = tl.minimum(page.to(tl.uint32), num_pages - 1).to(tl.int32)
        row_ok = page >= 0  # unused: an unmasked tile has no key mask
    if SINGLE_PAGE:
        in_page = offs_n  # one page from slot 0: the slot is the in-page slot
    elif GATHER_PAGE > 0:
        # start is a multiple of BLOCK_N, hence of the page: the in-page slot is fixed per row.
        in_page = tl.arange(0, BLOCK_N) & (GATHER_PAGE - 1)
    elif TILE_IN_PAGE:
        in_page = (start % page_size) + tl.arange(0, BLOCK_N)
    else:
        in_page = offs_n % page_size
    if OFFSETS_32:
        k_row = wide_product(page, stride_kp) + wide_product(in_page, stride_ks)
        v_row = wide_product(page, stride_vp) + wide_product(in_page, stride_vs)
    else:
        k_row = page.to(tl.int64) * stride_kp + in_page.to(tl.int64) * stride_ks
        v_row = page.to(tl.int64) * stride_vp + in_page.to(tl.int64) * stride_vs
    k_ptrs = K_BASE + k_row[:, None] + offs_d[None, :] * stride_kd
    v_ptrs = V_BASE + v_row[:, None] + offs_d[None, :] * stride_vd
    if MASKED:
        key_ok = row_ok & (offs_n >= kv_lo) & (offs_n < kv_hi)
        ld_mask = key_ok[:, None]
    else:
        key_ok = row_ok
        ld_mask = tl.full([BLOCK_N, 1], True, tl.int1)
    if HEAD_DIM != HEAD_DIM_P2:
        ld_mask = ld_mask & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_ptrs, mask=ld_mask, other=0.0)
    v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
    return k, v, key_ok


@triton.jit
def key_tile(
    acc,
    l_i,
    m_i,
    q,
    start,
    page,
    K_BASE,
    V_BASE,
    num_pages,
    page_size,
    stride_kp,
    stride_ks,
    stride_kd,
    stride_vp,
    stride_vs,
    stride_vd,
    kv_lo,
    kv_hi,
    rel_row,
    slope,
    qk_scale,
    softcap_log2,
    window_left,
    window_right,
    K_DESC,
    V_DESC,
    tma_row,
    tma_col,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    TILE_IN_PAGE: tl.constexpr,
    GATHER_PAGE: tl.constexpr,
    SINGLE_PAGE: tl.constexpr,
    OFFSETS_32: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_WINDOW_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DOT_FP32: tl.constexpr,
    LATE_SUM: tl.constexpr,
    TMA_KV: tl.constexpr = False,
):
    """One key tile ``[start, start + BLOCK_N)`` of the online softmax.

    ``rel_row`` is ``i + (end - Sq)`` per row: key slot t is at bottom-right distance
    ``rel_row - t``. Unmasked tiles lie entirely inside every row's visible range, so they skip the
    score mask; only page-id validity guards their loads.

    ``TMA_KV`` (one page per sequence, or pages that hold whole tiles; the launcher's
    `kv_descriptors`): an unmasked tile is read through the tensor descriptors ``K_DESC``/``V_DESC``
    of the pool viewed as (slots, heads x dim), at the row of its first slot (one page per
    sequence: ``tma_row + start``, ``tma_row`` the sequence's page, clamped into the pool as
    `pointer_tile` clamps it, times the page size) and column ``tma_col`` (the KV head's first
    channel), instead of per-thread pointers. Masked tiles keep the pointer loads: their slots
    past the keys may hold anything, NaN included, which masked loads replace by zeros; zeroing
    the values of a descriptor load instead (0 * NaN is NaN in p @ v) took the kernel from 147 to
    208 registers and from 70 to 86 KiB of shared memory (Triton 3.6, sm_90).
    """
    offs_n = start + tl.arange(0, BLOCK_N)
    if TMA_KV and not MASKED:
        if SINGLE_PAGE:
            row = tma_row + start
        else:  # TILE_IN_PAGE: ``page`` is the tile's page id, a scalar; clamped as `pointer_tile` does
            row = tl.minimum(page.to(tl.uint32), num_pages - 1).to(tl.int32) * page_size + start % page_size
        k = K_DESC.load([row, tma_col])
        v = V_DESC.load([row, tma_col])
        key_ok = offs_n >= 0  # unused: an unmasked tile has no key mask
    else:
        k, v, key_ok = pointer_tile(
            start, offs_n, page, K_BASE, V_BASE, num_pages, page_size, stride_kp, stride_ks, stride_kd,
            stride_vp, stride_vs, stride_vd, kv_lo, kv_hi,
            HEAD_DIM, HEAD_DIM_P2, BLOCK_N, MASKED, TILE_IN_PAGE, GATHER_PAGE, SINGLE_PAGE, OFFSETS_32,
        )
    return attend(
        acc, l_i, m_i, q, k, v, offs_n, key_ok, rel_row, slope, qk_scale, softcap_log2, window_left, window_right,
        MASKED, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SOFTCAP, HAS_ALIBI, DOT_FP32, LATE_SUM,
    )


@triton.jit
def attend(
    acc,
    l_i,
    m_i,
    q,
    k,
    v,
    offs_n,
    key_ok,
    rel_row,
    slope,
    qk_scale,
    softcap_log2,
    window_left,
    window_right,
    MASKED: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_WINDOW_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DOT_FP32: tl.constexpr,
    LATE_SUM: tl.constexpr = False,
):
    """Online-softmax update of ``acc``/``l_i``/``m_i`` with keys ``k`` and values ``v`` at slots
    ``offs_n``; with ``MASKED``, keys with ``key_ok`` false or outside a row's window are skipped.

    ``LATE_SUM``: ``l_i`` is ``(rows, keys of the tile)``, the rescaled sum of the probabilities
    per key column, summed over the columns once after the key loop. The warps of a program split
    the keys of a tile, so a per-tile row sum costs a reduction across warps through shared memory
    (shuffles, stores, barriers, loads); this costs one multiply-add per element instead."""
    if DOT_FP32:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if HAS_SOFTCAP:
        # softcap * tanh(x / softcap), in log2 units; tanh(y) = 2 / (1 + exp(-2y)) - 1.
        y = qk * qk_scale
        s = softcap_log2 * (2.0 / (1.0 + tl.exp2(y * (-2.0 * LOG2E))) - 1.0)
    else:
        s = qk * qk_scale
    if HAS_ALIBI or MASKED:
        rel = rel_row[:, None] - offs_n[None, :]
    if HAS_ALIBI:
        s = s - slope[:, None] * tl.abs(rel).to(tl.float32)
    if MASKED:
        vis = key_ok[None, :]
        if HAS_WINDOW_RIGHT:
            vis = vis & (rel >= -window_right)
        if HAS_WINDOW_LEFT:
            vis = vis & (rel <= window_left)
        s = tl.where(vis, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # A row with nothing visible so far keeps m = -inf; use 0 as its offset to avoid inf - inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    if LATE_SUM:
        l_i = l_i * alpha[:, None] + p
    else:
        l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_FP32:
        # Round p to v's dtype first, as the 16-bit tensor-core path does.
        acc += tl.dot(cast_to(p, v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(cast_to(p, v.dtype), v)
    return acc, l_i, m_new
