"""The LLM facade and scheduler on a tiny random model directory (fast; no download)."""

from __future__ import annotations

import pytest
import torch

from flashdecode.engine import LLM, SamplingParams
from test_models_safetensors import make_tiny_model_dir

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["w1 w2 w3 w4 w5 w6 w7", "w9", "w20 w21 w22 w23", "w5 w5 w5 w5 w5 w5 w5 w5 w5 w5 w5 w5 w5"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_model_dir(str(path), "llama", seed=3)
    return str(path)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, page_size=4, num_kv_blocks=64, seed=0)


def _pages_all_free(llm):
    return llm.allocator.num_free == llm.allocator.num_blocks and not llm._busy


def test_outputs_in_order_with_text_and_reasons(llm):
    outs = llm.generate(PROMPTS, GREEDY)
    assert len(outs) == len(PROMPTS)
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt == prompt and out.prompt_token_ids == llm.encode(prompt)
        assert len(out.token_ids) == 12 and out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert _pages_all_free(llm)


def test_ragged_batch_equals_each_request_alone(llm):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 3, 20, 7)]
    batch = llm.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, batch):
        alone = llm.generate(prompt, p)[0]
        assert alone.token_ids == out.token_ids and len(out.token_ids) == p.max_tokens
    # token-id prompts are used as is
    ids = llm.encode(PROMPTS[0])
    assert llm.generate([ids], params[0])[0].token_ids == batch[0].token_ids


def test_small_pool_and_few_slots_still_complete_every_request(model_dir, llm):
    expected = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    small = LLM(model_dir, page_size=2, num_kv_blocks=14, max_num_seqs=2, seed=0)  # pages for ~1 request at a time
    got = [o.token_ids for o in small.generate(PROMPTS, GREEDY)]
    assert got == expected
    assert _pages_all_free(small)


def test_end_of_sequence_token_stops_unless_ignored(llm):
    tokens = llm.generate(PROMPTS[0], GREEDY)[0].token_ids
    eos = tokens[4]
    first = tokens.index(eos)
    saved = llm.eos_token_ids
    llm.eos_token_ids = frozenset({eos})
    try:
        out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12))[0]
        assert out.finish_reason == "stop" and out.token_ids == tokens[:first + 1]
        assert llm.generate(PROMPTS[0], GREEDY)[0].token_ids == tokens
    finally:
        llm.eos_token_ids = saved


def test_stop_strings_cut_the_text(llm):
    full = llm.generate(PROMPTS[2], GREEDY)[0]
    words = full.text.split()
    stop = words[5]
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12, stop=["zzz", stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.index(stop)]
    assert full.token_ids[:len(out.token_ids)] == out.token_ids
    spanning = f"{words[6]} {words[7]}"  # ends in a later token than it starts
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12, stop=spanning))[0]
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.index(spanning)]


def test_stream_yields_the_same_text(llm):
    for params in (GREEDY, SamplingParams(temperature=0, max_tokens=12, stop=" w")):
        expected = llm.generate(PROMPTS[0], params)[0]
        stream = llm.stream(PROMPTS[0], params)
        pieces = []
        while True:
            try:
                pieces.append(next(stream))
            except StopIteration as stop:
                result = stop.value
                break
        assert "".join(pieces) == expected.text == result.text
        assert result.token_ids == expected.token_ids and len(pieces) >= 1
    assert _pages_all_free(llm)


def test_abandoned_stream_releases_everything(llm):
    stream = llm.stream(PROMPTS[0], GREEDY)
    next(stream)
    assert llm._busy and llm.allocator.num_free < llm.allocator.num_blocks
    with pytest.raises(RuntimeError, match="already generating"):
        llm.generate("w1", GREEDY)
    stream.close()
    assert _pages_all_free(llm)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=1.0, top_k=20, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    a = llm.generate(PROMPTS[1], p)[0].token_ids
    b = llm.generate(PROMPTS[1], p)[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)
    c = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[3]], [others, p, others])[1].token_ids
    assert a == b == c
    greedy = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].token_ids
    different_seed = llm.generate(PROMPTS[1], SamplingParams(temperature=1.0, max_tokens=16, seed=99,
                                                             ignore_eos=True))[0].token_ids
    assert a != greedy or a != different_seed


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "w1 w2"}]
    ids = llm.encode_chat(messages)
    assert ids == llm.encode("user: w1 w2 assistant:")
    out = llm.chat(messages, GREEDY)
    assert len(out) == 1 and out[0].token_ids == llm.generate([ids], GREEDY)[0].token_ids
    two = llm.chat([messages, [{"role": "user", "content": "w7"}]], GREEDY)
    assert two[0].token_ids == out[0].token_ids and len(two) == 2


def test_chat_session_reuses_the_cache_and_matches_a_fresh_chat(llm):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    session = llm.chat_session(system_prompt="w3")
    first = "".join(session.send("w1 w2", params))
    assert session.last_reused_tokens == 0
    held = llm.allocator.num_used
    assert held > 0  # the conversation keeps its pages between turns
    reply = session.send("w4", params)
    second = "".join(reply)
    assert session.last_reused_tokens > 5
    fresh = llm.chat(session.messages[:-1], params)[0]
    assert second == fresh.text
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == first
    session.close()
    assert _pages_all_free(llm)


def test_context_limit_ends_with_length(model_dir):
    small = LLM(model_dir, max_model_len=12, num_kv_blocks=16, page_size=4)
    out = small.generate("w1 w2 w3 w4 w5 w6 w7 w8", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="context"):
        small.generate("w1 " * 12, GREEDY)


@pytest.mark.parametrize("call,match", [
    (lambda llm: llm.generate([], GREEDY), "empty"),
    (lambda llm: llm.generate("", GREEDY), "empty"),
    (lambda llm: llm.generate(["w1", "w2"], [GREEDY]), "sampling_params"),
    (lambda llm: llm.generate([[1, 2, 100000]], GREEDY), "vocabulary"),
    (lambda llm: llm.chat([{"content": "x"}], GREEDY), "role"),
    (lambda llm: llm.chat([], GREEDY), "messages"),
])
def test_bad_requests_raise_value_error_and_leave_the_pool_clean(llm, call, match):
    with pytest.raises(ValueError, match=match):
        call(llm)
    assert _pages_all_free(llm)


def test_request_larger_than_the_pool(model_dir):
    tiny_pool = LLM(model_dir, num_kv_blocks=2, page_size=4)
    assert tiny_pool.generate("w1 w2", SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    with pytest.raises(ValueError, match="KV cache"):
        tiny_pool.generate("w1 w2", SamplingParams(max_tokens=7, temperature=0))


def test_bad_prompt_types(llm):
    with pytest.raises(TypeError):
        llm.generate(42, GREEDY)
    with pytest.raises(TypeError):
        llm.generate([["w1"], 3], GREEDY)


@pytest.mark.parametrize("kwargs,match", [
    ({"device": "tpu"}, "device"),
    ({"dtype": "int8"}, "dtype"),
    ({"page_size": 0}, "page_size"),
    ({"max_model_len": 100000}, "max_model_len"),
    ({"num_kv_blocks": 0}, "num_kv_blocks"),
])
def test_bad_engine_arguments(model_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(model_dir, **kwargs)


def test_missing_model_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        LLM(str(tmp_path / "nothing-here.gguf"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16"])
def test_low_precision_on_cpu_runs(model_dir, dtype):
    low = LLM(model_dir, dtype=dtype, num_kv_blocks=16, page_size=4)
    out = low.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and low.pool.storage.dtype == low.dtype
