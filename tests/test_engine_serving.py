"""Serving features end to end on a tiny random model: prefix caching, preemption, chunked prefill.

Each must give exactly the greedy tokens of a plain run (prefix caching off, a pool large enough,
no chunking), with the counters showing the feature really ran.
"""

from __future__ import annotations

import pytest

from flashdecode.engine import LLM, SamplingParams
from test_models_safetensors import make_tiny_model_dir

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SHARED = " ".join(f"w{10 + i % 37}" for i in range(23))  # 23 tokens: several full pages
PROMPTS = [SHARED + " w1 w2", SHARED + " w3", SHARED + " w4 w5 w6 w7 w8 w9", "w7 w8 w9 w10 w11",
           " ".join(f"w{60 + i % 40}" for i in range(41))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-serving")
    make_tiny_model_dir(str(path), "llama", seed=5)
    return str(path)


@pytest.fixture(scope="module")
def cold(model_dir):
    """Reference engine: no prefix caching, pool for everything, budget for every prompt at once."""
    return LLM(model_dir, page_size=4, num_kv_blocks=256, enable_prefix_caching=False, seed=0)


@pytest.fixture(scope="module")
def expected(cold):
    """Each prompt alone, cold."""
    return [cold.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


def test_cold_reference_never_hits_the_prefix_cache(cold, expected):
    assert cold.stats.prefix_hit_tokens == 0 and cold.stats.preemptions == 0
    assert cold.generate(PROMPTS, GREEDY)[0].token_ids == expected[0]


def test_prefix_cache_hits_give_the_cold_tokens_and_prefill_less(model_dir, expected):
    llm = LLM(model_dir, page_size=4, num_kv_blocks=256, seed=0)
    first = llm.generate(PROMPTS[0], GREEDY)[0]
    assert first.token_ids == expected[0] and llm.stats.prefix_hit_tokens == 0
    before = llm.stats.prefilled_tokens
    second = llm.generate(PROMPTS[1], GREEDY)[0]
    n_prompt = len(second.prompt_token_ids)
    assert second.token_ids == expected[1]
    assert llm.stats.prefix_hit_tokens == 20  # 5 full pages of the 23 shared tokens
    assert llm.stats.prefilled_tokens - before == n_prompt - 20
    # the same prompt again: every page but the last one is a hit; the last page is recomputed
    hits = llm.stats.prefix_hit_tokens
    again = llm.generate(PROMPTS[1], GREEDY)[0]
    assert again.token_ids == expected[1]
    assert llm.stats.prefix_hit_tokens - hits == (n_prompt - 1) // 4 * 4
    # a batch of prompts sharing the prefix, and the generated tokens of earlier requests
    outs = llm.generate(PROMPTS + [PROMPTS[0]], GREEDY)
    assert [o.token_ids for o in outs] == expected + [expected[0]]
    continued = llm.generate([first.prompt_token_ids + first.token_ids[:6]],
                             SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert continued.token_ids == expected[0][6:10]
    assert llm.allocator.num_used == 0 and llm.allocator.num_cached > 0
    llm.reset_prefix_cache()
    assert llm.allocator.num_cached == 0


def test_tiny_pool_preempts_and_every_request_completes_like_alone(model_dir, expected):
    # 14 pages of 4 = 56 slots; the longest request reaches 51 tokens, so they cannot all run at once
    for caching in (True, False):
        small = LLM(model_dir, page_size=4, num_kv_blocks=14, max_num_seqs=8, enable_prefix_caching=caching, seed=0)
        outs = small.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == expected
        assert small.stats.preemptions > 0
        assert small.allocator.num_used == 0 and not small._busy


def test_chunked_prefill_gives_the_unchunked_tokens(model_dir, expected):
    chunked = LLM(model_dir, page_size=4, num_kv_blocks=256, max_num_batched_tokens=7,
                  enable_prefix_caching=False, seed=0)
    outs = chunked.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == expected
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    assert chunked.stats.steps >= prompt_tokens // 7  # every step stayed within 7 tokens
    # odd page size, chunks that end mid-page, prefix hits and a small pool together
    mixed = LLM(model_dir, page_size=3, num_kv_blocks=24, max_num_batched_tokens=5, max_num_seqs=3, seed=0)
    assert [o.token_ids for o in mixed.generate(PROMPTS, GREEDY)] == expected
    assert mixed.stats.prefix_hit_tokens > 0


def test_streaming_and_chat_session_under_preemption_and_chunking(model_dir, cold):
    small = LLM(model_dir, page_size=4, num_kv_blocks=16, max_num_batched_tokens=6, seed=0)
    assert "".join(small.stream(PROMPTS[4], GREEDY)) == cold.generate(PROMPTS[4], GREEDY)[0].text
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    session = small.chat_session(system_prompt="w3")
    "".join(session.send("w1 w2", params))
    second = "".join(session.send("w4", params))
    assert second == cold.chat(session.messages[:-1], params)[0].text
    session.close()
    assert small.allocator.num_used == 0


def test_request_that_cannot_fit_alone_is_refused_up_front(model_dir):
    tiny = LLM(model_dir, page_size=4, num_kv_blocks=3)
    with pytest.raises(ValueError, match="KV cache"):
        tiny.generate(["w1 w2", PROMPTS[4]], GREEDY)
    assert tiny.allocator.num_used == 0
    assert len(tiny.generate("w1 w2", GREEDY)[0].token_ids) == 10  # 12 tokens = 3 pages: fits


def test_engine_skips_the_ops_value_checks_and_keeps_table_width_bucketed(model_dir, monkeypatch):
    """The engine builds valid metadata itself, so every op call passes check_values=False (no host
    sync per layer); eager steps' block tables only take power-of-two widths (no recompiles as
    sequences grow; graphs, off here, use one fixed width)."""
    import flashdecode.models.llama as llama

    calls = []
    real = llama.flash_attn_with_kvcache

    def spy(*args, **kwargs):
        calls.append((kwargs.get("check_values"), kwargs["block_table"].shape[1], "cu_seqlens_q" in kwargs))
        return real(*args, **kwargs)

    # float32, each prompt alone as the reference: on a GPU, bf16 steps of different batch sizes
    # (one-row GEMV vs cuBLAS tiles) may round a near tie differently.
    alone = LLM(model_dir, dtype="float32", page_size=4, num_kv_blocks=256, enable_prefix_caching=False, seed=0,
                cuda_graphs=False)
    want = [alone.generate(p, GREEDY)[0].token_ids for p in PROMPTS]
    monkeypatch.setattr(llama, "flash_attn_with_kvcache", spy)
    llm = LLM(model_dir, dtype="float32", page_size=4, num_kv_blocks=256, max_num_batched_tokens=9, seed=0,
              cuda_graphs=False)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
    assert calls and all(c[0] is False for c in calls)
    assert {c[1] for c in calls} <= {1, 2, 4, 8, 16} and any(c[2] for c in calls) and any(not c[2] for c in calls)


def test_decode_graph_plumbing_with_an_eager_stand_in(model_dir):
    """The CUDA-graph path's static buffers, batch buckets and padded rows (scratch page), with the
    capture replaced by plain re-execution (no GPU here): same tokens, scratch page only written."""
    from flashdecode.engine.graphs import DecodeGraphs, batch_buckets, eager_capture

    assert batch_buckets(1) == [1] and batch_buckets(5) == [1, 2, 4, 8] and batch_buckets(8)[-1] == 8
    with pytest.raises(ValueError, match="CUDA"):
        LLM(model_dir, device="cpu", num_kv_blocks=8, cuda_graphs=True)
    expected = [o.token_ids for o in LLM(model_dir, device="cpu", page_size=4, num_kv_blocks=256, seed=0,
                                         enable_prefix_caching=False).generate(PROMPTS, GREEDY)]
    llm = LLM(model_dir, device="cpu", page_size=4, num_kv_blocks=40, max_num_batched_tokens=16, seed=0)
    pool = llm.model.new_kv_pool(41, 4)  # page 40: the scratch page
    pool.storage.fill_(float("nan"))  # padded rows must never read anything but their own new key
    llm.pool = llm.runner.pool = pool
    llm.runner.graphs = DecodeGraphs(llm.model, pool, scratch_page=40, max_batch=4, capture=eager_capture)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    graphs = llm.runner.graphs
    assert graphs.replays > 0 and {bs for bs, _ in graphs.graphs} >= {4}
    assert all(w in (1, 2, 4, 8, 16) for _, w in graphs.graphs)
    with pytest.raises(ValueError, match="bucket"):
        graphs.bucket(5)


def _stand_in_graphs(llm, pages: int, max_batch: int = 8):
    """Give ``llm`` decode graphs whose capture is plain re-execution (CPU), over a fresh pool with
    one scratch page (the last); returns the graphs."""
    from flashdecode.engine.graphs import DecodeGraphs, eager_capture

    pool = llm.model.new_kv_pool(pages + 1, llm.page_size)
    pool.storage.fill_(float("nan"))
    llm.pool = llm.runner.pool = pool
    llm.runner.graphs = DecodeGraphs(llm.model, pool, scratch_page=pages, max_batch=max_batch, capture=eager_capture)
    return llm.runner.graphs


def test_decode_steps_launched_ahead_give_the_same_outputs(model_dir):
    """With decode graphs, the engine enqueues step N+1 (fed on the device by step N's tokens)
    before it reads step N's tokens. Requests ending at different steps (length, end of sequence,
    stop string), seeded sampling and a stream must give exactly a plain eager engine's outputs,
    and every page must come back."""
    kwargs = dict(device="cpu", page_size=4, num_kv_blocks=48, max_num_batched_tokens=64, seed=0)
    plain = LLM(model_dir, cuda_graphs=False, **kwargs)
    piped = LLM(model_dir, cuda_graphs=False, **kwargs)
    graphs = _stand_in_graphs(piped, 48)
    launched, chained = [], []
    real_ahead = piped.runner.launch_ahead

    def spy(prev):
        launched.append(real_ahead(prev))
        chained.append(launched[-1] is not None and prev.ahead)
        return launched[-1]

    piped.runner.launch_ahead = spy

    probe = plain.generate(PROMPTS[1], GREEDY)[0].token_ids
    eos = probe[5]  # a token the greedy run meets mid-way, made the end-of-sequence token
    plain.eos_token_ids = piped.eos_token_ids = frozenset({eos})
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (3, 12, 9, 14)] + [
        SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=11)]
    stop = plain.generate(PROMPTS[4], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].text
    params[3] = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, stop=stop.split()[4])
    want = plain.generate(PROMPTS, params)
    got = piped.generate(PROMPTS, params)
    assert [(o.token_ids, o.finish_reason, o.text) for o in got] == \
        [(o.token_ids, o.finish_reason, o.text) for o in want]
    assert {o.finish_reason for o in want} == {"stop", "length"}
    assert sum(a is not None for a in launched) >= 3, "no decode step was launched ahead"
    assert any(chained), "steps launched ahead never chained"
    assert piped.stats.ahead_steps == sum(a is not None for a in launched) and plain.stats.ahead_steps == 0
    assert graphs.replays > sum(a is not None for a in launched)
    assert "".join(piped.stream(PROMPTS[2], params[2])) == want[2].text
    assert piped.allocator.num_used == 0


def test_decode_steps_launched_ahead_under_preemption_and_in_a_chat_session(model_dir):
    """Look-ahead steps when pages run out (the extra page a step launched ahead needs may be
    missing, and requests get preempted), and in a chat session whose pages outlive each turn."""
    expected = [o.token_ids for o in LLM(model_dir, device="cpu", page_size=4, num_kv_blocks=256, seed=0,
                                         enable_prefix_caching=False).generate(PROMPTS, GREEDY)]
    small = LLM(model_dir, device="cpu", page_size=4, num_kv_blocks=14, max_num_seqs=8, seed=0)
    graphs = _stand_in_graphs(small, 14)
    outs = small.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert small.stats.preemptions > 0 and graphs.replays > 0
    assert small.allocator.num_used == 0 and not small._busy

    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    plain = LLM(model_dir, device="cpu", page_size=4, num_kv_blocks=64, seed=0)
    piped = LLM(model_dir, device="cpu", page_size=4, num_kv_blocks=64, seed=0)
    _stand_in_graphs(piped, 64)
    texts = []
    for llm in (plain, piped):
        session = llm.chat_session(system_prompt="w3")
        texts.append(["".join(session.send(m, params)) for m in ("w1 w2", "w4", "w5 w6 w7")])
        session.close()
        assert llm.allocator.num_used == 0
    assert texts[0] == texts[1]


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager_on_the_gpu(model_dir):
    """Graph replay must equal eager execution (GPU only).

    Same engine settings with and without graphs (float32); several batch sizes (buckets with
    padded rows), preemption and chunking included. A padded bucket may pick another split count
    than the eager batch, so logits are compared with a small tolerance, tokens exactly."""
    import torch

    kwargs = dict(device="cuda", dtype="float32", page_size=4, num_kv_blocks=24, max_num_batched_tokens=16,
                  max_num_seqs=8, seed=0)
    eager = LLM(model_dir, cuda_graphs=False, **kwargs)
    graphed = LLM(model_dir, cuda_graphs=True, **kwargs)
    for prompts in (PROMPTS[:1], PROMPTS[:3], PROMPTS):
        want = [o.token_ids for o in eager.generate(prompts, GREEDY)]
        got = [o.token_ids for o in graphed.generate(prompts, GREEDY)]
        assert got == want
    graphs = graphed.runner.graphs
    assert graphs.replays > 0 and len(graphs.graphs) >= 2
    # logits of one replayed step against the eager forward on the same inputs
    seqs_ids = [5, 9, 17]
    lens = [3, 7, 11]
    import numpy as np

    table = np.array([[0, 1, 2, 0], [3, 4, 5, 0], [6, 7, 8, 9]], dtype=np.int32)
    replayed = graphs.run(seqs_ids, lens, table).clone()
    from flashdecode.models import AttentionMetadata

    meta = AttentionMetadata(cache_seqlens=torch.tensor(lens, dtype=torch.int32, device="cuda"),
                             block_table=torch.from_numpy(table).cuda())
    with torch.inference_mode():
        direct = graphed.model(torch.tensor(seqs_ids, device="cuda"), meta, graphed.pool)
    torch.testing.assert_close(replayed, direct, atol=1e-3, rtol=1e-3)
