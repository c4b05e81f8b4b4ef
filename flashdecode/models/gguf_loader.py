"""Read a GGUF file: its config from the metadata and its tensors, dequantized by the `gguf` package.

Every tensor type `gguf.quants.dequantize` knows is accepted (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
the K-quants, ...); weights come out in float32 and are cast by the caller. llama.cpp stores the
Q/K projections of the ``llama`` architecture with rows permuted for its interleaved rotary; they
are permuted back here, so every model runs Hugging Face's rotate-half rotary.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from flashdecode.models.config import LlamaConfig

_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _reader(path: str) -> Any:
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the gguf package raises ValueError / struct errors on bad files
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc


def read_metadata(reader: Any) -> dict[str, Any]:
    """GGUF key/values as Python values (the big tokenizer arrays are left out)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in _BIG_ARRAYS:
            meta[key + ".count"] = len(field.data)
            continue
        meta[key] = field.contents()
    return meta


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name for a GGUF tensor name (None for tensors that are not weights)."""
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _PER_LAYER:
        return f"model.layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved pairs back to rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize(tensor: Any) -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor in PyTorch's (row-major) shape."""
    import gguf

    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ValueError(f"tensor {tensor.name}: GGUF type {tensor.tensor_type.name} cannot be dequantized") from exc
    shape = tuple(int(s) for s in reversed(tensor.shape.tolist()))
    array = np.asarray(array, dtype=np.float32).reshape(shape)
    if not array.flags.writeable or not array.flags.c_contiguous:  # F32 data is a view of the mapped file
        array = np.array(array, order="C")
    return torch.from_numpy(array)


def load_gguf(path: str) -> tuple[LlamaConfig, Iterator[tuple[str, torch.Tensor]]]:
    """The model config and a lazy iterator of ``(hf_name, float32 tensor)`` for a GGUF file."""
    reader = _reader(path)
    meta = read_metadata(reader)
    if "tokenizer.ggml.tokens.count" in meta and not meta.get(f"{meta.get('general.architecture')}.vocab_size"):
        meta[f"{meta.get('general.architecture')}.vocab_size"] = meta["tokenizer.ggml.tokens.count"]
    names = {t.name for t in reader.tensors}
    config = LlamaConfig.from_gguf_metadata(meta, names)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        factors = tuple(float(x) for x in dequantize(freqs).flatten().tolist())
        config = _replace(config, rope_freq_factors=factors)

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            w = dequantize(t)
            if config.architecture == "llama":
                if ".q_proj." in name:
                    w = unpermute_rows(w, config.num_heads)
                elif ".k_proj." in name:
                    w = unpermute_rows(w, config.num_kv_heads)
            yield name, w

    return config, weights()


def _replace(config: LlamaConfig, **changes: Any) -> LlamaConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)
