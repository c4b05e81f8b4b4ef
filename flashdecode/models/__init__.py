"""Llama-family models on flashdecode attention, and their weight loaders (GGUF, safetensors)."""

from flashdecode.models.config import SUPPORTED_ARCHITECTURES, LlamaConfig
from flashdecode.models.llama import LlamaForCausalLM
from flashdecode.models.loader import LoadedModel, ModelSource, default_model_path, load_model, resolve_source
from flashdecode.models.metadata import AttentionMetadata

__all__ = [
    "SUPPORTED_ARCHITECTURES", "AttentionMetadata", "LlamaConfig", "LlamaForCausalLM", "LoadedModel",
    "ModelSource", "default_model_path", "load_model", "resolve_source",
]
