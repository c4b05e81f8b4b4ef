"""Read a Hugging Face model directory: ``config.json`` and ``*.safetensors`` (single or sharded)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from flashdecode.models.config import LlamaConfig


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def safetensors_files(directory: str) -> list[str]:
    """The checkpoint files: those named by ``model.safetensors.index.json`` if present, else all."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    else:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    paths = [os.path.join(directory, f) for f in files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"checkpoint shard not found: {missing[0]}")
    if not paths:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    return paths


def load_hf_dir(directory: str) -> tuple[LlamaConfig, Iterator[tuple[str, torch.Tensor]]]:
    """The model config and a lazy iterator of ``(name, tensor)`` over every shard."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory} has no config.json")
    files = safetensors_files(directory)
    gen_path = os.path.join(directory, "generation_config.json")
    gen = _read_json(gen_path) if os.path.isfile(gen_path) else None
    config = LlamaConfig.from_hf_config(_read_json(config_path), gen)

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    return config, weights()
