"""Merge two partial attention results over disjoint key sets (public `merge_attention_states`)."""

from __future__ import annotations

import triton
import triton.language as tl

from flashdecode.attention.kernels.constants import LN2, LOG2E
from flashdecode.attention.kernels.rounding import cast_to


@triton.jit
def merge_states_kernel(
    OUT_A,
    LSE_A,
    OUT_B,
    LSE_B,
    OUT,
    LSE,
    seqlen,
    num_heads,
    stride_oab,
    stride_oas,
    stride_oah,
    stride_oad,
    stride_obb,
    stride_obs,
    stride_obh,
    stride_obd,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    stride_lab,
    stride_lah,
    stride_las,
    stride_lbb,
    stride_lbh,
    stride_lbs,
    stride_lb,
    stride_lh,
    stride_ls,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid ``(batch * seqlen, cdiv(H, BLOCK_H))``; outputs ``(b, s, h, d)``, LSEs ``(b, h, s)``.

    An LSE of +inf (FlashAttention's "no visible key") or -inf marks an empty side.
    """
    pid = tl.program_id(0)
    bi = (pid // seqlen).to(tl.int64)
    si = (pid % seqlen).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < num_heads
    offs_d = tl.arange(0, HEAD_DIM_P2)
    mask = h_ok[:, None] & (offs_d < HEAD_DIM)[None, :]

    la = tl.load(LSE_A + bi * stride_lab + offs_h * stride_lah + si * stride_las, mask=h_ok, other=float("inf"))
    lb = tl.load(LSE_B + bi * stride_lbb + offs_h * stride_lbh + si * stride_lbs, mask=h_ok, other=float("inf"))
    la = tl.where(la == float("inf"), float("-inf"), la) * LOG2E
    lb = tl.where(lb == float("inf"), float("-inf"), lb) * LOG2E
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp2(la - m)
    wb = tl.exp2(lb - m)
    denom = wa + wb
    oa = tl.load(OUT_A + bi * stride_oab + si * stride_oas + offs_h[:, None] * stride_oah + offs_d[None, :] * stride_oad,
                 mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(OUT_B + bi * stride_obb + si * stride_obs + offs_h[:, None] * stride_obh + offs_d[None, :] * stride_obd,
                 mask=mask, other=0.0).to(tl.float32)
    acc = tl.where((wa > 0.0)[:, None], wa[:, None] * oa, 0.0) + tl.where((wb > 0.0)[:, None], wb[:, None] * ob, 0.0)
    has_key = denom > 0.0
    out = acc / tl.where(has_key, denom, 1.0)[:, None]
    lse = tl.where(has_key, (m + tl.log2(tl.where(has_key, denom, 1.0))) * LN2, float("inf"))
    tl.store(OUT + bi * stride_ob + si * stride_os + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od,
             cast_to(out, OUT.dtype.element_ty), mask=mask)
    tl.store(LSE + bi * stride_lb + offs_h * stride_lh + si * stride_ls, lse, mask=h_ok)
