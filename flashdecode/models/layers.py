"""The model's non-attention building blocks: RMSNorm (with fused residual add), SiLU-and-mul,
and the projections that follow them.

CUDA tensors (and CPU tensors under ``FLASHDECODE_BACKEND=triton`` with the Triton interpreter)
take the Triton kernels in `kernels/`; other CPU tensors take the PyTorch code below. Both round
like Hugging Face's Llama layers; tests check both against a float64 oracle.

A single row (batch-1 decode) goes through `gemv_kernel`, which runs the norm or the activation
before a projection inside the projection (``norm_linear``, ``silu_mul_linear``); more rows take
the norm/activation kernel and then cuBLAS. ``FLASHDECODE_GEMV=0`` sends single rows the second
way too (an A/B knob, read at every call), and ``FLASHDECODE_PDL=0`` launches the GEMV without
programmatic dependent launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from flashdecode.attention.interface import selected_backend
from flashdecode.attention.kernels.launch import env_flag, pdl_supported
from flashdecode.models.kernels.activation import silu_and_mul_kernel
from flashdecode.models.kernels.gemv import (
    PROLOGUE_ADD_NORM,
    PROLOGUE_NONE,
    PROLOGUE_NORM,
    PROLOGUE_SILU_MUL,
    gemv_kernel,
)
from flashdecode.models.kernels.norm import rms_norm_kernel

ACTIVATION_BLOCK = 1024
GEMV_ENV = "FLASHDECODE_GEMV"
PDL_ENV = "FLASHDECODE_PDL"
GEMV_MAX_BLOCK_K = 4096
GEMV_MAX_BLOCK_N = 16


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


# ---- projections -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int


def gemv_config(n: int, k: int) -> GemvConfig:
    """Tile of `gemv_kernel` for an ``(n, k)`` weight.

    From sweeps on an H200 (2026-11-28, bf16, weights cold in L2; scripts/bench_gemv.py):
    rows of up to 4096 weights are one tile of 4 rows (4 warps), except that large vocabularies
    over short rows (the SmolLM2-135M head) take 16 rows; longer rows (the Llama-3-8B down
    projection, K = 14336) take 16 rows x 1024 columns with 16 warps. On the Llama-3-8B shape
    (run 14, every projection of a layer plus the head) this took 14.4 / 9.9 / 54.4 / 30.9 us
    (qkv / o / gate_up / down) and 231.7 us (head), against 15.6 / 10.8 / 57.6 / 32.0 / 242.8 at
    the earlier tiles and 17.8 / 13.3 / 58.7 / 33.5 / 250.1 for the unfused layers + cuBLAS. On
    the SmolLM2-135M shape (run 10) the four projections took 11.7 us per layer against 21.9 us.
    """
    if k > GEMV_MAX_BLOCK_K:
        return GemvConfig(block_n=16, block_k=1024, num_warps=16)
    block_k = triton.next_power_of_2(max(1, k))
    block_n = 16 if n >= 16384 and k < 2048 else 4
    num_warps = 8 if block_n * block_k >= 32768 else 4
    return GemvConfig(block_n=block_n, block_k=block_k, num_warps=num_warps)


def gemv_enabled() -> bool:
    """``FLASHDECODE_GEMV`` (read on every call): ``1`` (default) sends every single-row projection to
    the GEMV, ``0`` none (cuBLAS). On an H200 (2026-11-28, batch-1 decode, same run) the GEMV for
    every projection took the Llama-3-8B shape from 209.0 to 219.5 tok/s and SmolLM2-135M from
    1428 to 1591 tok/s (there it had already taken every projection but the head)."""
    return env_flag(GEMV_ENV, "1")


def pdl_enabled(device: torch.device) -> bool:
    """Programmatic dependent launch of the GEMV: CUDA devices of compute capability 9.0 and up,
    unless ``FLASHDECODE_PDL=0`` (read on every call). On an H200 (2026-11-28) it took the
    SmolLM2-135M shape's batch-1 decode from 1308 to 1465 tokens/s."""
    return env_flag(PDL_ENV, "1") and pdl_supported(device)


def _takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.shape[0] != 1 or x.dtype != weight.dtype or weight.stride(-1) != 1 or selected_backend(x.device) != "triton":
        return False
    return gemv_enabled()


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prologue: int,
          residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
          residual_out: torch.Tensor | None = None) -> torch.Tensor:
    n, k = weight.shape
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    cfg = gemv_config(n, k)
    pdl = pdl_enabled(x.device)
    launch = {"launch_pdl": True} if pdl else {}
    gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else x,
        weight, bias if bias is not None else weight, y, residual_out if residual_out is not None else y,
        n, k, float(eps), weight.stride(0),
        PROLOGUE=prologue, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        K_TILES=triton.cdiv(k, cfg.block_k), USE_PDL=pdl, num_warps=cfg.num_warps, **launch,
    )
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for ``x`` ``(T, K)``."""
    if not _takes_gemv(x, weight):
        return F.linear(x, weight, bias)
    return _gemv(_rows(x), weight, bias, PROLOGUE_NONE)


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(linear(rms_norm(x + residual)), x + residual)``; without ``residual``,
    ``(linear(rms_norm(x)), None)``. ``x`` is ``(T, hidden)``."""
    if not _takes_gemv(x, weight):
        h, residual = rms_norm(x, norm_weight, eps, residual)
        return F.linear(h, weight, bias), residual
    x = _rows(x)
    if residual is None:
        return _gemv(x, weight, bias, PROLOGUE_NORM, norm_weight=norm_weight, eps=eps), None
    r = _rows(residual)
    r_out = torch.empty_like(x)
    y = _gemv(x, weight, bias, PROLOGUE_ADD_NORM, residual=r, norm_weight=norm_weight, eps=eps, residual_out=r_out)
    return y, r_out


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(silu(gate) * up)`` for ``gate_up = [gate | up]`` ``(T, 2 * intermediate)``."""
    if gate_up.shape[-1] != 2 * weight.shape[1]:
        raise ValueError(f"gate_up has {gate_up.shape[-1]} columns; the weight takes {weight.shape[1]} inputs")
    if not _takes_gemv(gate_up, weight):
        return F.linear(silu_and_mul(gate_up), weight, bias)
    return _gemv(_rows(gate_up), weight, bias, PROLOGUE_SILU_MUL)
