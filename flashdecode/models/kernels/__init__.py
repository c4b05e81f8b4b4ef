"""Triton kernels of the model's non-attention layers (RMSNorm with residual add, SiLU-and-mul)."""
