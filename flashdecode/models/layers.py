"""The model's non-attention building blocks: RMSNorm (with fused residual add) and SiLU-and-mul.

CUDA tensors (and CPU tensors under ``FLASHDECODE_BACKEND=triton`` with the Triton interpreter)
take the Triton kernels in `kernels/`; other CPU tensors take the PyTorch code below. Both round
like Hugging Face's Llama layers; tests check both against a float64 oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from flashdecode.attention.interface import selected_backend
from flashdecode.models.kernels.activation import silu_and_mul_kernel
from flashdecode.models.kernels.norm import rms_norm_kernel

ACTIVATION_BLOCK = 1024


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D tensor whose last dimension is contiguous."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if residual is not None:
        x = x + residual
        residual = x
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight * rmsnorm(x + residual), x + residual)``; without ``residual``, ``(weight * rmsnorm(x), None)``.

    ``x`` and ``residual`` are ``(..., hidden)`` of one dtype; ``weight`` is ``(hidden,)``.
    """
    if selected_backend(x.device) != "triton":
        return rms_norm_torch(x, weight, eps, residual)
    shape = x.shape
    hidden = shape[-1]
    x2 = _rows(x)
    out = torch.empty_like(x2)
    if residual is not None:
        r2 = _rows(residual)
        r_out = torch.empty_like(x2)
    else:
        r2 = r_out = x2
    if x2.shape[0]:
        rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, r_out, hidden, float(eps),
            x2.stride(0), r2.stride(0), out.stride(0), r_out.stride(0),
            HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(hidden),
            num_warps=4 if hidden <= 2048 else 8,
        )
    return out.view(shape), (r_out.view(shape) if residual is not None else None)


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dimension (even size)."""
    if selected_backend(gate_up.device) != "triton":
        return silu_and_mul_torch(gate_up)
    *lead, width = gate_up.shape
    intermediate = width // 2
    g2 = _rows(gate_up)
    out = torch.empty((g2.shape[0], intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if g2.shape[0]:
        block = min(ACTIVATION_BLOCK, triton.next_power_of_2(intermediate))
        silu_and_mul_kernel[(g2.shape[0], triton.cdiv(intermediate, block))](
            g2, out, intermediate, g2.stride(0), out.stride(0), BLOCK=block, num_warps=4,
        )
    return out.view(*lead, intermediate)
