"""Hugging Face directories (config.json + safetensors): logits match transformers on tiny random models.

Also home of the tiny-model helpers the other engine/model tests import.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from flashdecode.models import AttentionMetadata, load_model

TINY_WORDS = ["<unk>", "<s>", "</s>", "user:", "assistant:", "system:"] + [f"w{i}" for i in range(122)]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def save_word_tokenizer(path: str) -> None:
    """A word-level tokenizer over `TINY_WORDS` ('w0 w5 ...'), with a chat template; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def tiny_hf_model(arch: str = "llama", seed: int = 0, **overrides):
    """A small random transformers model (2 layers, GQA 4/2, head dim 16) with peaky logits."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM")}
    cfg_cls, model_cls = (getattr(transformers, n) for n in classes[arch])
    kwargs = dict(vocab_size=len(TINY_WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  initializer_range=0.2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    config = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # make norms and biases non-trivial so their loading is tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_tiny_model_dir(path: str, arch: str = "llama", seed: int = 0, shard: bool = False, **overrides):
    """Save a tiny random model + word tokenizer as a Hugging Face directory; returns the HF model."""
    model = tiny_hf_model(arch, seed, **overrides)
    model.save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
    save_word_tokenizer(path)
    return model


def prefill_logits(model, sequences: list[list[int]], page_size: int = 4, shuffle_seed: int | None = 0,
                   cached: list[int] | None = None, pool=None, tables: list[list[int]] | None = None,
                   slack: int = 8):
    """Run one packed forward pass; returns (logits of every new token, pool, block tables).

    Each sequence gets pages for its length + ``slack`` tokens, taken from a shuffled pool.
    """
    total_pages = sum(-(-(len(s) + slack) // page_size) for s in sequences)
    if pool is None:
        pool = model.new_kv_pool(total_pages + 2, page_size)
    if tables is None:
        order = torch.randperm(pool.num_blocks, generator=torch.Generator().manual_seed(shuffle_seed or 0)).tolist() \
            if shuffle_seed is not None else list(range(pool.num_blocks))
        tables, i = [], 0
        for s in sequences:
            n = -(-(len(s) + slack) // page_size)
            tables.append(order[i:i + n])
            i += n
    cached = cached or [0] * len(sequences)
    new = [s[c:] for s, c in zip(sequences, cached)]
    cu = [0]
    for n in new:
        cu.append(cu[-1] + len(n))
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        cache_seqlens=torch.tensor(cached, dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32), max_seqlen_q=max(len(n) for n in new))
    with torch.inference_mode():
        logits = model(torch.tensor([t for n in new for t in n]), meta, pool)
    return logits, pool, tables


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0]


IDS = [1, 17, 5, 99, 42, 8, 8, 23, 64, 101, 3, 77, 15, 2, 9, 31, 44, 120, 6, 7]


@pytest.mark.parametrize("arch,overrides,shard", [
    pytest.param("llama", {}, False, id="llama-untied"),
    pytest.param("llama", {"tie_word_embeddings": True,
                           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                           "rope_theta": 500000.0}, False, id="llama-tied-llama3rope"),
    pytest.param("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, True, id="llama-linear-sharded"),
    pytest.param("qwen2", {"tie_word_embeddings": True}, False, id="qwen2-bias"),
    pytest.param("mistral", {"sliding_window": 6}, False, id="mistral-window"),
])
def test_logits_match_transformers(tmp_path, arch, overrides, shard):
    hf = make_tiny_model_dir(str(tmp_path), arch, shard=shard, **overrides)
    if shard:
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    loaded = load_model(str(tmp_path), tokenizer=False)
    assert loaded.config.architecture == arch
    ours, _, _ = prefill_logits(loaded.model, [IDS])
    torch.testing.assert_close(ours, hf_logits(hf, IDS), atol=2e-4, rtol=2e-4)


def test_incremental_decode_equals_full_recompute(tmp_path):
    make_tiny_model_dir(str(tmp_path))
    model = load_model(str(tmp_path), tokenizer=False).model
    full, _, _ = prefill_logits(model, [IDS], page_size=3)
    # Prefill 5 tokens, then feed the rest one at a time (decode form) through the same pages.
    first, pool, tables = prefill_logits(model, [IDS[:5]], page_size=3, slack=len(IDS))
    steps = [first[-1]]
    for t in range(5, len(IDS) - 1):
        meta = AttentionMetadata(cache_seqlens=torch.tensor([t], dtype=torch.int32),
                                 block_table=torch.tensor(tables, dtype=torch.int32))
        with torch.inference_mode():
            steps.append(model(torch.tensor([IDS[t]]), meta, pool)[0])
    torch.testing.assert_close(torch.stack(steps), full[4:-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("page_size", [1, 16])
def test_ragged_batch_equals_each_alone(tmp_path, page_size):
    make_tiny_model_dir(str(tmp_path))
    model = load_model(str(tmp_path), tokenizer=False).model
    seqs = [IDS[:11], IDS[3:5], IDS[2:19]]
    batch, pool, tables = prefill_logits(model, seqs, page_size=page_size, shuffle_seed=1)
    ends = torch.tensor([len(s) for s in seqs]).cumsum(0) - 1
    for k, s in enumerate(seqs):
        alone, _, _ = prefill_logits(model, [s], page_size=page_size, shuffle_seed=None)
        torch.testing.assert_close(batch[ends[k]], alone[-1], atol=1e-5, rtol=1e-5)
    # one decode step for all three together
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(cache_seqlens=torch.tensor([len(s) for s in seqs], dtype=torch.int32),
                             block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32))
    with torch.inference_mode():
        step = model(torch.tensor([5, 6, 7]), meta, pool)
    for k, (s, t) in enumerate(zip(seqs, [5, 6, 7])):
        alone, _, _ = prefill_logits(model, [s + [t]], page_size=page_size, shuffle_seed=None)
        torch.testing.assert_close(step[k], alone[-1], atol=1e-5, rtol=1e-5)


def test_unknown_architecture_in_config_json(tmp_path):
    make_tiny_model_dir(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gpt2"):
        load_model(str(tmp_path), tokenizer=False)


def test_missing_weight_and_wrong_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    make_tiny_model_dir(str(tmp_path))
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match="up_proj|gate_up_proj"):
        load_model(str(tmp_path), tokenizer=False)
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(128, 64)
    tensors["model.norm.weight"] = torch.zeros(65)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_model(str(tmp_path), tokenizer=False)


def test_missing_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "nope"), tokenizer=False)
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path), tokenizer=False)  # empty directory
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(str(tmp_path), tokenizer=False)
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="GGUF"):
        load_model(str(bad), tokenizer=False)
