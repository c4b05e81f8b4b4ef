"""A Llama-family decoder whose attention is `flash_attn_with_kvcache` over a paged KV cache.

Parameter names follow Hugging Face's (``model.layers.N.self_attn.o_proj.weight`` ...) except
that q/k/v and gate/up projections are fused into ``qkv_proj`` and ``gate_up_proj``;
`load_hf_weights` takes tensors under Hugging Face names and fuses them. Q/K rows are in Hugging
Face order, so rotary is the non-interleaved (rotate-half) form.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from flashdecode.attention import flash_attn_with_kvcache
from flashdecode.cache import PagedKVPool
from flashdecode.models.config import LlamaConfig
from flashdecode.models.layers import linear, norm_linear, rms_norm, silu_mul_linear
from flashdecode.models.metadata import AttentionMetadata
from flashdecode.models.rope import rotary_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(norm(x + residual), x + residual)``, or ``(norm(x), None)`` without a residual."""
        return rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        window = config.sliding_windows[layer] if config.sliding_windows else None
        # HF's sliding window W lets query i see keys i - W + 1 .. i.
        self.window_size = (window - 1, 0) if window else (-1, -1)

    def forward(self, qkv: torch.Tensor, meta: AttentionMetadata, kv: PagedKVPool,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``qkv`` is ``qkv_proj``'s output (the layer runs it, fused with the norm before it);
        returns ``o_proj``'s."""
        tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        common = dict(
            rotary_cos=cos, rotary_sin=sin, cache_seqlens=meta.cache_seqlens, block_table=meta.block_table,
            causal=True, window_size=self.window_size, rotary_interleaved=False,
            check_values=meta.check_values,
        )
        k_cache, v_cache = kv.k_cache(self.layer), kv.v_cache(self.layer)
        if meta.is_decode:  # one new token per sequence: (B, 1, H, D)
            out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, k=k.unsqueeze(1), v=v.unsqueeze(1),
                                          **common)
        else:
            out = flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cu_seqlens_q=meta.cu_seqlens_q,
                                          max_seqlen_q=meta.max_seqlen_q, cu_seqlens_k_new=meta.cu_seqlens_q,
                                          **common)
        return linear(out.reshape(tokens, self.q_size), self.o_proj.weight, self.o_proj.bias)


class MLP(nn.Module):
    """The MLP's weights; the decoder layer runs them, fused with the norm and the activation."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata, kv: PagedKVPool,
                cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream carried separately: returns ``(block output, residual)``, whose sum is the
        layer's output; the add is fused into the next norm."""
        attn, mlp = self.self_attn, self.mlp
        qkv, residual = norm_linear(x, residual, self.input_layernorm.weight, self.input_layernorm.eps,
                                    attn.qkv_proj.weight, attn.qkv_proj.bias)
        if residual is None:
            residual = x
        norm = self.post_attention_layernorm
        gate_up, residual = norm_linear(attn(qkv, meta, kv, cos, sin), residual, norm.weight, norm.eps,
                                        mlp.gate_up_proj.weight)
        return silu_mul_linear(gate_up, mlp.down_proj.weight), residual


class DecoderModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Token ids in, logits out; keys and values go to (and come from) a `PagedKVPool`."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_cos: torch.Tensor | None = None
        self.rotary_sin: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def build_rotary(self, max_positions: int | None = None) -> None:
        """(Re)compute the rotary tables on the weights' device and dtype."""
        n = max_positions or self.config.max_position_embeddings
        self.rotary_cos, self.rotary_sin = rotary_tables(self.config, n, self.device, self.dtype)

    def new_kv_pool(self, num_blocks: int, page_size: int) -> PagedKVPool:
        c = self.config
        return PagedKVPool(c.num_layers, num_blocks, page_size, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv: PagedKVPool) -> torch.Tensor:
        """``input_ids`` ``(T,)`` packed new tokens -> logits ``(N, vocab)`` for ``meta.logits_indices``."""
        if self.rotary_cos is None:
            self.build_rotary()
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, meta, kv, self.rotary_cos, self.rotary_sin)
        if meta.logits_indices is not None:
            x = x.index_select(0, meta.logits_indices)
            residual = residual.index_select(0, meta.logits_indices)
        return norm_linear(x, residual, self.model.norm.weight, self.model.norm.eps, self.lm_head.weight)[0]

    # ------------------------------------------------------------------ weights
    def load_hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]], *, device: torch.device | str,
                        dtype: torch.dtype) -> None:
        """Load tensors named as in a Hugging Face checkpoint, fusing q/k/v and gate/up.

        The model may live on the meta device; parameters are replaced by the loaded tensors.
        Raises ValueError for a missing or unexpected tensor, or a shape mismatch.
        """
        fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                 "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
        pattern = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp))\.(\w+)\.(weight|bias)$")
        expected = dict(self.named_parameters())  # tied lm_head appears once, as embed_tokens
        state: dict[str, torch.Tensor] = {}
        parts: dict[str, dict[int, torch.Tensor]] = {}
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            tensor = tensor.to(device=device, dtype=dtype)
            m = pattern.match(name)
            if m and m.group(2) in fused:
                target, index = fused[m.group(2)]
                parts.setdefault(f"{m.group(1)}.{target}.{m.group(3)}", {})[index] = tensor
                continue
            if name not in expected:
                raise ValueError(f"unexpected weight {name!r} in the checkpoint")
            state[name] = tensor
        for name, pieces in parts.items():
            count = 3 if ".qkv_proj." in name else 2
            if sorted(pieces) != list(range(count)):
                raise ValueError(f"checkpoint lacks part of {name} (has pieces {sorted(pieces)})")
            state[name] = torch.cat([pieces[i] for i in range(count)], dim=0)
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"checkpoint lacks weights: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        for name, tensor in state.items():
            if name not in expected:
                raise ValueError(f"unexpected weight {name!r} in the checkpoint")
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(f"weight {name}: shape {tuple(tensor.shape)} does not match "
                                 f"the config's {tuple(expected[name].shape)}")
        self.load_state_dict(state, strict=False, assign=True)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.requires_grad_(False)
        self.build_rotary()
