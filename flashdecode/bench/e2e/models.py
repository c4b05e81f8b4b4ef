"""Building the random-weight models: transformers' model and flashdecode's LLM over the same tensors."""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Any

import torch

from flashdecode.bench.e2e.roofline import kv_bytes_per_token, model_dims


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


def build_hf_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int,
                   init_std: float = 0.02):
    """A random-weight transformers `LlamaForCausalLM`, created directly on ``device`` in ``dtype``
    (no fp32 copy on the host: the 8B shape is 16 GB in bf16)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    config = LlamaConfig(**shape, initializer_range=init_std, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for p in model.parameters():  # rotary buffers stay fp32; only parameters are checked
        if p.dtype != dtype or p.device.type != device.type:
            p.data = p.data.to(device=device, dtype=dtype)
    model.to(device)  # buffers too (a no-op when built in place); dtypes are left alone
    model.eval().requires_grad_(False)
    return model


class StubTokenizer:
    """What `LLM` needs of a tokenizer when every prompt is token ids: decode to "" (no text)."""

    eos_token_id = None
    bos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens: bool = True, **_kw) -> str:
        return ""

    def __call__(self, text, **_kw):
        raise ValueError("the benchmark's random-weight models have no tokenizer; pass token ids")


@contextlib.contextmanager
def in_memory_loader(hf_model):
    """Make `LLM(...)` build its model from ``hf_model``'s tensors (shared where no fusion is needed)
    instead of reading files; the tokenizer is a `StubTokenizer`."""
    import flashdecode.engine.llm as llm_mod  # noqa: PLC0415
    from flashdecode.models.config import LlamaConfig as FDConfig  # noqa: PLC0415
    from flashdecode.models.llama import LlamaForCausalLM as FDModel  # noqa: PLC0415
    from flashdecode.models.loader import LoadedModel, ModelSource  # noqa: PLC0415

    def load(_model, *, device, dtype, tokenizer: bool = True):
        config = FDConfig.from_hf_config(hf_model.config.to_dict())
        with torch.device("meta"):
            net = FDModel(config)
        net.load_hf_weights(hf_model.state_dict().items(), device=device, dtype=dtype)
        net.eval()
        return LoadedModel(net, config, StubTokenizer(), ModelSource("hf", "<in-memory random weights>"))

    original = llm_mod.load_model
    llm_mod.load_model = load
    try:
        yield
    finally:
        llm_mod.load_model = original


def kv_cache_gb_for(requests: list[tuple[list[int], int]], shape: dict[str, Any], dtype_bytes: int,
                    device: torch.device, page_size: int = 16) -> tuple[float, str]:
    """KV pool size: what the throughput workload needs at once (all requests resident), capped
    by free device memory (then the engine preempts, which it reports)."""
    tokens = sum(-(-(len(p) + o) // page_size) * page_size for p, o in requests)
    need = tokens * kv_bytes_per_token(shape, dtype_bytes) * 1.05 + (64 << 20)
    note = ""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        h, inter, layers, heads, kv_heads, d, _v = model_dims(shape)
        fused = layers * (h * (heads + 2 * kv_heads) * d + 2 * h * inter) * dtype_bytes  # copies made by fusing
        cap = 0.80 * (free - fused) - (3 << 30)
        if need > cap:
            note = f"KV pool capped at {cap / 2**30:.1f} GiB by free memory (workload needs {need / 2**30:.1f})"
            need = max(cap, 256 << 20)
    return need / 2**30, note


def build_llm(hf_model, device: torch.device, dtype: torch.dtype, *, cuda_graphs: bool | None, kv_cache_gb: float,
              max_model_len: int):
    from flashdecode.engine.llm import LLM  # noqa: PLC0415

    context = int(hf_model.config.max_position_embeddings)
    with in_memory_loader(hf_model):
        return LLM("<in-memory>", dtype=dtype, device=device, kv_cache_gb=kv_cache_gb, cuda_graphs=cuda_graphs,
                   max_model_len=min(max_model_len, context), seed=0)
