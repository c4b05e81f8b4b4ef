"""Models, workloads, implementations and options of the end-to-end benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
MODEL_ALIASES = {"smollm2": "smollm2-135m", "135m": "smollm2-135m", "smollm": "smollm2-135m",
                 "8b": "llama3-8b", "llama3": "llama3-8b", "llama-3-8b": "llama3-8b", "llama3-8B": "llama3-8b"}
DEFAULT_MODELS = ("smollm2-135m", "llama3-8b")

OURS = ("flashdecode", "flashdecode-eager")
HF_IMPLS = ("hf-dynamic", "hf-static", "hf-static-compile")
IMPLS = OURS + HF_IMPLS
IMPL_ALIASES = {"flashdecode-graphs": "flashdecode"}  # the former name of the graph path, now the default
# Run order: the main comparison first; the eager engine (a diagnostic: what graphs save) and
# compile run in a second pass, after every other row of every model.
DEFAULT_IMPLS = ("flashdecode", "hf-dynamic", "hf-static", "flashdecode-eager")
LATE_IMPLS = ("flashdecode-eager", "hf-static-compile")
WORKLOADS = ("batch1", "throughput")

JSON_FILE = "e2e_results.json"
MD_FILE = "e2e_results.md"
TABLE_FILE = "e2e_table.txt"

# Targets of issue 6 (stated for an H100), on the best flashdecode configuration.
TARGET_8B_ROOFLINE_PCT = 85.0
TARGET_SMOLLM2_TPS = 1000.0
TARGET_THROUGHPUT_SPEEDUP = 5.0


@dataclass
class Workload:
    batch1_prompt: int = 512
    batch1_new: int = 256
    requests: int = 256
    prompt_range: tuple[int, int] = (64, 1024)
    output_range: tuple[int, int] = (64, 512)


FULL_WORKLOAD = Workload()
TINY_WORKLOAD = Workload(batch1_prompt=24, batch1_new=8, requests=6, prompt_range=(4, 40), output_range=(2, 10))


@dataclass
class E2EOptions:
    device: str = "auto"
    models: list[str] = field(default_factory=list)  # empty: DEFAULT_MODELS (tiny with tiny=True or on CPU)
    impls: list[str] = field(default_factory=list)  # empty: DEFAULT_IMPLS (no graphs on CPU)
    workloads: list[str] = field(default_factory=list)  # empty: both
    out: str = "bench_results"
    budget_s: float = 0.0  # 0 = no limit
    tiny: bool = False
    seed: int = 0
    dtype: str = "auto"  # bf16 on CUDA, fp32 on CPU
    hf_batch: int = 64
    repeats: int = 2  # timed batch-1 runs (best is kept)
    max_model_len: int = 2048
    kv_cache_gb: float | None = None  # None: what the throughput workload needs, capped by free memory
    ceiling_gb: float = 2.0
    full_warmup: bool = True  # flashdecode throughput: an untimed first pass of the whole workload
    init_std: float = 0.02
    write: bool = True  # write the reports under `out`


class Interrupted(BaseException):
    """SIGTERM (e.g. `timeout`) while running: stop, but still write the reports."""


def resolve_models(names: list[str], tiny: bool, device: torch.device) -> list[str]:
    if not names:
        return ["tiny"] if tiny or device.type != "cuda" else list(DEFAULT_MODELS)
    out = []
    for n in names:
        for part in n.replace(",", " ").split():
            key = MODEL_ALIASES.get(part, MODEL_ALIASES.get(part.lower(), part.lower()))
            if key not in MODEL_SHAPES:
                raise ValueError(f"unknown model {part!r}; choose from {', '.join(MODEL_SHAPES)}")
            if key not in out:
                out.append(key)
    return out


def resolve_impls(names: list[str], device: torch.device) -> list[str]:
    if not names:
        return [i for i in DEFAULT_IMPLS if device.type == "cuda" or i != "flashdecode-eager"]
    out = []
    for n in names:
        for part in n.replace(",", " ").split():
            part = IMPL_ALIASES.get(part, part)
            if part not in IMPLS:
                raise ValueError(f"unknown implementation {part!r}; choose from {', '.join(IMPLS)}")
            if part not in out:
                out.append(part)
    return out


def resolve_workloads(names: list[str]) -> list[str]:
    if not names:
        return list(WORKLOADS)
    out = []
    for n in names:
        for part in n.replace(",", " ").split():
            if part not in WORKLOADS:
                raise ValueError(f"unknown workload {part!r}; choose from {', '.join(WORKLOADS)}")
            if part not in out:
                out.append(part)
    return out


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name in ("auto", None):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}")
    return table[name]
