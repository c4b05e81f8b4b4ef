"""One-row projection ``y = W @ f(x) (+ b)`` with the step before it fused in: batch-1 decode.

At batch 1 a small model's step is a chain of ~10 short kernels per layer, each mostly launch and
memory latency. This kernel folds the elementwise step that precedes each projection into the
projection itself, so a decoder layer runs 6 kernels instead of 9:

* ``PROLOGUE_NONE``: ``f(x) = x`` (the output projection);
* ``PROLOGUE_NORM``: ``f(x) = g * rmsnorm(x)`` (qkv and gate/up after their norm);
* ``PROLOGUE_ADD_NORM``: ``s = x + residual``, ``f = g * rmsnorm(s)``; program 0 also writes ``s``
  (the residual stream) so the model carries it on;
* ``PROLOGUE_SILU_MUL``: ``x = [gate | up]``, ``f = silu(gate) * up`` (the down projection).

The prologues round with the helpers of `rms_norm_kernel` and `silu_and_mul_kernel` (Hugging
Face's order), so the fused layer reads the vector the unfused layers would have produced.

Layout: each program owns ``BLOCK_N`` output features and walks the reduction in ``K_TILES``
statically unrolled tiles of ``BLOCK_K``: the weight loads of all tiles are independent of each
other and of the prologue, so they can all be in flight at once (a loop would wait for each).
Every program needs the whole input vector; it is small and read from L2.

With ``USE_PDL`` (launched with programmatic dependent launch, Hopper and later) a program loads
its first weight tile before waiting for the previous kernel (``gdc_wait``): weights are never
written by the step, so reading them early is safe, and it overlaps this kernel's start with the
previous kernel's tail. Everything else (input, residual, every store) comes after the wait.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flashdecode.attention.kernels.rounding import cast_to
from flashdecode.models.kernels.activation import silu_mul_rounded
from flashdecode.models.kernels.norm import scale_rounded

PROLOGUE_NONE = 0
PROLOGUE_NORM = 1
PROLOGUE_ADD_NORM = 2
PROLOGUE_SILU_MUL = 3


@triton.jit
def _input_tile(X, RESIDUAL, NORM_W, k, k_mask, K, rstd, PROLOGUE: tl.constexpr):
    """``f(x)`` on columns ``k``, in float32 holding values of X's dtype."""
    dtype = X.dtype.element_ty
    if PROLOGUE == 3:
        gate = tl.load(X + k, mask=k_mask, other=0.0).to(tl.float32)
        up = tl.load(X + K + k, mask=k_mask, other=0.0).to(tl.float32)
        return silu_mul_rounded(gate, up, dtype)
    x = tl.load(X + k, mask=k_mask, other=0.0).to(tl.float32)
    if PROLOGUE == 2:
        r = tl.load(RESIDUAL + k, mask=k_mask, other=0.0).to(tl.float32)
        x = cast_to(x + r, dtype).to(tl.float32)
    if PROLOGUE == 1 or PROLOGUE == 2:
        g = tl.load(NORM_W + k, mask=k_mask, other=0.0).to(tl.float32)
        x = scale_rounded(x, rstd, g, dtype)
    return x


@triton.jit
def gemv_kernel(
    X,
    RESIDUAL,
    NORM_W,
    W,
    BIAS,
    Y,
    RESIDUAL_OUT,
    N,
    K,
    eps,
    stride_wn,
    PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_TILES: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N),)``. ``X``, ``RESIDUAL``, ``NORM_W``, ``Y``, ``RESIDUAL_OUT``
    contiguous vectors (``X`` holds ``2K`` values for the SiLU prologue); ``W`` ``(N, K)`` with
    unit stride along K; ``K_TILES * BLOCK_K >= K``."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    rows = W + n.to(tl.int64)[:, None] * stride_wn
    dtype = X.dtype.element_ty
    k0 = tl.arange(0, BLOCK_K)
    w_first = tl.load(rows + k0[None, :], mask=n_mask[:, None] & (k0 < K)[None, :], other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    rstd = 0.0
    if PROLOGUE == 1 or PROLOGUE == 2:
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for t in tl.static_range(K_TILES):
            k = t * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = k < K
            x = tl.load(X + k, mask=k_mask, other=0.0).to(tl.float32)
            if PROLOGUE == 2:
                r = tl.load(RESIDUAL + k, mask=k_mask, other=0.0).to(tl.float32)
                s = cast_to(x + r, dtype)
                if pid == 0:
                    tl.store(RESIDUAL_OUT + k, s, mask=k_mask)
                x = s.to(tl.float32)
            sq += x * x
        rstd = tl.math.rsqrt(tl.sum(sq, axis=0) / K + eps)

    y = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in tl.static_range(K_TILES):
        k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = k < K
        if t == 0:
            w = w_first
        else:
            w = tl.load(rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = _input_tile(X, RESIDUAL, NORM_W, k, k_mask, K, rstd, PROLOGUE)
        # Reduced per tile: a (BLOCK_N, BLOCK_K) float32 accumulator spilled at 8B tiles (sm_90:
        # 3120 bytes of stack for 8 x 2048 x 7 tiles, none this way; see aot_check).
        y += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(Y + n, cast_to(y, Y.dtype.element_ty), mask=n_mask)
