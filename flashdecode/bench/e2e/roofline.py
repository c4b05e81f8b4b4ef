"""Roofline arithmetic of the end-to-end benchmark (pure Python): bytes read per decode step and
the tokens/s they allow at the measured read bandwidth."""

from __future__ import annotations

from typing import Any


def model_dims(shape: dict[str, Any]) -> tuple[int, int, int, int, int, int, int]:
    h, heads = int(shape["hidden_size"]), int(shape["num_attention_heads"])
    d = int(shape.get("head_dim") or h // heads)
    return (h, int(shape["intermediate_size"]), int(shape["num_hidden_layers"]), heads,
            int(shape.get("num_key_value_heads") or heads), d, int(shape["vocab_size"]))


def weight_bytes_per_step(shape: dict[str, Any], dtype_bytes: int) -> int:
    """Bytes of weights one decode step reads: every projection and norm once, the lm_head (vocab x
    hidden, also when tied), and one embedding row per token (batch 1)."""
    h, inter, layers, heads, kv_heads, d, vocab = model_dims(shape)
    per_layer = h * heads * d + 2 * h * kv_heads * d + heads * d * h + 3 * h * inter + 2 * h
    return (layers * per_layer + h + vocab * h + h) * dtype_bytes


def num_parameters(shape: dict[str, Any]) -> int:
    h, inter, layers, heads, kv_heads, d, vocab = model_dims(shape)
    per_layer = h * heads * d + 2 * h * kv_heads * d + heads * d * h + 3 * h * inter + 2 * h
    return layers * per_layer + h + vocab * h * (1 if shape.get("tie_word_embeddings") else 2)


def kv_bytes_per_token(shape: dict[str, Any], dtype_bytes: int) -> int:
    _h, _i, layers, _heads, kv_heads, d, _v = model_dims(shape)
    return 2 * layers * kv_heads * d * dtype_bytes


def batch1_bytes_per_step(shape: dict[str, Any], prompt: int, new_tokens: int, dtype_bytes: int) -> float:
    """Average bytes per decode step of the batch-1 workload: weights + K/V of the mean context.

    Decode step j (1 .. new-1) attends over prompt + j keys; their mean is about prompt + new/2."""
    return weight_bytes_per_step(shape, dtype_bytes) + kv_bytes_per_token(shape, dtype_bytes) * (prompt + new_tokens / 2)


def roofline_tokens_per_s(bytes_per_step: float, read_gbs: float | None) -> float | None:
    if not read_gbs or not bytes_per_step:
        return None
    return read_gbs * 1e9 / bytes_per_step
