"""Split-KV attention over a paged cache, with the query heads of a KV group packed into M.

One program handles one tile of ``BLOCK_M`` packed query rows of one sequence and one KV head,
and one split (a contiguous share) of the keys those rows can see. Row r of the tile is query
position ``r // GROUP`` and query head ``hk * GROUP + r % GROUP``, so every K/V tile is read once
for the whole group and the score product is a real ``tl.dot`` (M >= 16).

Scores are kept in log2 units (the softmax scale is pre-multiplied by log2(e)) so the online
softmax uses ``exp2``. Key tiles are aligned to absolute slots; the key loop runs in three parts:
masked tiles before the range every row fully sees, unmasked tiles, masked tiles after it. With a
single split the program writes the final output and LSE; otherwise a float32 partial output and
a log2-domain LSE that `combine.py` merges.

Paged K/V: a key tile finds the page of each slot in the block table. A page that is a multiple
of the tile takes one entry per tile (``TILE_IN_PAGE``); a page that is a power of two below the
tile (``GATHER_PAGE``, e.g. 16) takes the tile's few entries as one small vector, repeats each
for its page's slots and uses a constant in-page slot per row; any other page size looks up each
slot (a division by the runtime page size per slot). A table of one page per sequence (every
contiguous cache: ``SINGLE_PAGE``) reads its one entry without waiting for the cache lengths. All
read the same addresses. With ``TMA_KV`` (`launch.kv_descriptors`) the unmasked
tiles of a contiguous cache, or of pages that hold whole tiles, come through tensor descriptors
(TMA on Hopper) instead of pointers.

Fused append (``APPEND``, a few new keys per sequence): the kernel also writes the new keys and
values into the cache, and reads them from the new-key tensors as one extra tile (see the kernel's
docstring), so decode runs one kernel (two with splits: the combine) instead of an append kernel
first.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flashdecode.attention.kernels.append import load_new_rows, locate_new_rows, store_new_rows
from flashdecode.attention.kernels.constants import LN2, LOG2E
from flashdecode.attention.kernels.key_tile import attend, key_tile, page_ids
from flashdecode.attention.kernels.rotary import load_rotated
from flashdecode.attention.kernels.rounding import cast_to


@triton.jit
def attention_split_kernel(
    Q,
    K_CACHE,
    V_CACHE,
    BLOCK_TABLE,
    CU_SEQLENS_Q,
    CACHE_SEQLENS,
    CACHE_LEFTPAD,
    CU_SEQLENS_K_NEW,
    ROTARY_SEQLENS,
    COS,
    SIN,
    ALIBI,
    OUT,
    LSE,
    K_NEW,
    V_NEW,
    K_DESC,
    V_DESC,
    total_q,
    total_new,
    num_kv_heads,
    num_pages,
    max_pages,
    page_size,
    seqlen_ro,
    qk_scale,
    softcap_log2,
    window_left,
    window_right,
    stride_qt,
    stride_qh,
    stride_qd,
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
    stride_alibi,
    stride_os,
    stride_ot,
    stride_oh,
    stride_od,
    stride_ls,
    stride_lh,
    stride_lt,
    stride_knt,
    stride_knh,
    stride_knd,
    stride_vnt,
    stride_vnh,
    stride_vnd,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    TILE_IN_PAGE: tl.constexpr,
    GATHER_PAGE: tl.constexpr,
    SINGLE_PAGE: tl.constexpr,
    TABLE_ALIGNED: tl.constexpr,
    OFFSETS_32: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_WINDOW_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    ROTARY_INTERLEAVED: tl.constexpr,
    ROTARY_PER_POSITION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    LATE_SUM: tl.constexpr,
    APPEND: tl.constexpr,
    APPEND_ROWS: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    TMA_KV: tl.constexpr = False,
):
    """Grid ``(num_m_tiles * num_kv_heads, batch, num_splits)``.

    With ``APPEND`` (at most ``APPEND_ROWS`` new keys per sequence) the kernel also appends: one
    program per sequence and KV head writes the new keys (rotated) and values into the cache, and
    the programs of the last split take the new keys straight from ``K_NEW``/``V_NEW`` as one
    extra key tile, so no program reads a cache slot this launch writes. Without it the new keys
    are already in the cache (`append_kv_kernel` ran first).

    With ``SPLIT`` the outputs are the workspace: ``OUT`` (splits, total_q, H, D) float32 partial
    outputs (already divided by their own sum) and ``LSE`` a float32 log2-domain LSE per (split,
    head, token), -inf for an empty split (strides ``stride_ls, stride_lh, stride_lt``). Without it, ``OUT`` (total_q, H, D) in q's dtype and ``LSE``
    (H, total_q) natural-log float32, +inf and zeros for a row that sees no key.

    ``OFFSETS_32`` (the launcher's `offsets_32`): the cache's page and slot strides are in
    [2, 2**31), so key addresses take unsigned 32 x 32 -> 64-bit products (`wide_product`).

    ``LATE_SUM`` (the launcher's `late_row_sum`): the key loop keeps the softmax denominators per
    key column and sums them once after the loop (see `attend`).

    ``TMA_KV`` (the launcher's `kv_descriptors`; one page per sequence, or pages that hold whole
    tiles): unmasked cache tiles are read through the tensor descriptors ``K_DESC``/``V_DESC``
    (Hopper's TMA) instead of per-thread pointers; otherwise those two arguments are unused.

    ``USE_PDL`` (a launch with programmatic dependent launch): wait for the previous kernel before
    the first load; let the next kernel launch once the key loop is done, so that its launch
    overlaps only this kernel's tail. (Letting it launch at the start placed the next grid's
    programs on whichever SMs had room while this grid ran: back-to-back grids of about two
    programs per SM then ran unevenly, B=32 L=4096 32/8 heads in 164 µs instead of 128, H200,
    2026-11-28, run 24.)
    """
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    pid0 = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    hk = pid0 % num_kv_heads
    # Heaviest (last, under a causal mask) query tiles first.
    m_tile = tl.num_programs(0) // num_kv_heads - 1 - pid0 // num_kv_heads

    BT_ROW = BLOCK_TABLE + b.to(tl.int64) * stride_bt
    n0 = tl.load(CU_SEQLENS_K_NEW + b)
    new_len = tl.load(CU_SEQLENS_K_NEW + b + 1) - n0
    old_end = tl.load(CACHE_SEQLENS + b)
    if ROTARY_DIM > 0:
        rbase = tl.load(ROTARY_SEQLENS + b)
    else:
        rbase = 0
    if APPEND:
        if (split == 0) & (m_tile == 0):
            offs_t = tl.arange(0, APPEND_ROWS)
            new_rows, new_slots, page_w, ok_w = locate_new_rows(
                BT_ROW, n0, new_len, old_end, offs_t, total_new, num_pages, max_pages, page_size,
            )
            k_w, v_w = load_new_rows(
                K_NEW, V_NEW, new_rows, ok_w, rbase + offs_t, hk, COS, SIN, stride_cos, seqlen_ro,
                stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd,
                K_CACHE.dtype.element_ty, V_CACHE.dtype.element_ty, HEAD_DIM, HEAD_DIM_P2, ROTARY_DIM,
                ROTARY_INTERLEAVED,
            )
            store_new_rows(
                k_w, v_w, K_CACHE, V_CACHE, page_w, new_slots, ok_w, hk, page_size,
                stride_kp, stride_ks, stride_kh, stride_kd, stride_vp, stride_vs, stride_vh, stride_vd,
                HEAD_DIM, HEAD_DIM_P2,
            )

    q_start = tl.load(CU_SEQLENS_Q + b)
    seqlen_q = tl.load(CU_SEQLENS_Q + b + 1) - q_start
    n_rows = seqlen_q * GROUP
    row0 = m_tile * BLOCK_M
    if row0 >= n_rows:
        return

    end = old_end + new_len  # one past the last valid key slot
    capacity = max_pages * page_size
    kv_lo = tl.maximum(tl.load(CACHE_LEFTPAD + b), 0)
    kv_hi = tl.minimum(end, capacity)
    # Keys the cache tiles read: with APPEND the new ones come in the extra tile instead.
    kv_hi_cache = tl.minimum(kv_hi, old_end) if APPEND else kv_hi
    diag = end - seqlen_q  # query i sees slot t at bottom-right distance i + diag - t

    rows = row0 + tl.arange(0, BLOCK_M)
    pos = rows // GROUP
    head = hk * GROUP + rows % GROUP
    token = q_start + pos
    row_ok = (rows < n_rows) & (token >= 0) & (token < total_q)
    i_min = row0 // GROUP
    i_max = (tl.minimum(row0 + BLOCK_M, n_rows) - 1) // GROUP

    # Keys some row may see, and keys every row sees (those tiles skip the score mask).
    lo_any = kv_lo
    lo_all = kv_lo
    hi_any = kv_hi_cache
    hi_all = kv_hi_cache
    if HAS_WINDOW_LEFT:
        lo_any = tl.maximum(lo_any, i_min + diag - window_left)
        lo_all = tl.maximum(lo_all, i_max + diag - window_left)
    if HAS_WINDOW_RIGHT:
        hi_any = tl.minimum(hi_any, i_max + diag + window_right + 1)
        hi_all = tl.minimum(hi_all, i_min + diag + window_right + 1)
    lo_any = tl.maximum(lo_any, 0)
    hi_any = tl.maximum(hi_any, lo_any)
    lo_all = tl.maximum(lo_all, 0)
    hi_all = tl.maximum(hi_all, 0)

    # This split's share, in whole tiles aligned to absolute slots.
    first = (lo_any // BLOCK_N) * BLOCK_N
    n_tiles = tl.cdiv(hi_any - first, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    s_lo = tl.minimum(first + split * per_split * BLOCK_N, hi_any)
    s_hi = tl.minimum(s_lo + per_split * BLOCK_N, hi_any)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(lo_all, BLOCK_N) * BLOCK_N, s_lo), s_hi)
    full_hi = tl.minimum(tl.maximum((hi_all // BLOCK_N) * BLOCK_N, full_lo), s_hi)

    # Query tile, rotated on load when new keys are rotated.
    offs_d = tl.arange(0, HEAD_DIM_P2)
    q_rows = Q + token.to(tl.int64) * stride_qt + head * stride_qh
    if ROTARY_DIM > 0:
        if ROTARY_PER_POSITION:
            rpos = rbase + pos
        else:
            rpos = rbase + 0 * pos
        q = load_rotated(
            q_rows, row_ok, rpos, COS, SIN, stride_cos, seqlen_ro, stride_qd,
            HEAD_DIM, HEAD_DIM_P2, ROTARY_DIM, ROTARY_INTERLEAVED,
        )
        q = cast_to(q, Q.dtype.element_ty)
    else:
        q = tl.load(
            q_rows[:, None] + offs_d[None, :] * stride_qd,
            mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
            other=0.0,
        )

    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_alibi + head, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
    else:
        slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    rel_row = pos + diag

    K_BASE = K_CACHE + hk * stride_kh
    V_BASE = V_CACHE + hk * stride_vh
    if TMA_KV:
        # The sequence's one page, clamped into the pool as the pointer path clamps it.
        tma_row = tl.minimum(tl.load(BT_ROW).to(tl.uint32), num_pages - 1).to(tl.int32) * page_size
        tma_col = hk * HEAD_DIM
    else:
        tma_row = 0
        tma_col = 0
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)
    if LATE_SUM:
        l_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # Three runs of key tiles: masked [s_lo, full_lo), unmasked [full_lo, full_hi), masked
    # [full_hi, s_hi) (unrolled: MASKED is a compile-time constant in each). The block-table
    # entries of the next tile are read one iteration ahead, so that the K/V loads do not wait on a
    # load of the same iteration and pipeline as deep as num_stages allows.
    # What Triton 3.6 makes of this (sm_90 TTGIR, paged, page 16): the K/V copies run
    # num_stages - 1 tiles ahead, but the table read for a tile lands in the same pipelined
    # iteration as that tile's copies, right before them, so each iteration waits one memory
    # round trip for the table before it can issue its copies. Reading the entries in the
    # iteration that uses them makes Triton pipeline the table as an indirect load (cp.async to
    # shared memory, in a stage of its own); with two more stages to keep the K/V depth it was no
    # faster on an H200 (run 39: paged rows within -1% and +1.8%, 9/3 heads 31.0 -> 30.7 µs, MQA
    # 44.7 -> 45.5) and was removed. Reading them two tiles ahead stops Triton from pipelining
    # the loop at all.
    for phase in tl.static_range(3):
        if phase == 0:
            lo, hi = s_lo, full_lo
        elif phase == 1:
            lo, hi = full_lo, full_hi
        else:
            lo, hi = full_hi, s_hi
        page = page_ids(
            BT_ROW, lo, max_pages, page_size, BLOCK_N, TILE_IN_PAGE, GATHER_PAGE, SINGLE_PAGE, TABLE_ALIGNED, TMA_KV,
        )
        for start in range(lo, hi, BLOCK_N):
            page_next = page_ids(
                BT_ROW, start + BLOCK_N, max_pages, page_size, BLOCK_N, TILE_IN_PAGE, GATHER_PAGE, SINGLE_PAGE,
                TABLE_ALIGNED, TMA_KV,
            )
            acc, l_i, m_i = key_tile(
                acc, l_i, m_i, q, start, page, K_BASE, V_BASE, num_pages, page_size,
                stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd,
                kv_lo, kv_hi_cache, rel_row, slope, qk_scale, softcap_log2, window_left, window_right,
                K_DESC, V_DESC, tma_row, tma_col,
                HEAD_DIM, HEAD_DIM_P2, BLOCK_N, phase != 1, TILE_IN_PAGE, GATHER_PAGE, SINGLE_PAGE, OFFSETS_32,
                HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SOFTCAP, HAS_ALIBI, DOT_FP32, LATE_SUM, TMA_KV,
            )
            page = page_next
    if LATE_SUM:
        l_i = tl.sum(l_i, 1)

    if APPEND:
        if split == num_splits - 1:  # the new keys, as one more (masked) key tile
            j = tl.arange(0, APPEND_ROWS)
            new_rows, new_slots, _, ok_r = locate_new_rows(
                BT_ROW, n0, new_len, old_end, j, total_new, num_pages, max_pages, page_size,
            )
            k_r, v_r = load_new_rows(
                K_NEW, V_NEW, new_rows, ok_r, rbase + j, hk, COS, SIN, stride_cos, seqlen_ro,
                stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd,
                K_CACHE.dtype.element_ty, V_CACHE.dtype.element_ty, HEAD_DIM, HEAD_DIM_P2, ROTARY_DIM,
                ROTARY_INTERLEAVED,
            )
            acc, l_i, m_i = attend(
                acc, l_i, m_i, q, k_r, v_r, new_slots, ok_r & (new_slots >= kv_lo) & (new_slots < kv_hi), rel_row,
                slope, qk_scale, softcap_log2, window_left, window_right,
                True, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SOFTCAP, HAS_ALIBI, DOT_FP32,
            )

    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse2 = m_i + tl.log2(tl.where(has_key, l_i, 1.0))
    o_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_rows = token.to(tl.int64) * stride_ot + head * stride_oh
    l_offs = head * stride_lh + token.to(tl.int64) * stride_lt
    if SPLIT:
        o_base = OUT + split.to(tl.int64) * stride_os
        tl.store(o_base + o_rows[:, None] + offs_d[None, :] * stride_od, out, mask=o_mask)
        tl.store(LSE + split.to(tl.int64) * stride_ls + l_offs, tl.where(has_key, lse2, float("-inf")), mask=row_ok)
    else:
        tl.store(OUT + o_rows[:, None] + offs_d[None, :] * stride_od, cast_to(out, OUT.dtype.element_ty), mask=o_mask)
        tl.store(LSE + l_offs, tl.where(has_key, lse2 * LN2, float("inf")), mask=row_ok)
