"""RMSNorm, optionally fused with the residual add that precedes it, one program per row.

A decoder layer ends each block with ``residual = residual + x`` and then normalises the sum.
Done by PyTorch that is about eight small kernels per norm; here it is one. The rounding follows
Hugging Face's ``LlamaRMSNorm`` step by step (sum rounded to the input dtype, statistics in
float32, normalised value rounded before the weight multiplies it) so that greedy tokens match.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flashdecode.attention.kernels.rounding import cast_to


@triton.jit
def scale_rounded(x, rstd, weight, dtype: tl.constexpr):
    """``weight * (x * rstd)`` with both products rounded to ``dtype`` as Hugging Face rounds
    them; float32 in and out (the values are ``dtype``'s)."""
    normed = cast_to(x * rstd, dtype).to(tl.float32)
    return cast_to(normed * weight, dtype).to(tl.float32)


@triton.jit
def rms_norm_kernel(
    X,
    RESIDUAL,
    WEIGHT,
    OUT,
    RESIDUAL_OUT,
    hidden,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid ``(rows,)``. ``OUT = WEIGHT * norm(s)`` with ``s = X + RESIDUAL`` (or ``X``); with a
    residual, ``s`` (rounded to X's dtype) is also written to ``RESIDUAL_OUT``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = X.dtype.element_ty
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RESIDUAL + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = cast_to(x + r, dtype)
        tl.store(RESIDUAL_OUT + row * stride_ro + cols, s, mask=mask)
        x = s.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / hidden
    w = tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
    out = scale_rounded(x, tl.math.rsqrt(mean_sq + eps), w, dtype)
    tl.store(OUT + row * stride_o + cols, cast_to(out, OUT.dtype.element_ty), mask=mask)
