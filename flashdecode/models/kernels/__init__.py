"""Triton kernels of the model's non-attention layers: RMSNorm with the residual add, SiLU-and-mul,
and the single-row projection (GEMV) with either of them fused in."""
