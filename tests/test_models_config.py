"""LlamaConfig from GGUF metadata and config.json; rotary frequencies against transformers."""

from __future__ import annotations

import pytest
import torch

from flashdecode.models import LlamaConfig
from flashdecode.models.rope import inverse_frequencies, rotary_tables

HF_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "eos_token_id": 2}

GGUF_META = {"general.architecture": "llama", "llama.block_count": 30, "llama.context_length": 8192,
             "llama.embedding_length": 576, "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
             "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0,
             "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 49152,
             "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.bos_token_id": 1}


def test_from_gguf_metadata():
    c = LlamaConfig.from_gguf_metadata(GGUF_META, {"token_embd.weight"})
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.tie_word_embeddings and not c.qkv_bias and c.eos_token_ids == (2,) and c.rope_theta == 1e5
    c2 = LlamaConfig.from_gguf_metadata({**{k.replace("llama.", "qwen2."): v for k, v in GGUF_META.items()},
                                         "general.architecture": "qwen2"},
                                        {"output.weight", "blk.0.attn_q.bias"})
    assert c2.architecture == "qwen2" and c2.qkv_bias and not c2.tie_word_embeddings


def test_architecture_comes_from_metadata_only():
    with pytest.raises(ValueError, match="'falcon'"):
        LlamaConfig.from_gguf_metadata({**GGUF_META, "general.architecture": "falcon"}, set())
    with pytest.raises(ValueError, match="None"):
        LlamaConfig.from_gguf_metadata({k: v for k, v in GGUF_META.items() if k != "general.architecture"}, set())
    with pytest.raises(ValueError, match="'gpt2'"):
        LlamaConfig.from_hf_config({**HF_LLAMA, "model_type": "gpt2"})


def test_from_hf_config_variants():
    c = LlamaConfig.from_hf_config(HF_LLAMA, {"eos_token_id": [2, 7]})
    assert c.head_dim == 16 and c.eos_token_ids == (2, 7) and c.rope_scaling is None and not c.qkv_bias
    q = LlamaConfig.from_hf_config({**HF_LLAMA, "model_type": "qwen2", "tie_word_embeddings": True})
    assert q.qkv_bias and not q.o_bias and q.tie_word_embeddings
    m = LlamaConfig.from_hf_config({**HF_LLAMA, "model_type": "mistral", "sliding_window": 32})
    assert m.sliding_windows == (32, 32)
    v5 = LlamaConfig.from_hf_config({**{k: v for k, v in HF_LLAMA.items() if k != "rope_theta"},
                                     "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    assert v5.rope_theta == 5e5 and v5.rope_scaling["rope_type"] == "linear"


@pytest.mark.parametrize("bad,match", [
    ({"hidden_act": "gelu"}, "activation"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"num_hidden_layers": None}, "num_hidden_layers|int"),
])
def test_bad_hf_configs(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LlamaConfig.from_hf_config({**HF_LLAMA, **bad})


def test_missing_key_is_a_value_error():
    with pytest.raises(ValueError, match="hidden_size"):
        LlamaConfig.from_hf_config({k: v for k, v in HF_LLAMA.items() if k != "hidden_size"})


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_inverse_frequencies_match_transformers(scaling):
    from transformers import LlamaConfig as HFConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": "default", "rope_theta": 500000.0} if scaling is None else {**scaling, "rope_theta": 500000.0}
    hf_cfg = HFConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=4096, rope_parameters=rope)
    hf = LlamaRotaryEmbedding(hf_cfg)
    ours = LlamaConfig.from_hf_config({**HF_LLAMA, "hidden_size": 256, "num_attention_heads": 2,
                                       "num_key_value_heads": 2, "rope_theta": 500000.0, "rope_scaling": scaling,
                                       "max_position_embeddings": 4096})
    torch.testing.assert_close(inverse_frequencies(ours), hf.inv_freq.float(), rtol=1e-6, atol=0)
    cos, sin = rotary_tables(ours, 100, "cpu", torch.float32)  # rows = positions, columns = pairs
    angles = torch.outer(torch.arange(100, dtype=torch.float64), hf.inv_freq.double())
    torch.testing.assert_close(cos, angles.cos().float(), rtol=0, atol=2e-5)
    torch.testing.assert_close(sin, angles.sin().float(), rtol=0, atol=2e-5)
