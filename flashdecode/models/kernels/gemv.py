"""Matrix-vector product ``y = W @ x (+ b)`` for one input row: the batch-1 decode projections.

At batch 1 every projection of a decoder reads its whole weight matrix to produce one row, so the
step is bound by memory (large models) or by kernel latency (small ones). This kernel gives each
program ``BLOCK_N`` output features and walks the whole reduction with wide, contiguous loads of
their weight rows, accumulating in float32 and reducing once at the end.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flashdecode.attention.kernels.rounding import cast_to


@triton.jit
def gemv_kernel(
    X,
    W,
    BIAS,
    Y,
    N,
    K,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N),)``. ``X`` ``(K,)`` and ``Y`` ``(N,)`` contiguous; ``W`` ``(N, K)``
    with unit stride along K."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    rows = W + n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(X + k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(Y + n, cast_to(y, Y.dtype.element_ty), mask=n_mask)
