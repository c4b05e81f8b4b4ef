"""GGUF files: dequantization of each tensor type, metadata -> config, Q/K un-permutation, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from flashdecode.models import load_model  # noqa: E402
from flashdecode.models.gguf_loader import dequantize, load_gguf  # noqa: E402
from test_models_safetensors import IDS, hf_logits, prefill_logits, tiny_hf_model  # noqa: E402

Q = gguf.GGMLQuantizationType


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 4-bit values: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)


def independent_dequant(raw: np.ndarray, qtype) -> np.ndarray:
    """Decode the block formats from ggml's layout, written here without the gguf package."""
    rows = raw.reshape(raw.shape[0], -1)
    if qtype == Q.Q8_0:  # 34 bytes: f16 scale, 32 x int8
        blocks = rows.reshape(rows.shape[0], -1, 34)
        return (_f16(blocks[..., :2]) * blocks[..., 2:].copy().view(np.int8)).reshape(rows.shape[0], -1)
    if qtype == Q.Q4_0:  # 18 bytes: f16 scale, 16 bytes of nibbles; x = d * (q - 8)
        blocks = rows.reshape(rows.shape[0], -1, 18)
        return (_f16(blocks[..., :2]) * (_nibbles(blocks[..., 2:]) - 8)).reshape(rows.shape[0], -1)
    if qtype == Q.Q4_1:  # 20 bytes: f16 scale, f16 min, 16 bytes of nibbles; x = d * q + m
        blocks = rows.reshape(rows.shape[0], -1, 20)
        return (_f16(blocks[..., :2]) * _nibbles(blocks[..., 4:]) + _f16(blocks[..., 2:4])).reshape(rows.shape[0], -1)
    raise AssertionError(qtype)


# type -> largest error allowed against the original float32 values (N(0, 1) data)
CASES = {Q.F32: 0.0, Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 0.03, Q.Q4_0: 0.5, Q.Q4_1: 0.4}


def _write(path, tensors: dict, arch: str = "llama", meta=None) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    for name, (array, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, array.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_dequantize_each_type(tmp_path):
    rng = np.random.default_rng(0)
    original = rng.standard_normal((3, 64)).astype(np.float32)  # 3 rows of 2 blocks each
    _write(tmp_path / "q.gguf", {f"t_{q.name}": (original, q) for q in CASES})
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    seen = set()
    for t in reader.tensors:
        qtype = t.tensor_type
        seen.add(qtype)
        ours = dequantize(t)
        assert ours.dtype == torch.float32 and tuple(ours.shape) == (3, 64), (qtype, ours.shape)
        err = (ours.numpy() - original).__abs__().max()
        assert err <= CASES[qtype], (qtype.name, err)
        if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
            np.testing.assert_array_equal(ours.numpy(), independent_dequant(np.asarray(t.data), qtype))
        elif qtype == Q.BF16:  # bf16 = the top 16 bits of the float32
            expected = (original.view(np.uint32) + 0x7FFF + ((original.view(np.uint32) >> 16) & 1)) & 0xFFFF0000
            np.testing.assert_array_equal(ours.numpy(), expected.view(np.float32))
    assert seen == set(CASES)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The Q/K row order llama.cpp's converter writes for the llama architecture."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_to_gguf(hf, qtype=Q.F32, permute: bool = True) -> dict:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    cfg = hf.config
    out = {}
    for name, p in hf.state_dict().items():
        w = p.detach().numpy().astype(np.float32)
        if name in names:
            gname = names[name]
        else:
            _, _, layer, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            gname = f"blk.{layer}.{per_layer[module]}.{kind}"
            if permute and module == "self_attn.q_proj":
                w = _llama_cpp_permute(w, cfg.num_attention_heads)
            elif permute and module == "self_attn.k_proj":
                w = _llama_cpp_permute(w, cfg.num_key_value_heads)
        out[gname] = (w, qtype if w.ndim == 2 else Q.F32)
    return out


def _llama_meta(hf, arch="llama") -> dict:
    c = hf.config
    return {f"{arch}.block_count": c.num_hidden_layers, f"{arch}.context_length": c.max_position_embeddings,
            f"{arch}.embedding_length": c.hidden_size, f"{arch}.feed_forward_length": c.intermediate_size,
            f"{arch}.attention.head_count": c.num_attention_heads,
            f"{arch}.attention.head_count_kv": c.num_key_value_heads,
            f"{arch}.rope.freq_base": float(c.rope_parameters["rope_theta"]),
            f"{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
            f"{arch}.vocab_size": c.vocab_size, "tokenizer.ggml.eos_token_id": 2}


def test_tiny_llama_gguf_matches_transformers(tmp_path):
    """Weights written in llama.cpp's permuted Q/K order load back to the same logits as the HF model."""
    hf = tiny_hf_model("llama")
    _write(tmp_path / "tiny.gguf", _hf_to_gguf(hf), meta=_llama_meta(hf))
    loaded = load_model(str(tmp_path / "tiny.gguf"), tokenizer=False)
    c = loaded.config
    assert (c.architecture, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 2, 4, 2, 16)
    assert not c.tie_word_embeddings and c.eos_token_ids == (2,)
    ours, _, _ = prefill_logits(loaded.model, [IDS])
    torch.testing.assert_close(ours, hf_logits(hf, IDS), atol=2e-4, rtol=2e-4)


def test_tiny_qwen2_gguf_matches_transformers(tmp_path):
    """qwen2 files keep Hugging Face's Q/K order (llama.cpp uses NeoX rotary there) and carry q/k/v biases."""
    hf = tiny_hf_model("qwen2")
    _write(tmp_path / "qwen.gguf", _hf_to_gguf(hf, permute=False), arch="qwen2", meta=_llama_meta(hf, "qwen2"))
    loaded = load_model(str(tmp_path / "qwen.gguf"), tokenizer=False)
    assert loaded.config.architecture == "qwen2" and loaded.config.qkv_bias
    ours, _, _ = prefill_logits(loaded.model, [IDS])
    torch.testing.assert_close(ours, hf_logits(hf, IDS), atol=2e-4, rtol=2e-4)


def test_tied_embeddings_when_output_missing(tmp_path):
    hf = tiny_hf_model("llama", tie_word_embeddings=True)
    tensors = _hf_to_gguf(hf)
    del tensors["output.weight"]
    _write(tmp_path / "tied.gguf", tensors, meta=_llama_meta(hf))
    loaded = load_model(str(tmp_path / "tied.gguf"), tokenizer=False)
    assert loaded.config.tie_word_embeddings
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    ours, _, _ = prefill_logits(loaded.model, [IDS])
    torch.testing.assert_close(ours, hf_logits(hf, IDS), atol=2e-4, rtol=2e-4)


def test_unknown_architecture(tmp_path):
    hf = tiny_hf_model("llama")
    meta = {k.replace("llama.", "gpt2."): v for k, v in _llama_meta(hf).items()}
    _write(tmp_path / "llama-named.gguf", {"token_embd.weight": (np.zeros((128, 64), np.float32), Q.F32)},
           arch="gpt2", meta=meta)
    with pytest.raises(ValueError, match="'gpt2'"):
        load_gguf(str(tmp_path / "llama-named.gguf"))


def test_incomplete_metadata(tmp_path):
    _write(tmp_path / "bare.gguf", {"token_embd.weight": (np.zeros((8, 64), np.float32), Q.F32)})
    with pytest.raises(ValueError, match="GGUF metadata"):
        load_gguf(str(tmp_path / "bare.gguf"))


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing.gguf"), tokenizer=False)
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match="GGUF"):
        load_model(str(bad), tokenizer=False)
