"""Model configuration for the Llama family, read from GGUF metadata or a Hugging Face config.json.

The architecture always comes from the metadata (``general.architecture`` in GGUF, ``model_type``
/ ``architectures`` in config.json), never from a file name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Architectures this model implementation runs. Keys are GGUF `general.architecture` values and HF
# `model_type` values (they coincide for these three).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
_HF_CLASSES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_ROPE_TYPES = ("default", "linear", "llama3")


def _unsupported(arch: object) -> ValueError:
    return ValueError(
        f"unsupported model architecture {arch!r}; flashdecode runs {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder (Llama 1-3, Mistral, Qwen2, SmolLM)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # None = head_dim
    rope_scaling: Mapping[str, Any] | None = None  # {"rope_type": "linear" | "llama3", ...}
    rope_freq_factors: tuple[float, ...] | None = None  # GGUF `rope_freqs` tensor (llama3 scaling baked in)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_windows: tuple[int | None, ...] | None = None  # per layer, None = full attention
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise _unsupported(self.architecture)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model config: {name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model config: num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        rd = self.rotary_dim if self.rotary_dim is not None else self.head_dim
        if rd % 2 or not 0 < rd <= self.head_dim:
            raise ValueError(f"model config: rotary_dim {rd} must be even and in (0, head_dim={self.head_dim}]")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in _ROPE_TYPES:
                raise ValueError(f"model config: rope scaling type {kind!r} is not supported ({', '.join(_ROPE_TYPES)})")
        if self.sliding_windows is not None and len(self.sliding_windows) != self.num_layers:
            raise ValueError("model config: sliding_windows needs one entry per layer")

    @property
    def rotary(self) -> int:
        """Channels of each head that rotary embedding rotates."""
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None) -> LlamaConfig:
        """Build from the dict of a Hugging Face ``config.json`` (and optional ``generation_config.json``)."""
        try:
            return cls._from_hf_config(cfg, generation_config)
        except KeyError as exc:
            raise ValueError(f"model config lacks the key {exc.args[0]!r}") from None

    @classmethod
    def _from_hf_config(cls, cfg: Mapping[str, Any], generation_config: Mapping[str, Any] | None) -> LlamaConfig:
        arch = cfg.get("model_type")
        classes = cfg.get("architectures") or []
        if arch is None and len(classes) == 1:
            arch = _HF_CLASSES.get(classes[0], classes[0])
        if arch not in SUPPORTED_ARCHITECTURES:
            raise _unsupported(arch)
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"model config: activation {cfg.get('hidden_act')!r} is not supported (silu only)")
        if cfg.get("mlp_bias"):
            raise ValueError("model config: mlp_bias=True is not supported")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        kind = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if kind == "default" else rope
        rotary_dim = int(head_dim * float(cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))))
        num_layers = int(cfg["num_hidden_layers"])
        windows = _hf_sliding_windows(arch, cfg, num_layers)
        bias = bool(cfg.get("attention_bias", False))
        eos = _as_ids((generation_config or {}).get("eos_token_id")) + _as_ids(cfg.get("eos_token_id"))
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rotary_dim=rotary_dim,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if arch == "qwen2" else bias,
            o_bias=bias if arch != "qwen2" else False,
            sliding_windows=windows,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
        )

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], tensor_names: set[str]) -> LlamaConfig:
        """Build from GGUF key/value metadata (already decoded to Python values) and the tensor names."""
        try:
            return cls._from_gguf_metadata(meta, tensor_names)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"GGUF metadata is incomplete or malformed: {exc}") from None

    @classmethod
    def _from_gguf_metadata(cls, meta: Mapping[str, Any], tensor_names: set[str]) -> LlamaConfig:
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise _unsupported(arch)

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        num_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(get("attention.key_length") or hidden // num_heads)
        num_kv = get("attention.head_count_kv") or num_heads
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
        if isinstance(num_kv, (list, tuple)):  # per-layer list in some files
            if len(set(num_kv)) != 1:
                raise ValueError("model config: per-layer KV head counts are not supported")
            num_kv = num_kv[0]
        scaling_type = get("rope.scaling.type")
        rope_scaling = None
        if scaling_type not in (None, "none"):
            if scaling_type != "linear":
                raise ValueError(f"model config: GGUF rope scaling {scaling_type!r} is not supported")
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
        eos = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                     "tokenizer.ggml.eom_token_id")]
        window = get("attention.sliding_window")
        num_layers = int(get("block_count"))
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(num_kv),
            head_dim=head_dim,
            max_position_embeddings=int(get("context_length", 2048)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rotary_dim=int(get("rope.dimension_count") or head_dim),
            rope_scaling=rope_scaling,
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            sliding_windows=(int(window),) * num_layers if window else None,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        )


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _hf_sliding_windows(arch: str, cfg: Mapping[str, Any], num_layers: int) -> tuple[int | None, ...] | None:
    window = cfg.get("sliding_window")
    if arch == "mistral":
        return (int(window),) * num_layers if window else None
    if arch == "qwen2" and cfg.get("use_sliding_window") and window:
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            first_full = int(cfg.get("max_window_layers", num_layers))
            layer_types = ["full_attention" if i < first_full else "sliding_attention" for i in range(num_layers)]
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return None
