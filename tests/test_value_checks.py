"""The value checks' kernel (`kernels/value_checks.py`) and their PyTorch form (`validation.py`)
against counts taken by plain Python loops over the same lists, on random inputs where every
check fails for some items and passes for others; and which form the op takes per backend."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_generator
from flashdecode.attention import validation
from flashdecode.attention.kernels import value_checks as vc


def _cu(lens: list[int]) -> list[int]:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def _case(rng: random.Random, batch: int, width: int, clean: bool) -> dict:
    """Random lists (unless ``clean``, each entry bad with some probability) and the bounds of
    one call."""
    page_size, num_pages, capacity = rng.choice([1, 4, 16]), rng.randint(3, 90), rng.randint(10, 200)
    bad = lambda p=0.25: not clean and rng.random() < p  # noqa: E731
    seqlens = [rng.randint(-3, -1) if bad() else rng.randint(0, capacity + (4 if not clean else -3))
               for _ in range(batch)]
    new_lens = [rng.randint(0, 3) for _ in range(batch)]
    q_lens = [rng.randint(0, 4) for _ in range(batch)]
    cu_q, cu_k = _cu(q_lens), _cu(new_lens)
    for cu in (cu_q, cu_k):  # a decreasing step, a wrong start or end now and then
        if batch > 1 and bad(0.3):
            i = rng.randint(1, batch - 1)
            cu[i] = cu[i + 1] + 1
        if bad(0.2):
            cu[0] = 1
        if bad(0.2):
            cu[-1] += 1
    return dict(
        seqlens=seqlens, cu_q=cu_q, cu_k=cu_k,
        leftpad=[rng.randint(-1, max(s, 0) + 1) if bad() else rng.randint(0, max(s, 0)) for s in seqlens],
        rows=rng.randint(1, batch + 3),
        table=[[rng.choice([-1, num_pages, num_pages + 7]) if bad(0.05) else rng.randint(0, num_pages - 1)
                for _ in range(width)] for _ in range(batch)],
        rotary=[rng.choice([rng.randint(-2, -1), rng.randint(45, 60)]) if bad() else rng.randint(0, 40)
                for _ in range(batch)],
        page_size=page_size, num_pages=num_pages, capacity=capacity, total_q=cu_q[-1] + (1 if bad(0.2) else 0),
        total_new=cu_k[-1], max_q=4 if clean else rng.randint(1, 4), rotary_rows=48 if clean else rng.randint(30, 48),
        all_queries=rng.random() < 0.5,
    )


def _expected(c: dict, batch_idx: list[int]) -> list[int]:
    """Failure counts by the definitions, one item at a time."""
    n = [0] * vc.NUM_CHECKS
    for b, seqlen in enumerate(c["seqlens"]):
        new_len = c["cu_k"][b + 1] - c["cu_k"][b]
        q_len = c["cu_q"][b + 1] - c["cu_q"][b]
        end = seqlen + new_len
        n[vc.SEQLENS_NEGATIVE] += seqlen < 0
        n[vc.PAST_CAPACITY] += end > c["capacity"]
        n[vc.LEFTPAD] += not 0 <= c["leftpad"][b] <= seqlen
        n[vc.BATCH_IDX] += not 0 <= batch_idx[b] < c["rows"]
        pages_used = -(-end // c["page_size"]) if end > 0 else 0
        n[vc.TABLE] += sum(not 0 <= p < c["num_pages"] for p in c["table"][b][:pages_used])
        n[vc.CU_Q] += q_len < 0
        n[vc.CU_K] += new_len < 0
        n[vc.MAX_SEQLEN_Q] += q_len > c["max_q"]
        span = max(new_len, q_len if c["all_queries"] else min(q_len, 1))
        n[vc.ROTARY] += c["rotary"][b] + span > c["rotary_rows"] or c["rotary"][b] < 0
    n[vc.CU_Q] += (c["cu_q"][0] != 0) + (c["cu_q"][-1] != c["total_q"])
    n[vc.CU_K] += (c["cu_k"][0] != 0) + (c["cu_k"][-1] != c["total_new"])
    return n


# Batches and table widths on both sides of the kernel's blocks (128 sequences, 32 columns).
@pytest.mark.interpreter
@pytest.mark.parametrize("batch, width", [(1, 1), (5, 3), (130, 70), (129, 33)])
def test_kernel_and_torch_checks_count_what_the_loops_count(batch, width, device):
    rng = random.Random(batch * 1000 + width)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    failed_in, passed_in = set(), set()
    for trial in range(9):
        c = _case(rng, batch, width, clean=trial % 3 == 0)
        batch_idx = [rng.randint(-1, c["rows"]) if trial % 3 and rng.random() < 0.25 else rng.randint(0, c["rows"] - 1)
                     for _ in range(batch)]
        want = _expected(c, batch_idx)
        seqlens, cu_q, cu_k = i32(c["seqlens"]), i32(c["cu_q"]), i32(c["cu_k"])
        leftpad, idx, rotary = i32(c["leftpad"]), i32(batch_idx), i32(c["rotary"])
        # The kernel reads the table through its row stride: give it rows of a wider tensor.
        table = i32([row + [-5] * 3 for row in c["table"]])[:, :width]
        got = vc.failure_counts(
            seqlens, cu_q, cu_k, leftpad, idx, table, rotary, capacity=c["capacity"], rows_available=c["rows"],
            num_pages=c["num_pages"], page_size=c["page_size"], total_q=c["total_q"], total_new=c["total_new"],
            check_cu_q=True, check_cu_k=True, max_seqlen_q=c["max_q"], rotary_rows=c["rotary_rows"],
            rotary_all_queries=c["all_queries"])
        assert got == want, f"trial {trial}: kernel counts {got}, loops {want}"
        k_cache = torch.empty(c["num_pages"], c["page_size"], 1, 1, device=device)
        ok = validation._value_conditions(
            set(range(vc.NUM_CHECKS)), k_cache, seqlens, cu_q, cu_k, idx, leftpad, table, cu_q, cu_k, rotary,
            c["all_queries"], capacity=c["capacity"], rows_available=c["rows"], total_q=c["total_q"],
            total_new=c["total_new"], max_seqlen_q=c["max_q"], rotary_rows=c["rotary_rows"])
        assert [bool(ok[i]) for i in range(vc.NUM_CHECKS)] == [n == 0 for n in want], f"trial {trial}"
        failed_in |= {i for i, n in enumerate(want) if n}
        passed_in |= {i for i, n in enumerate(want) if not n}
    if batch > 1:  # every check both failed and passed in some trial
        assert failed_in == passed_in == set(range(vc.NUM_CHECKS)), (failed_in, passed_in)


@pytest.mark.interpreter
def test_kernel_checks_only_what_it_is_asked(device):
    """Checks not asked for (no left padding, batch index, table, rotary, offsets given) count 0
    whatever the placeholder pointers hold."""
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    seqlens = i32([5, -1, 9])
    got = vc.failure_counts(
        seqlens, i32([0, 9, 9, -4]), i32([0, 1, 2, 3]), None, None, None, None, capacity=8, rows_available=3,
        num_pages=1, page_size=1, total_q=0, total_new=0, check_cu_q=False, check_cu_k=False, max_seqlen_q=None,
        rotary_rows=0, rotary_all_queries=False)
    want = [0] * vc.NUM_CHECKS
    want[vc.SEQLENS_NEGATIVE], want[vc.PAST_CAPACITY] = 1, 1  # -1; 9 + 1 > 8
    assert got == want


def test_op_counts_on_the_device_for_the_triton_backend(backend, device, monkeypatch):
    """The Triton backend runs the checks as the kernel, the reference backend as PyTorch
    expressions; both refuse the same bad call with the same message."""
    import flashdecode

    calls = []
    real = vc.failure_counts
    monkeypatch.setattr(vc, "failure_counts", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    g = make_generator(5)
    q = torch.randn(2, 1, 4, 32, generator=g).to(device)
    k_cache = torch.randn(2, 16, 2, 32, generator=g).to(device)
    v_cache = torch.randn(2, 16, 2, 32, generator=g).to(device)
    flashdecode.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([3, 16], dtype=torch.int32,
                                                                                          device=device))
    with pytest.raises(ValueError, match="passes the cache capacity"):
        flashdecode.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(
            [3, 17], dtype=torch.int32, device=device))
    assert len(calls) == (2 if backend == "triton" else 0)
