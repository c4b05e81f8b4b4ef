"""SiLU(gate) * up over the fused gate/up projection's output, in one pass."""

from __future__ import annotations

import triton
import triton.language as tl

from flashdecode.attention.kernels.rounding import cast_to


@triton.jit
def silu_mul_rounded(gate, up, dtype: tl.constexpr):
    """``silu(gate) * up``, ``silu`` rounded to ``dtype`` first as PyTorch does in low precision,
    then the product; float32 in and out (the values are ``dtype``'s)."""
    act = cast_to(gate * tl.sigmoid(gate), dtype).to(tl.float32)
    return cast_to(act * up, dtype).to(tl.float32)


@triton.jit
def silu_and_mul_kernel(
    GATE_UP,
    OUT,
    intermediate,
    stride_in,
    stride_out,
    BLOCK: tl.constexpr,
):
    """Grid ``(rows, cdiv(intermediate, BLOCK))``. ``GATE_UP`` row = ``[gate | up]``; like
    PyTorch in low precision, ``silu(gate)`` is rounded to the input dtype before the product."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    dtype = GATE_UP.dtype.element_ty
    gate = tl.load(GATE_UP + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GATE_UP + row * stride_in + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    out = silu_mul_rounded(gate, up, dtype)
    tl.store(OUT + row * stride_out + cols, cast_to(out, OUT.dtype.element_ty), mask=mask)
