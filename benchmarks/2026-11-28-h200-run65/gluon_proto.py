"""Experiment: a Gluon decode kernel for Hopper. Contiguous cache viewed as (B * L, Hkv * D), full key
tiles only. Every warp computes the whole score tile (warps replicated over the query rows), so the
row max and the probabilities never cross warps; the value product splits the head dim over the
warps. K/V tiles arrive by TMA into a ring of STAGES buffers; one CTA barrier per tile guards the
reuse of a buffer."""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma, mbarrier, fence_async_shared
from triton.experimental.gluon.language.nvidia.ampere import mma_v2


@gluon.jit
def gl_decode_kernel(Q, K_DESC, V_DESC, O, LSE, seqlen, keys_per_split, qk_scale,
                     stride_qb, stride_qh, stride_os, stride_ob, stride_oh, stride_ls, stride_lb, stride_lh,
                     GROUP: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr,
                     STAGES: gl.constexpr, SPLIT: gl.constexpr):
    NW: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
    qa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    kb_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=s_layout, k_width=2)
    pa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    vb_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=o_layout, k_width=2)
    ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                               warps_per_cta=[NW, 1], order=[1, 0])

    hk = gl.program_id(0)
    b = gl.program_id(1)
    split = gl.program_id(2)

    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, ld_layout))
    row_ok = rows < GROUP
    head = hk * GROUP + gl.where(row_ok, rows, 0)
    q = gl.load(Q + b * stride_qb + head[:, None] * stride_qh + cols[None, :], mask=row_ok[:, None], other=0.0)
    q = gl.convert_layout(q, qa_layout)

    k_smem = gl.allocate_shared_memory(K_DESC.dtype, [STAGES, BLOCK_N, D], K_DESC.layout)
    v_smem = gl.allocate_shared_memory(V_DESC.dtype, [STAGES, BLOCK_N, D], V_DESC.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    fence_async_shared()

    row0 = b * seqlen + split * keys_per_split
    col0 = hk * D
    n_tiles = keys_per_split // BLOCK_N
    nbytes: gl.constexpr = 2 * BLOCK_N * D * 2
    for s in gl.static_range(STAGES - 1):
        mbarrier.expect(bars.index(s), nbytes, pred=s < n_tiles)
        tma.async_copy_global_to_shared(K_DESC, [row0 + s * BLOCK_N, col0], bars.index(s), k_smem.index(s),
                                        pred=s < n_tiles)
        tma.async_copy_global_to_shared(V_DESC, [row0 + s * BLOCK_N, col0], bars.index(s), v_smem.index(s),
                                        pred=s < n_tiles)

    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    l_i = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    for i in range(n_tiles):
        # Every warp is done with tile i - 1: its buffer takes tile i + STAGES - 1.
        gl.thread_barrier()
        nxt = i + STAGES - 1
        slot_n = nxt % STAGES
        mbarrier.expect(bars.index(slot_n), nbytes, pred=nxt < n_tiles)
        tma.async_copy_global_to_shared(K_DESC, [row0 + nxt * BLOCK_N, col0], bars.index(slot_n),
                                        k_smem.index(slot_n), pred=nxt < n_tiles)
        tma.async_copy_global_to_shared(V_DESC, [row0 + nxt * BLOCK_N, col0], bars.index(slot_n),
                                        v_smem.index(slot_n), pred=nxt < n_tiles)
        slot = i % STAGES
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        k = k_smem.index(slot).permute((1, 0)).load(kb_layout)
        s_ij = mma_v2(q, k, gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)) * qk_scale
        m_new = gl.maximum(m_i, gl.max(s_ij, 1))
        p = gl.exp2(s_ij - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha[:, None] + p
        v = v_smem.index(slot).load(vb_layout)
        p_a = gl.convert_layout(p.to(gl.bfloat16), pa_layout)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = mma_v2(p_a, v, acc)
        m_i = m_new
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))

    l_sum = gl.convert_layout(gl.sum(l_i, 1), gl.SliceLayout(1, o_layout))
    o = acc / l_sum[:, None]
    o_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    o_cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    o_ok = o_rows < GROUP
    o_head = hk * GROUP + gl.where(o_ok, o_rows, 0)
    o_ptr = O + split * stride_os + b * stride_ob + o_head[:, None] * stride_oh + o_cols[None, :]
    if SPLIT:
        gl.store(o_ptr, o, mask=o_ok[:, None])
        m_o = gl.convert_layout(m_i, gl.SliceLayout(1, o_layout))
        gl.store(LSE + split * stride_ls + b * stride_lb + o_head * stride_lh, m_o + gl.log2(l_sum), mask=o_ok)
    else:
        gl.store(o_ptr, o.to(O.dtype.element_ty), mask=o_ok[:, None])
