"""Bad inputs raise ValueError/TypeError naming the argument, before anything is written.

Each case starts from a valid call (contiguous or paged), breaks one thing, and checks the
exception type, that the message names the argument, and that both caches are bit-identical
afterwards. Where the bad value concerns only the last sequence, a writer that appended sequence
by sequence before checking would be caught too.
"""

from __future__ import annotations

import re

import pytest
import torch

from conftest import make_generator, set_backend

B, SQ, H, HK, D = 2, 1, 4, 2, 32
S_CACHE = 16
NUM_BLOCKS, PAGE, MAX_BLOCKS = 8, 4, 3
DT = torch.float16


def _op():
    from flashdecode import flash_attn_with_kvcache

    return flash_attn_with_kvcache


def base_call(device, paged: bool = False, seed: int = 0) -> dict:
    g = make_generator(seed)

    def rn(*shape, dtype=DT):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    kw = dict(q=rn(B, SQ, H, D), k=rn(B, 1, HK, D), v=rn(B, 1, HK, D),
              cache_seqlens=torch.tensor([3, 5], dtype=torch.int32, device=device))
    if paged:
        kw["k_cache"] = rn(NUM_BLOCKS, PAGE, HK, D)
        kw["v_cache"] = rn(NUM_BLOCKS, PAGE, HK, D)
        kw["block_table"] = torch.randperm(NUM_BLOCKS, generator=g)[: B * MAX_BLOCKS].view(B, MAX_BLOCKS).to(
            torch.int32).to(device)
    else:
        kw["k_cache"] = rn(B, S_CACHE, HK, D)
        kw["v_cache"] = rn(B, S_CACHE, HK, D)
    return kw


def _rot(device, rows=32, half=D // 4, dtype=DT):
    ang = torch.randn(rows, half, generator=make_generator(3))
    return ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)


def i32(vals, device):
    return torch.tensor(vals, dtype=torch.int32, device=device)


# Each entry: (id, paged, mutate(kw, device) -> kw, exception types, names one of which the message must contain)
VE, TE = (ValueError,), (TypeError, ValueError)
CASES = []


def case(id_, exc, names, paged=False):
    def deco(fn):
        CASES.append(pytest.param(paged, fn, exc, names, id=id_))
        return fn

    return deco


@case("heads_not_divisible", VE, ("q", "k_cache", "head"))
def _(kw, dev):
    kw["q"] = torch.randn(B, SQ, 3, D).to(DT).to(dev)
    return kw


@case("q_headdim_vs_cache", VE, ("q", "k_cache"))
def _(kw, dev):
    kw["q"] = torch.randn(B, SQ, H, D // 2).to(DT).to(dev)
    return kw


@case("v_cache_headdim", VE, ("v_cache",))
def _(kw, dev):
    kw["v_cache"] = torch.randn(B, S_CACHE, HK, D // 2).to(DT).to(dev)
    return kw


@case("k_cache_v_cache_shape", VE, ("v_cache", "k_cache"))
def _(kw, dev):
    kw["v_cache"] = torch.randn(B, S_CACHE - 1, HK, D).to(DT).to(dev)
    return kw


@case("new_k_headdim", VE, ("k",))
def _(kw, dev):
    kw["k"] = torch.randn(B, 1, HK, D // 2).to(DT).to(dev)
    kw["v"] = torch.randn(B, 1, HK, D // 2).to(DT).to(dev)
    return kw


@case("new_k_heads", VE, ("k",))
def _(kw, dev):
    kw["k"] = torch.randn(B, 1, HK + 1, D).to(DT).to(dev)
    kw["v"] = torch.randn(B, 1, HK + 1, D).to(DT).to(dev)
    return kw


@case("new_k_batch", VE, ("k",))
def _(kw, dev):
    kw["k"] = torch.randn(B + 1, 1, HK, D).to(DT).to(dev)
    kw["v"] = torch.randn(B + 1, 1, HK, D).to(DT).to(dev)
    return kw


@case("new_v_shape_vs_k", VE, ("v",))
def _(kw, dev):
    kw["v"] = torch.randn(B, 2, HK, D).to(DT).to(dev)
    return kw


@case("q_dtype_vs_cache", TE, ("q", "k_cache"))
def _(kw, dev):
    kw["q"] = kw["q"].float()
    return kw


@case("v_cache_dtype", TE, ("v_cache",))
def _(kw, dev):
    kw["v_cache"] = kw["v_cache"].to(torch.bfloat16)
    return kw


@case("new_k_dtype", TE, ("k",))
def _(kw, dev):
    kw["k"] = kw["k"].float()
    return kw


@case("new_v_dtype", TE, ("v",))
def _(kw, dev):
    kw["v"] = kw["v"].to(torch.bfloat16)
    return kw


@case("k_without_v", VE, ("v",))
def _(kw, dev):
    kw["v"] = None
    return kw


@case("v_without_k", VE, ("k", "v"))
def _(kw, dev):
    kw["k"] = None
    return kw


@case("k_without_cache_seqlens", VE, ("cache_seqlens",))
def _(kw, dev):
    kw["cache_seqlens"] = None
    return kw


@case("rotary_without_k", VE, ("rotary_cos", "k"))
def _(kw, dev):
    kw["k"] = kw["v"] = None
    kw["rotary_cos"], kw["rotary_sin"] = _rot(dev)
    return kw


@case("rotary_cos_without_sin", VE, ("rotary_sin", "rotary_cos"))
def _(kw, dev):
    kw["rotary_cos"], _s = _rot(dev)
    return kw


@case("rotary_sin_shape_vs_cos", VE, ("rotary_sin", "rotary_cos"))
def _(kw, dev):
    kw["rotary_cos"], _s = _rot(dev)
    _c, kw["rotary_sin"] = _rot(dev, half=D // 4 - 1)
    return kw


@case("rotary_table_rank", VE, ("rotary_cos",))
def _(kw, dev):
    c, s = _rot(dev)
    kw["rotary_cos"], kw["rotary_sin"] = c.reshape(-1), s.reshape(-1)
    return kw


@case("rotary_dim_gt_headdim", VE, ("rotary_cos", "rotary_dim"))
def _(kw, dev):
    kw["rotary_cos"], kw["rotary_sin"] = _rot(dev, half=D // 2 + 4)
    return kw


@case("rotary_table_too_short", VE, ("rotary_cos", "rotary"))
def _(kw, dev):
    kw["rotary_cos"], kw["rotary_sin"] = _rot(dev, rows=4)  # positions 3 and 5 need rows 3..5
    return kw


@case("rotary_dtype", TE, ("rotary_cos",))
def _(kw, dev):
    c, s = _rot(dev)
    kw["rotary_cos"], kw["rotary_sin"] = c.to(torch.int32), s.to(torch.int32)
    return kw


@case("cache_seqlens_float", TE, ("cache_seqlens",))
def _(kw, dev):
    kw["cache_seqlens"] = kw["cache_seqlens"].float()
    return kw


@case("cache_seqlens_int64", TE, ("cache_seqlens",))
def _(kw, dev):
    kw["cache_seqlens"] = kw["cache_seqlens"].long()
    return kw


@case("cache_seqlens_shape", VE, ("cache_seqlens",))
def _(kw, dev):
    kw["cache_seqlens"] = i32([3, 5, 1], dev)
    return kw


@case("cache_seqlens_2d", VE, ("cache_seqlens",))
def _(kw, dev):
    kw["cache_seqlens"] = i32([[3, 5]], dev)
    return kw


@case("cache_seqlens_negative", VE, ("cache_seqlens",))
def _(kw, dev):
    kw["cache_seqlens"] = i32([3, -1], dev)  # the append would write slot -1
    return kw


@case("cache_seqlens_wrong_type", TE, ("cache_seqlens",))
def _(kw, dev):
    kw["cache_seqlens"] = [3, 5]
    return kw


@case("cache_leftpad_dtype", TE, ("cache_leftpad",))
def _(kw, dev):
    kw["cache_leftpad"] = torch.tensor([0.0, 1.0], device=dev)
    return kw


@case("cache_leftpad_shape", VE, ("cache_leftpad",))
def _(kw, dev):
    kw["cache_leftpad"] = i32([0, 1, 0], dev)
    return kw


@case("cache_batch_idx_dtype", TE, ("cache_batch_idx",))
def _(kw, dev):
    kw["cache_batch_idx"] = torch.tensor([1.0, 0.0], device=dev)
    return kw


@case("cache_batch_idx_shape", VE, ("cache_batch_idx",))
def _(kw, dev):
    kw["cache_batch_idx"] = i32([1, 0, 0], dev)
    return kw


@case("cache_batch_idx_out_of_rows", VE, ("cache_batch_idx",))
def _(kw, dev):
    kw["cache_batch_idx"] = i32([0, S_CACHE], dev)
    return kw


@case("cache_batch_idx_negative", VE, ("cache_batch_idx",))
def _(kw, dev):
    kw["cache_batch_idx"] = i32([0, -1], dev)
    return kw


@case("cache_batch_idx_out_of_block_table_rows", VE, ("cache_batch_idx",), paged=True)
def _(kw, dev):
    kw["cache_batch_idx"] = i32([0, B], dev)
    return kw


@case("block_table_dtype_float", TE, ("block_table",), paged=True)
def _(kw, dev):
    kw["block_table"] = kw["block_table"].float()
    return kw


@case("block_table_dtype_int64", TE, ("block_table",), paged=True)
def _(kw, dev):
    kw["block_table"] = kw["block_table"].long()
    return kw


@case("block_table_1d", VE, ("block_table",), paged=True)
def _(kw, dev):
    kw["block_table"] = kw["block_table"].reshape(-1)
    return kw


@case("block_table_rows_vs_batch", VE, ("block_table",), paged=True)
def _(kw, dev):
    kw["block_table"] = kw["block_table"][:1]
    return kw


@case("block_table_entry_outside_pool", VE, ("block_table",), paged=True)
def _(kw, dev):
    bt = kw["block_table"].clone()
    bt[1, 1] = NUM_BLOCKS  # slot 5 of sequence 1 (page 1) is read and page 1 written by the append
    kw["block_table"] = bt
    return kw


@case("block_table_entry_negative", VE, ("block_table",), paged=True)
def _(kw, dev):
    bt = kw["block_table"].clone()
    bt[1, 0] = -1
    kw["block_table"] = bt
    return kw


@case("append_beyond_capacity_contiguous", VE, ("cache_seqlens", "k", "k_cache", "capacity"))
def _(kw, dev):
    kw["cache_seqlens"] = i32([3, S_CACHE], dev)  # sequence 1 would write slot S_CACHE
    return kw


@case("append_beyond_capacity_contiguous_int", VE, ("cache_seqlens", "k", "k_cache", "capacity"))
def _(kw, dev):
    kw["cache_seqlens"] = S_CACHE - 1
    kw["k"] = torch.randn(B, 2, HK, D).to(DT).to(dev)
    kw["v"] = torch.randn(B, 2, HK, D).to(DT).to(dev)
    return kw


@case("append_beyond_capacity_paged", VE, ("cache_seqlens", "k", "block_table", "capacity"), paged=True)
def _(kw, dev):
    kw["cache_seqlens"] = i32([3, MAX_BLOCKS * PAGE], dev)
    return kw


@case("append_beyond_capacity_packed", VE, ("cache_seqlens", "k", "cu_seqlens_k_new", "capacity"))
def _(kw, dev):
    kw["k"] = torch.randn(5, HK, D).to(DT).to(dev)
    kw["v"] = torch.randn(5, HK, D).to(DT).to(dev)
    kw["cu_seqlens_k_new"] = i32([0, 1, 5], dev)
    kw["cache_seqlens"] = i32([3, S_CACHE - 3], dev)  # sequence 1: 13 + 4 > 16
    return kw


@case("cache_seqlens_beyond_capacity", VE, ("cache_seqlens", "capacity"))
def _(kw, dev):
    kw["k"] = kw["v"] = None
    kw["cache_seqlens"] = i32([3, S_CACHE + 1], dev)
    return kw


@case("alibi_shape", VE, ("alibi_slopes",))
def _(kw, dev):
    kw["alibi_slopes"] = torch.rand(H + 1, device=dev)
    return kw


@case("alibi_shape_batch", VE, ("alibi_slopes",))
def _(kw, dev):
    kw["alibi_slopes"] = torch.rand(B + 1, H, device=dev)
    return kw


@case("alibi_dtype", TE, ("alibi_slopes",))
def _(kw, dev):
    kw["alibi_slopes"] = torch.rand(H, device=dev).to(torch.float16)
    return kw


@case("q_rank_3_without_cu_seqlens_q", VE, ("q",))
def _(kw, dev):
    kw["q"] = kw["q"][:, 0]
    return kw


@case("q_rank_5", VE, ("q",))
def _(kw, dev):
    kw["q"] = kw["q"][None]
    return kw


@case("q_rank_4_with_cu_seqlens_q", VE, ("q", "cu_seqlens_q"))
def _(kw, dev):
    kw["cu_seqlens_q"] = i32([0, 1, 2], dev)
    kw["max_seqlen_q"] = 1
    return kw


@case("cu_seqlens_q_total_mismatch", VE, ("cu_seqlens_q", "q"))
def _(kw, dev):
    kw["q"] = kw["q"].reshape(B * SQ, H, D)
    kw["cu_seqlens_q"] = i32([0, 1, 3], dev)
    kw["max_seqlen_q"] = 2
    return kw


@case("cu_seqlens_q_dtype", TE, ("cu_seqlens_q",))
def _(kw, dev):
    kw["q"] = kw["q"].reshape(B * SQ, H, D)
    kw["cu_seqlens_q"] = torch.tensor([0.0, 1.0, 2.0], device=dev)
    return kw


@case("cu_seqlens_k_new_with_padded_k", VE, ("k", "cu_seqlens_k_new"))
def _(kw, dev):
    kw["cu_seqlens_k_new"] = i32([0, 1, 2], dev)
    return kw


@case("q_not_a_tensor", TE, ("q",))
def _(kw, dev):
    kw["q"] = kw["q"].tolist()
    return kw


@case("k_cache_rank", VE, ("k_cache",))
def _(kw, dev):
    kw["k_cache"] = kw["k_cache"][0]
    kw["v_cache"] = kw["v_cache"][0]
    return kw


@case("rotary_seqlens_shape", VE, ("rotary_seqlens",))
def _(kw, dev):
    kw["rotary_cos"], kw["rotary_sin"] = _rot(dev)
    kw["rotary_seqlens"] = i32([1, 2, 3], dev)
    return kw


def names_argument(msg: str, name: str) -> bool:
    """`name` appears as a whole identifier ("k" must not match inside "k_cache")."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg) is not None


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("paged, mutate, exc, names", CASES)
def test_bad_input_raises_and_writes_nothing(paged, mutate, exc, names, backend, device):
    kw = base_call(device, paged=paged)
    kw = mutate(kw, device)
    k_before, v_before = kw["k_cache"].clone(), kw["v_cache"].clone()
    with pytest.raises(exc) as info:
        _op()(**kw)
    msg = str(info.value)
    assert any(names_argument(msg, n) for n in names), f"message does not name any of {names}: {msg!r}"
    assert torch.equal(_bits(kw["k_cache"]), _bits(k_before)), "k_cache modified by a refused call"
    assert torch.equal(_bits(kw["v_cache"]), _bits(v_before)), "v_cache modified by a refused call"


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_base_call_is_valid(paged, backend, device):
    """The starting point of every bad-input case is itself accepted (so each error is the mutation's)."""
    kw = base_call(device, paged=paged)
    out = _op()(**kw)
    assert out.shape == kw["q"].shape


def test_unknown_backend_env(device, monkeypatch):
    kw = base_call(device)
    k_before, v_before = kw["k_cache"].clone(), kw["v_cache"].clone()
    set_backend(monkeypatch, "bogus")
    with pytest.raises(ValueError, match="FLASHDECODE_BACKEND"):
        _op()(**kw)
    assert torch.equal(_bits(kw["k_cache"]), _bits(k_before))
    assert torch.equal(_bits(kw["v_cache"]), _bits(v_before))


# ---- torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_runs_and_mutates_cache(compile_backend, device, monkeypatch):
    set_backend(monkeypatch, "reference" if device.type == "cpu" else "auto")
    torch._dynamo.reset()
    op = _op()
    kw = base_call(device, seed=11)
    kw = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    eager_k, eager_v = kw["k_cache"].clone(), kw["v_cache"].clone()
    comp_k, comp_v = kw["k_cache"].clone(), kw["v_cache"].clone()
    before_k = kw["k_cache"].clone()

    def step(q, k_cache, v_cache, k, v, cache_seqlens):
        out = op(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True)
        return out * 2.0

    ref = step(kw["q"], eager_k, eager_v, kw["k"], kw["v"], kw["cache_seqlens"])
    compiled = torch.compile(step, backend=compile_backend)
    got = compiled(kw["q"], comp_k, comp_v, kw["k"], kw["v"], kw["cache_seqlens"])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(comp_k, before_k), "the compiled call did not update k_cache"
    assert torch.equal(comp_k, eager_k), "compiled k_cache differs from eager"
    assert torch.equal(comp_v, eager_v), "compiled v_cache differs from eager"
    # a second call with advanced lengths (no recompilation needed for new tensor values)
    seqlens2 = kw["cache_seqlens"] + 1
    ref2 = step(kw["q"], eager_k, eager_v, kw["k"], kw["v"], seqlens2)
    got2 = compiled(kw["q"], comp_k, comp_v, kw["k"], kw["v"], seqlens2)
    torch.testing.assert_close(got2, ref2, rtol=1e-5, atol=1e-5)
    assert torch.equal(comp_k, eager_k) and torch.equal(comp_v, eager_v)
