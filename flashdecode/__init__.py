"""flashdecode: exact attention over a KV cache for incremental decoding, and an engine on top."""

from __future__ import annotations

from typing import Any

from flashdecode.attention import flash_attn_with_kvcache, merge_attention_states

__version__ = "0.1.0"

__all__ = ["flash_attn_with_kvcache", "merge_attention_states", "LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # The engine pulls in transformers/gguf; load it only when asked for.
    if name in ("LLM", "SamplingParams"):
        from flashdecode import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'flashdecode' has no attribute {name!r}")
