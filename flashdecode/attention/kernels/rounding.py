"""Casting helper that keeps the Triton interpreter's rounding faithful to the GPU's."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Kernels are decorated in interpreter mode when TRITON_INTERPRET is set at import (Triton reads
# it then too). The interpreter's float32 -> bfloat16 cast truncates, where the GPU rounds to
# nearest even; `cast_to` emulates the GPU there so CPU tests check the real numerics.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"))


@triton.jit
def cast_to(x, DTYPE: tl.constexpr):
    """``x.to(DTYPE)`` with round-to-nearest-even for float32 -> bfloat16 also in the interpreter."""
    if INTERPRETED:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + (0x7FFF + ((bits >> 16) & 1))
            x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(DTYPE)
