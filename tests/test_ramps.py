"""The op's cached constant tensors (`flashdecode.attention.ramps`): values, reuse, the LRU bound,
and CUDA-graph safety (a ramp a graph reads is never freed; one first made during a capture is
never handed to anyone else)."""

import pytest
import torch

from flashdecode.attention import ramps
from tests.conftest import make_generator, randn
from tests.oracle import oracle


@pytest.fixture
def fresh_cache(monkeypatch):
    """Empty ramp caches for one test (the module's state is restored afterwards)."""
    monkeypatch.setattr(ramps, "_recent", type(ramps._recent)())
    monkeypatch.setattr(ramps, "_pinned", {})


@pytest.mark.parametrize("length,step", [(1, 0), (5, 0), (9, 1), (4, 3), (17, 7)])
def test_values(fresh_cache, length, step):
    got = ramps.ramp(length, step, torch.device("cpu"))
    assert got.dtype == torch.int32
    assert got.tolist() == [i * step for i in range(length)]
    assert ramps.offsets(length, step, torch.device("cpu")).tolist() == [i * step for i in range(length + 1)]


def test_reused_and_bounded(fresh_cache, monkeypatch):
    monkeypatch.setattr(ramps, "MAX_CACHED_RAMPS", 3)
    cpu = torch.device("cpu")
    first = ramps.ramp(4, 1, cpu)
    assert ramps.ramp(4, 1, cpu) is first
    for length in (5, 6):
        ramps.ramp(length, 1, cpu)
    assert ramps.ramp(4, 1, cpu) is first  # touched: now the most recent
    ramps.ramp(7, 1, cpu)  # evicts (5, 1), the least recent
    assert len(ramps._recent) == 3
    assert ramps.ramp(4, 1, cpu) is first
    assert (5, 1, cpu) not in ramps._recent


def test_capture_pins_what_it_reuses_and_never_caches_what_it_makes(fresh_cache, monkeypatch):
    """Seen from the cache: `_capturing` stands in for a CUDA-graph capture on the current stream."""
    monkeypatch.setattr(ramps, "MAX_CACHED_RAMPS", 2)
    cpu = torch.device("cpu")
    warm = ramps.ramp(8, 1, cpu)
    monkeypatch.setattr(ramps, "_capturing", lambda device: True)
    assert ramps.ramp(8, 1, cpu) is warm  # made before the capture: reused, and pinned
    during = ramps.ramp(3, 2, cpu)  # first made during the capture: this graph's own
    assert during.tolist() == [0, 2, 4]
    assert ramps.ramp(3, 2, cpu) is not during
    monkeypatch.setattr(ramps, "_capturing", lambda device: False)
    for length in range(20, 30):  # churn the LRU far past its bound
        ramps.ramp(length, 1, cpu)
    assert len(ramps._recent) == 2
    assert ramps.ramp(8, 1, cpu) is warm
    assert (3, 2, cpu) not in ramps._recent and (3, 2, cpu) not in ramps._pinned  # never cached


@pytest.mark.gpu
@pytest.mark.parametrize("warm_up", [True, False])
def test_graph_replay_after_the_cache_churns(fresh_cache, monkeypatch, warm_up):
    """A decode captured in a CUDA graph (with and without an eager warm-up at that batch) replays
    correctly after new lengths are set and the ramp cache has churned past its bound."""
    from flashdecode import flash_attn_with_kvcache

    monkeypatch.setattr(ramps, "MAX_CACHED_RAMPS", 4)
    g = make_generator(23)
    batch, heads, kv_heads, dim, capacity = 5, 8, 2, 64, 96
    q = randn(g, batch, 1, heads, dim, device="cuda", dtype=torch.float16)
    k_cache = randn(g, batch, capacity, kv_heads, dim, device="cuda", dtype=torch.float16)
    v_cache = randn(g, batch, capacity, kv_heads, dim, device="cuda", dtype=torch.float16)
    k_new = randn(g, batch, 1, kv_heads, dim, device="cuda", dtype=torch.float16)
    v_new = randn(g, batch, 1, kv_heads, dim, device="cuda", dtype=torch.float16)
    lens = torch.tensor([3, 40, 0, 95, 17], dtype=torch.int32, device="cuda")

    def step():
        return flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=lens, causal=True)

    if warm_up:
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    out = torch.full((batch, 1, heads, dim), float("nan"), dtype=torch.float16, device="cuda")
    with torch.cuda.graph(graph):
        out.copy_(step())
    for length in range(1, 40):  # eager calls of other batch sizes churn the cache
        ramps.ramp(length, 1, q.device)
        ramps.ramp(length, 0, q.device)
    torch.cuda.synchronize()

    new_lens = torch.randint(0, capacity, (batch,), generator=g, dtype=torch.int32)
    lens.copy_(new_lens)
    expected = oracle(q, k_cache.clone(), v_cache.clone(), k=k_new, v=v_new, cache_seqlens=new_lens, causal=True)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.double().cpu(), expected.out.cpu(), atol=2e-3, rtol=2e-3)
