"""Decode attention as a Gluon kernel (Hopper): an alternative to `attention_split_kernel` for
the calls `launch.gluon_problem_supported` accepts (one query per sequence, no append, window,
softcap or ALiBi; a 16-bit cache, contiguous or of pages of at least 16 slots), taken where
`launch.gluon_preferred` says (``FLASHDECODE_GLUON``).

Gluon is Triton's lower-level dialect: layouts, shared memory, barriers and warp roles are
written out instead of chosen by the compiler. What differs from `attention_split_kernel`:

* Warp specialisation. A producer warp (`_load_partition`) fills a ring of ``STAGES`` K/V buffers
  by TMA, one box per page of a paged cache (so a 64-key tile of 16-slot pages is four boxes),
  reading the block table itself; the four consumer warps (`_compute_partition`) wait on each
  buffer's "ready" mbarrier and hand it back through its "empty" one. The consumers' key loop
  has no block-table read and two barriers among the consumer warps (one before the hand-back,
  which one thread signals; the Triton kernel's loop has 7 CTA barriers).
* One memory round trip before the first load where the sequence fills its block table (as the
  longest sequence of a batch does when the table is as wide as that sequence needs). Each
  partition reads the lengths itself, so the shared prologue waits on nothing. With them, the
  producer reads the page ids of the tile its split would start at in a full table; a split
  that starts elsewhere reads its own after the lengths. (Dealing the tiles to the splits in
  turn would make every split's first tile known, but made long splits 5-8% slower: H200, runs
  75-77.)
* Every consumer warp computes the whole score tile (up to 16 query rows, one MMA tile, the
  layout repeating it over the warps), so the row max, the probabilities and their conversion
  into the next product's operand never leave a warp; the value product splits the head dim
  over the warps. With 32 query rows (MQA) each warp has 16 of them and the probabilities cross
  warps once per tile. Compiled by Triton 3.6 for sm_90 (`aot_check`, D=128, 64-key tiles): 340
  instructions per key tile (80 tensor-core instructions; the Triton kernel has 217 and 32),
  no spill, consumers at up to 232 registers, two programs per SM (``MAX_REGISTERS``).
* Programmatic dependent launch: it waits for the previous kernel before its first read, and the
  consumer warps let the next kernel launch once their key loop is done.

Tiles that reach outside the sequence's keys (before its left padding, past its end) mask their
scores and zero their values, which they load through registers so that NaN in unused slots
cannot reach the result. Not usable in the Triton interpreter: the CPU tests cover the plan, the
GPU tests compare it with the float64 brute force. Written for Triton 3.6
(``GLUON_TRITON_VERSIONS``): by 3.9 Gluon renamed ``tma.async_copy_global_to_shared`` and
``thread_barrier``, and the launcher keeps other versions on the Triton kernel.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from flashdecode.attention.kernels.constants import LN2

# Registers per thread of the producer warp (its warpgroup's, set by `setmaxnreg`) and the
# kernel's limit: 128 keeps two programs per SM (8 warps x 32 threads x 128 = half the register
# file) and leaves the consumer warpgroup up to 2 x 128 - LOAD_PARTITION_REGS.
LOAD_PARTITION_REGS = 40
MAX_REGISTERS = 128


@gluon.jit
def _attend_tile(q, k_tile, v_tile, acc, l_i, m_i, start, lo, hi, qk_scale,
                 s_layout: gl.constexpr, o_layout: gl.constexpr, kb_layout: gl.constexpr,
                 vb_layout: gl.constexpr, pa_layout: gl.constexpr, v_ld_layout: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, MASKED: gl.constexpr):
    """Online-softmax update with the key tile at slot ``start`` (in shared memory); with
    ``MASKED`` only the slots in ``[lo, hi)`` count."""
    k = k_tile.permute((1, 0)).load(kb_layout)
    s = mma_v2(q, k, gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)) * qk_scale
    if MASKED:
        cols = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(((cols >= lo) & (cols < hi))[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    if MASKED:
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no inf - inf
    else:
        m_use = m_new
    p = gl.exp2(s - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha[:, None] + p  # per key column; summed once after the loop
    if MASKED:
        rows = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, v_ld_layout))
        v = v_tile.load(v_ld_layout)
        v = gl.where(((rows >= lo) & (rows < hi))[:, None], v, gl.zeros_like(v))
        v = gl.convert_layout(v, vb_layout)
    else:
        v = v_tile.load(vb_layout)
    p_a = gl.convert_layout(p.to(v.dtype), pa_layout)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    acc = mma_v2(p_a, v, acc)
    return acc, l_i, m_new


@gluon.jit
def _grid_dependency(INSTRUCTION: gl.constexpr):
    """``griddepcontrol.wait`` (before the first read of what the previous kernel wrote) or
    ``griddepcontrol.launch_dependents`` (let the next kernel launch) of programmatic dependent
    launch, as Triton's ``gdc_wait``/``gdc_launch_dependents`` emit them; no-ops without it."""
    gl.inline_asm_elementwise(INSTRUCTION + "; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _split_tiles(CACHE_SEQLENS, CACHE_LEFTPAD, b, split, num_splits, capacity, BLOCK_N: gl.constexpr):
    """Sequence ``b``'s keys ``[lo, hi)``, and the first slot and the count of this split's run of
    key tiles (aligned to absolute slots, as `attention_split_kernel` deals them)."""
    lo = gl.maximum(gl.load(CACHE_LEFTPAD + b), 0)
    hi = gl.maximum(gl.minimum(gl.load(CACHE_SEQLENS + b), capacity), lo)
    first = (lo // BLOCK_N) * BLOCK_N
    per_split = gl.cdiv(gl.cdiv(hi - first, BLOCK_N), num_splits)
    s_lo = gl.minimum(first + split * per_split * BLOCK_N, hi)
    n_tiles = gl.cdiv(gl.minimum(s_lo + per_split * BLOCK_N, hi) - s_lo, BLOCK_N)
    return lo, hi, s_lo, n_tiles


@gluon.jit
def _load_partition(K_DESC, V_DESC, CACHE_SEQLENS, CACHE_LEFTPAD, table_row, b, split, num_splits, k_smem, v_smem,
                    ready, empty, page_size, table_width, num_pages, col0, STAGES: gl.constexpr,
                    BLOCK_N: gl.constexpr, BOX_N: gl.constexpr, ONE_PAGE: gl.constexpr):
    """The producer warp: fills the ring with the split's key tiles, as soon as the consumers have
    released a buffer. A contiguous cache (``ONE_PAGE``) has slot s in row ``row0 + s``, and a
    tile is ``BLOCK_N // BOX_N`` boxes of consecutive rows. A paged cache's tile is one box per
    page where pages are shorter than a tile (``BOX_N == page_size``: box j is the page in column
    ``start // page_size + j``), else one box inside a page (row ``start % page_size`` of it).
    Where the sequence fills its table, the page ids the first tile needs are read together with
    the lengths, not after them: one memory round trip before the first load instead of two."""
    BOXES: gl.constexpr = BLOCK_N // BOX_N
    tile_bytes: gl.constexpr = 2 * BLOCK_N * K_DESC.block_type.shape[1] * K_DESC.dtype.primitive_bitwidth // 8
    box_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[BOXES], threads_per_warp=[32],
                                                warps_per_cta=[1], order=[0])
    boxes = gl.arange(0, BOXES, layout=box_layout)
    capacity = table_width * page_size
    if ONE_PAGE:
        row0 = gl.minimum(gl.load(table_row).to(gl.uint32), num_pages - 1).to(gl.int32) * page_size
    else:
        # The pages of the tile this split starts at if the sequence fills its table and has no
        # left padding (one split of a sequence that nearly does starts there too). Volatile, so
        # that the compiler cannot sink the load past the lengths' into the loop.
        guess_lo = split * gl.cdiv(gl.cdiv(capacity, BLOCK_N), num_splits) * BLOCK_N
        guess = gl.load(table_row + gl.minimum(guess_lo // page_size + boxes, table_width - 1), volatile=True)
    _, _, s_lo, n_tiles = _split_tiles(CACHE_SEQLENS, CACHE_LEFTPAD, b, split, num_splits, capacity, BLOCK_N)
    if not ONE_PAGE:
        guessed = s_lo == guess_lo
    for i in range(n_tiles):
        slot = i % STAGES
        start = s_lo + i * BLOCK_N
        if not ONE_PAGE:
            # The tile's page ids, read together before the wait for a free buffer. Columns past
            # the table (a capacity that is no multiple of the tile) read its last entry: those
            # slots lie past the keys and the consumers mask them.
            fresh = (i > 0) | (not guessed)
            cols = gl.minimum(start // page_size + boxes, table_width - 1)
            pages = gl.load(table_row + cols, mask=(boxes < BOXES) & fresh, other=0)  # (a mask per box)
            pages = gl.where(fresh, pages, guess)
            pages = gl.minimum(pages.to(gl.uint32), num_pages - 1).to(gl.int32)
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1 at once
        mbarrier.expect(ready.index(slot), tile_bytes)
        for j in gl.static_range(BOXES):
            if ONE_PAGE:
                row = row0 + start + j * BOX_N
            else:
                row = gl.sum(gl.where(boxes == j, pages, 0), axis=0) * page_size + start % page_size
            tma.async_copy_global_to_shared(K_DESC, [row, col0], ready.index(slot),
                                            k_smem.index(slot).slice(j * BOX_N, BOX_N))
            tma.async_copy_global_to_shared(V_DESC, [row, col0], ready.index(slot),
                                            v_smem.index(slot).slice(j * BOX_N, BOX_N))


@gluon.jit
def _consume_tile(i, q, k_smem, v_smem, ready, empty, acc, l_i, m_i, s_lo, lo, hi, qk_scale,
                  s_layout: gl.constexpr, o_layout: gl.constexpr, kb_layout: gl.constexpr,
                  vb_layout: gl.constexpr, pa_layout: gl.constexpr, v_ld_layout: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, MASKED: gl.constexpr):
    """Wait for key tile ``i``, attend to it, then hand its buffer back to the producer (one
    thread arrives, so every warp must be done reading first)."""
    slot = i % STAGES
    mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
    acc, l_i, m_i = _attend_tile(q, k_smem.index(slot), v_smem.index(slot), acc, l_i, m_i, s_lo + i * BLOCK_N,
                                 lo, hi, qk_scale, s_layout, o_layout, kb_layout, vb_layout, pa_layout, v_ld_layout,
                                 BLOCK_M, BLOCK_N, MASKED)
    gl.thread_barrier()
    mbarrier.arrive(empty.index(slot), count=1)
    return acc, l_i, m_i


@gluon.jit
def _compute_partition(q, CACHE_SEQLENS, CACHE_LEFTPAD, k_smem, v_smem, ready, empty, capacity, qk_scale, OUT, LSE,
                       b, hk, split, num_splits,
                       stride_os, stride_ot, stride_oh, stride_od, stride_ls, stride_lh, stride_lt,
                       GROUP: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, SPLIT: gl.constexpr, USE_PDL: gl.constexpr):
    """The consumer warps: online softmax over the split's key tiles, then the (partial) output
    and its LSE."""
    NW: gl.constexpr = gl.num_warps()
    ROW_WARPS: gl.constexpr = BLOCK_M // 16
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[ROW_WARPS, NW // ROW_WARPS],
                                                       instr_shape=[16, 8])
    qa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    kb_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=s_layout, k_width=2)
    pa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    vb_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=o_layout, k_width=2)
    ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                               warps_per_cta=[NW, 1], order=[1, 0])

    q = gl.convert_layout(q, qa_layout)
    lo, hi, s_lo, n_tiles = _split_tiles(CACHE_SEQLENS, CACHE_LEFTPAD, b, split, num_splits, capacity, BLOCK_N)

    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    l_i = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    # Three runs of tiles, each its own loop so that the masked code does not weigh on the
    # registers of the unmasked one: a first tile that starts before the keys, the tiles inside
    # them, a last tile that ends past them.
    n_head = gl.minimum((s_lo < lo).to(gl.int32), n_tiles)
    n_tail = gl.minimum((s_lo + n_tiles * BLOCK_N > hi).to(gl.int32), n_tiles - n_head)
    for i in range(0, n_head):
        acc, l_i, m_i = _consume_tile(i, q, k_smem, v_smem, ready, empty, acc, l_i, m_i, s_lo, lo, hi, qk_scale,
                                      s_layout, o_layout, kb_layout, vb_layout, pa_layout, ld_layout,
                                      BLOCK_M, BLOCK_N, STAGES, True)
    for i in range(n_head, n_tiles - n_tail):
        acc, l_i, m_i = _consume_tile(i, q, k_smem, v_smem, ready, empty, acc, l_i, m_i, s_lo, lo, hi, qk_scale,
                                      s_layout, o_layout, kb_layout, vb_layout, pa_layout, ld_layout,
                                      BLOCK_M, BLOCK_N, STAGES, False)
    for i in range(n_tiles - n_tail, n_tiles):
        acc, l_i, m_i = _consume_tile(i, q, k_smem, v_smem, ready, empty, acc, l_i, m_i, s_lo, lo, hi, qk_scale,
                                      s_layout, o_layout, kb_layout, vb_layout, pa_layout, ld_layout,
                                      BLOCK_M, BLOCK_N, STAGES, True)
    if USE_PDL:
        # The consumers' key loop is done: the next kernel may launch. Not the producer warp, which
        # finishes its loop a few tiles earlier: its trigger launched the combine kernel too soon
        # (H200, run 73, µs: B=1 L=4096 11.7 with it, 9.4 without; MQA 43.4 against 41.1).
        _grid_dependency("griddepcontrol.launch_dependents")

    l_sum = gl.convert_layout(gl.sum(l_i, 1), gl.SliceLayout(1, o_layout))
    m_o = gl.convert_layout(m_i, gl.SliceLayout(1, o_layout))
    has_key = l_sum > 0.0
    l_safe = gl.where(has_key, l_sum, 1.0)
    out = acc / l_safe[:, None]
    lse2 = m_o + gl.log2(l_safe)
    o_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    o_dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    o_ok = o_rows < GROUP
    o_head = hk * GROUP + gl.where(o_ok, o_rows, 0)
    o_ptr = OUT + split.to(gl.int64) * stride_os + b.to(gl.int64) * stride_ot + o_head[:, None] * stride_oh \
        + o_dims[None, :] * stride_od
    l_ptr = LSE + split.to(gl.int64) * stride_ls + o_head * stride_lh + b.to(gl.int64) * stride_lt
    if SPLIT:
        gl.store(o_ptr, out, mask=o_ok[:, None])
        gl.store(l_ptr, gl.where(has_key, lse2, float("-inf")), mask=o_ok)
    else:
        gl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=o_ok[:, None])
        gl.store(l_ptr, gl.where(has_key, lse2 * LN2, float("inf")), mask=o_ok)


@gluon.jit
def gluon_decode_kernel(
    Q, K_DESC, V_DESC, CACHE_SEQLENS, CACHE_LEFTPAD, BLOCK_TABLE, OUT, LSE,
    num_pages, page_size, table_width, qk_scale,
    stride_qt, stride_qh, stride_bt,
    stride_os, stride_ot, stride_oh, stride_od,
    stride_ls, stride_lh, stride_lt,
    GROUP: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
    BOX_N: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr, ONE_PAGE: gl.constexpr,
    USE_PDL: gl.constexpr, LOAD_REGS: gl.constexpr,
):
    """Grid (KV heads, batch, splits). Sequence b's one query is token b; its keys are slots
    ``[max(leftpad, 0), min(cache_seqlens, table_width * page_size))``, slot s in row
    ``s % page_size`` of page ``block_table[b, s // page_size]`` (clamped into the pool). A
    contiguous cache is one page per sequence. Writes what `attention_split_kernel` writes: with
    ``SPLIT`` the normalised partial output and its log2 LSE (-inf: no key), else the output and
    its natural-log LSE (+inf and zeros: no key)."""
    hk = gl.program_id(0)
    b = gl.program_id(1)
    split = gl.program_id(2)
    num_splits = gl.num_programs(2)
    if USE_PDL:
        _grid_dependency("griddepcontrol.wait")
    table_row = BLOCK_TABLE + b.to(gl.int64) * stride_bt
    capacity = table_width * page_size
    # The query, in flight while the warps part (its layout changes in the consumer partition).
    NW: gl.constexpr = gl.num_warps()
    ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                               warps_per_cta=[NW, 1], order=[1, 0])
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
    q_ok = rows < GROUP
    q_head = hk * GROUP + gl.where(q_ok, rows, 0)
    q = gl.load(Q + b.to(gl.int64) * stride_qt + q_head[:, None] * stride_qh + dims[None, :], mask=q_ok[:, None],
                other=0.0)

    k_smem = gl.allocate_shared_memory(K_DESC.dtype, [STAGES, BLOCK_N, HEAD_DIM], K_DESC.layout)
    v_smem = gl.allocate_shared_memory(V_DESC.dtype, [STAGES, BLOCK_N, HEAD_DIM], V_DESC.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()

    gl.warp_specialize([
        (_compute_partition, (q, CACHE_SEQLENS, CACHE_LEFTPAD, k_smem, v_smem, ready, empty, capacity, qk_scale, OUT,
                              LSE, b, hk, split, num_splits, stride_os, stride_ot, stride_oh,
                              stride_od, stride_ls, stride_lh, stride_lt, GROUP, BLOCK_M, HEAD_DIM, BLOCK_N, STAGES,
                              SPLIT, USE_PDL)),
        (_load_partition, (K_DESC, V_DESC, CACHE_SEQLENS, CACHE_LEFTPAD, table_row, b, split, num_splits, k_smem,
                           v_smem, ready, empty, page_size, table_width, num_pages, hk * HEAD_DIM, STAGES, BLOCK_N,
                           BOX_N, ONE_PAGE)),
    ], [1], [LOAD_REGS])


def launch(p, o_dst, l_dst, o_strides: tuple[int, ...], l_strides: tuple[int, int, int], block_n: int,
           num_stages: int, splits: int, qk_scale: float, pdl: bool) -> None:
    """Run `gluon_decode_kernel` on ``p`` (a `PackedProblem` that `launch.gluon_plan` accepted).

    ``o_dst``/``l_dst`` and their strides are those of `launch.attention`: (split, token, head,
    dim) and (split, head, token), the split stride 0 without a split. ``pdl``: launch with
    programmatic dependent launch (`launch.attention_pdl`)."""
    # Imported here, so that the kernel module loads without torch (offline compile checks).
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    q, kc, vc = p.q, p.k_pages, p.v_pages
    num_pages, page_size, num_kv_heads, head_dim = kc.shape
    rows, cols = num_pages * page_size, num_kv_heads * head_dim
    element = gl.bfloat16 if kc.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block_n, head_dim], element)
    # One box per tile, or one per page where pages are shorter than a tile.
    box_n = block_n if p.block_table.shape[1] == 1 else min(block_n, page_size)
    group = q.shape[1] // num_kv_heads
    k_desc = TensorDescriptor(kc.view(rows, cols), [rows, cols], [cols, 1], [box_n, head_dim], layout)
    v_desc = TensorDescriptor(vc.view(rows, cols), [rows, cols], [cols, 1], [box_n, head_dim], layout)
    gluon_decode_kernel[(num_kv_heads, p.batch, splits)](
        q, k_desc, v_desc, p.cache_seqlens, p.cache_leftpad, p.block_table, o_dst, l_dst,
        num_pages, page_size, p.block_table.shape[1], qk_scale,
        q.stride(0), q.stride(1), p.block_table.stride(0),
        o_strides[0], o_strides[1], o_strides[2], o_strides[3],
        l_strides[0], l_strides[1], l_strides[2],
        GROUP=group, BLOCK_M=16 if group <= 16 else 32, HEAD_DIM=head_dim, BLOCK_N=block_n, BOX_N=box_n,
        STAGES=num_stages, SPLIT=splits > 1, ONE_PAGE=p.block_table.shape[1] == 1, USE_PDL=pdl,
        LOAD_REGS=LOAD_PARTITION_REGS, num_warps=4, maxnreg=MAX_REGISTERS,
        **({"launch_pdl": True} if pdl else {}),
    )
