"""Prototype (experiment, not the product): decode attention with keys split across warps."""
import triton
import triton.language as tl


@triton.jit
def ws_kernel(Q, K, V, O, LSE, keys_per_split, qk_scale,
              stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
              stride_os, stride_ob, stride_oh, stride_ls, stride_lb, stride_lh,
              GROUP: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BN_W: tl.constexpr,
              SPLIT: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    hk = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP
    head = hk * GROUP + tl.where(row_ok, rows, 0)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q3 = tl.broadcast_to(q[None, :, :], (W, BLOCK_M, D))
    acc = tl.zeros([W, BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([W, BLOCK_M, BN_W], dtype=tl.float32)
    m_i = tl.full([W, BLOCK_M], float("-inf"), dtype=tl.float32)
    kw = tl.arange(0, W)[:, None] * BN_W + tl.arange(0, BN_W)[None, :]  # [W, BN_W]
    K_BASE = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    V_BASE = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    lo = split * keys_per_split
    for start in range(lo, lo + keys_per_split, W * BN_W):
        slot = start + kw
        k = tl.load(K_BASE + slot[:, :, None] * stride_ks + offs_d[None, None, :])
        v = tl.load(V_BASE + slot[:, :, None] * stride_vs + offs_d[None, None, :])
        s = tl.dot(q3, tl.trans(k, (0, 2, 1))) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 2))
        p = tl.exp2(s - m_new[:, :, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha[:, :, None] + p
        acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    m_all = tl.max(m_i, 0)
    w_scale = tl.exp2(m_i - m_all[None, :])
    l_tot = tl.sum(tl.sum(l_i, 2) * w_scale, 0)
    o = tl.sum(acc * w_scale[:, :, None], 0) / l_tot[:, None]
    o_ptr = O + split.to(tl.int64) * stride_os + b * stride_ob + head[:, None] * stride_oh + offs_d[None, :]
    if SPLIT:
        tl.store(o_ptr, o, mask=row_ok[:, None])
        tl.store(LSE + split * stride_ls + b * stride_lb + head * stride_lh, m_all + tl.log2(l_tot), mask=row_ok)
    else:
        tl.store(o_ptr, o.to(O.dtype.element_ty), mask=row_ok[:, None])
