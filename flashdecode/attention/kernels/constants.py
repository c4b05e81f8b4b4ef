"""Constants of the kernels' log2-domain softmax: scores carry log2(e), LSEs convert back with ln 2."""

from __future__ import annotations

import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Gluon's API changes between Triton releases; `gluon_decode.py` is written and tested for these.
GLUON_TRITON_VERSIONS = ("3.6.",)
