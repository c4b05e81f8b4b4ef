"""Rotary embedding tables (cos, sin) in the layout `flash_attn_with_kvcache` takes."""

from __future__ import annotations

import math

import torch

from flashdecode.models.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Per-pair rotation frequencies ``(rotary_dim / 2,)`` in float32, with rope scaling applied."""
    dim = config.rotary
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_freq_factors is not None:
        factors = torch.tensor(config.rope_freq_factors, dtype=torch.float32)
        if factors.numel() != inv_freq.numel():
            raise ValueError(f"rope_freqs has {factors.numel()} entries, expected {inv_freq.numel()}")
        inv_freq = inv_freq / factors
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept; the band between
        # the two cut-offs is interpolated smoothly.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    return inv_freq  # "default"


def rotary_tables(config: LlamaConfig, max_positions: int, device: torch.device | str,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``(max_positions, rotary_dim / 2)``, computed in float32 then cast."""
    inv_freq = inverse_frequencies(config).to(device)
    positions = torch.arange(max_positions, device=device, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)
