"""Tests of the Triton kernels (`kernels/launch.py`) and of `merge_attention_states`.

On a CPU machine the kernels run in the Triton interpreter (conftest sets ``TRITON_INTERPRET=1``
before Triton is imported); shapes are tiny. With ``FLASHDECODE_TEST_DEVICE=cuda`` the same tests
run the compiled kernels, and the ``gpu`` tests (CUDA graphs, >2^31-element caches) run too.

Expected values come from a float64 brute force written here from the op contract, not from the
code under test.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import pytest
import torch

from flashdecode.attention.merge import merge_attention_states
from flashdecode.attention.problem import PackedProblem

TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 1e-2)}  # (out, lse) atol


def _launch():
    from flashdecode.attention.kernels import launch

    return launch


# ---- building problems ---------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    name: str
    q_lens: tuple[int, ...]
    cache_lens: tuple[int, ...]  # absolute end slot of the existing cache, per sequence
    new_lens: tuple[int, ...]
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    dtype: torch.dtype = torch.float16
    page_size: int = 16
    max_pages: int = 4
    extra_pages: int = 3  # unused pages in the pool
    contiguous: bool = False  # one page per sequence (page_size = S_cache), as the op packs it
    leftpad: tuple[int, ...] | None = None
    rotary_frac: float = 0.0
    interleaved: bool = True
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    splits: tuple[int, ...] = (1, 2, 5)

    @property
    def batch(self) -> int:
        return len(self.q_lens)


def _randn(g: torch.Generator, *shape, dtype=torch.float32, device="cpu", scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def build(spec: Spec, device, seed: int = 0) -> PackedProblem:
    g = torch.Generator().manual_seed(seed)
    B, H, Hk, D, dt = spec.batch, spec.heads, spec.kv_heads, spec.head_dim, spec.dtype
    page_size = spec.page_size
    if spec.contiguous:
        # A contiguous cache (B_cache, S_cache, Hk, D) is a pool of B_cache pages; the table picks
        # rows in a shuffled order (cache_batch_idx).
        max_pages, num_pages = 1, B + spec.extra_pages
    else:
        max_pages, num_pages = spec.max_pages, B * spec.max_pages + spec.extra_pages
    perm = torch.randperm(num_pages, generator=g)
    table = perm[: B * max_pages].reshape(B, max_pages).to(torch.int32)
    # Strided pool views: the page axis of the underlying storage is padded.
    k_store = _randn(g, num_pages, page_size, Hk, D + 8, dtype=dt, device=device)
    v_store = _randn(g, num_pages, page_size, Hk, D + 8, dtype=dt, device=device)
    k_pages, v_pages = k_store[..., :D], v_store[..., :D]

    cu_q = torch.tensor([0, *torch.tensor(spec.q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(spec.new_lens).cumsum(0).tolist()], dtype=torch.int32)
    total_q, total_new = int(cu_q[-1]), int(cu_k[-1])
    q = _randn(g, total_q, H, D, dtype=dt, device=device)
    k_new = _randn(g, total_new, Hk, D, dtype=dt, device=device) if any(spec.new_lens) else None
    v_new = _randn(g, total_new, Hk, D, dtype=dt, device=device) if any(spec.new_lens) else None
    rd = 2 * int(spec.rotary_frac * D / 2)
    cos = sin = None
    if rd and k_new is not None:
        theta = torch.rand(max(spec.cache_lens) + max(spec.q_lens) + max(spec.new_lens) + 4, rd // 2, generator=g) * 6.3
        cos, sin = theta.cos().to(dt).to(device), theta.sin().to(dt).to(device)
    leftpad = spec.leftpad or (0,) * B
    rotary_seqlens = torch.tensor(spec.cache_lens, dtype=torch.int32) + 1  # differs from cache_seqlens
    alibi = (torch.rand(B, H, generator=g) * 0.3).to(device) if spec.alibi else None
    i32 = dict(dtype=torch.int32, device=device)
    return PackedProblem(
        q=q, k_pages=k_pages, v_pages=v_pages, block_table=table.to(device),
        cu_seqlens_q=cu_q.to(device), max_seqlen_q=max(spec.q_lens),
        cache_seqlens=torch.tensor(spec.cache_lens, **i32), cache_leftpad=torch.tensor(leftpad, **i32),
        k_new=k_new, v_new=v_new, cu_seqlens_k_new=cu_k.to(device), max_seqlen_k_new=max(spec.new_lens),
        rotary_cos=cos, rotary_sin=sin, rotary_interleaved=spec.interleaved,
        rotary_seqlens=rotary_seqlens.to(device), softmax_scale=D**-0.5 * 1.3, causal=spec.causal,
        window_left=spec.window[0], window_right=0 if spec.causal else spec.window[1],
        softcap=spec.softcap, alibi_slopes=alibi, num_splits=1,
    )


def with_fresh_cache(p: PackedProblem, num_splits: int) -> PackedProblem:
    """A copy of `p` with its own cache pages (the op appends in place), same strides."""
    k = torch.empty_strided(p.k_pages.shape, p.k_pages.stride(), dtype=p.k_pages.dtype, device=p.k_pages.device)
    v = torch.empty_strided(p.v_pages.shape, p.v_pages.stride(), dtype=p.v_pages.dtype, device=p.v_pages.device)
    k.copy_(p.k_pages)
    v.copy_(p.v_pages)
    return dataclasses.replace(p, k_pages=k, v_pages=v, num_splits=num_splits)


def run_triton(p: PackedProblem, num_splits: int):
    p = with_fresh_cache(p, num_splits)
    total_q, H, D = p.q.shape
    out = torch.full((total_q, H, D), float("nan"), dtype=p.q.dtype, device=p.q.device)
    lse = torch.full((H, total_q), float("nan"), dtype=torch.float32, device=p.q.device)
    _launch().triton_forward(p, out, lse)
    return out, lse, p.k_pages, p.v_pages


# ---- independent float64 brute force -------------------------------------------------------


def _rotate64(x: torch.Tensor, cos_row: torch.Tensor, sin_row: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (..., D) float64 rotated by one table row; explicit channel pairs."""
    y = x.clone()
    half = cos_row.shape[0]
    for c in range(half):
        a, b = (2 * c, 2 * c + 1) if interleaved else (c, c + half)
        y[..., a] = x[..., a] * cos_row[c] - x[..., b] * sin_row[c]
        y[..., b] = x[..., a] * sin_row[c] + x[..., b] * cos_row[c]
    return y


def brute_force(p: PackedProblem):
    """(out (total_q, H, D), lse (H, total_q), k_pages, v_pages) in float64 after the append."""
    kp = p.k_pages.detach().cpu().double().clone()
    vp = p.v_pages.detach().cpu().double().clone()
    q_all = p.q.detach().cpu().double()
    total_q, H, D = q_all.shape
    Hk = kp.shape[2]
    ps = kp.shape[1]
    table = p.block_table.cpu().tolist()
    cu_q, cu_k = p.cu_seqlens_q.cpu().tolist(), p.cu_seqlens_k_new.cpu().tolist()
    lens, lefts, rot0 = p.cache_seqlens.cpu().tolist(), p.cache_leftpad.cpu().tolist(), p.rotary_seqlens.cpu().tolist()
    cos = None if p.rotary_cos is None else p.rotary_cos.cpu().double()
    sin = None if p.rotary_sin is None else p.rotary_sin.cpu().double()

    def where(b, t):
        return table[b][t // ps], t % ps

    for b in range(p.batch):
        for j in range(cu_k[b + 1] - cu_k[b]):
            k = p.k_new[cu_k[b] + j].cpu().double()
            if cos is not None:
                k = _rotate64(k, cos[rot0[b] + j], sin[rot0[b] + j], p.rotary_interleaved)
            page, off = where(b, lens[b] + j)
            kp[page, off] = k
            vp[page, off] = p.v_new[cu_k[b] + j].cpu().double()

    out = torch.zeros(total_q, H, D, dtype=torch.float64)
    lse = torch.full((H, total_q), math.inf, dtype=torch.float64)
    group = H // Hk
    for b in range(p.batch):
        sq = cu_q[b + 1] - cu_q[b]
        end = lens[b] + cu_k[b + 1] - cu_k[b]
        sk = end - lefts[b]
        slots = list(range(lefts[b], end))
        if not slots:
            continue
        keys = torch.stack([kp[where(b, t)] for t in slots])  # (sk, Hk, D)
        vals = torch.stack([vp[where(b, t)] for t in slots])
        for i in range(sq):
            qi = q_all[cu_q[b] + i]
            if cos is not None:
                r = rot0[b] + (i if (p.causal or p.local) else 0)
                qi = _rotate64(qi, cos[r], sin[r], p.rotary_interleaved)
            for h in range(H):
                kh = h // group
                s = (keys[:, kh] @ qi[h]) * p.softmax_scale
                if p.softcap > 0:
                    s = p.softcap * torch.tanh(s / p.softcap)
                j = torch.arange(sk, dtype=torch.float64)
                if p.alibi_slopes is not None:
                    s = s - float(p.alibi_slopes[b, h]) * (i + sk - sq - j).abs()
                ok = torch.ones(sk, dtype=torch.bool)
                if p.window_right >= 0:
                    ok &= j <= i + sk - sq + p.window_right
                if p.window_left >= 0:
                    ok &= j >= i + sk - sq - p.window_left
                if not ok.any():
                    continue
                s = s[ok]
                m = s.max()
                w = torch.exp(s - m)
                out[cu_q[b] + i, h] = (w[:, None] * vals[:, kh][ok]).sum(0) / w.sum()
                lse[h, cu_q[b] + i] = m + torch.log(w.sum())
    return out, lse, kp, vp


def assert_close_attention(out, lse, want_out, want_lse, dt, what=""):
    atol_o, atol_l = TOL[dt]
    out, lse = out.detach().cpu(), lse.detach().cpu()
    assert not out.isnan().any(), f"{what}: NaN in out (unwritten rows?)"
    assert not lse.isnan().any(), f"{what}: NaN in lse"
    empty = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(lse) & (lse > 0), empty), f"{what}: +inf lse rows differ"
    assert (out.double()[empty.T] == 0).all(), f"{what}: rows with no key must be 0"
    err_o = (out.double() - want_out).abs().max().item()
    err_l = (lse.double() - want_lse).masked_fill(empty, 0).abs().max().item()
    assert err_o <= atol_o, f"{what}: out error {err_o} > {atol_o}"
    assert err_l <= atol_l, f"{what}: lse error {err_l} > {atol_l}"


# ---- interpreter-sized cases ---------------------------------------------------------------

SPECS = [
    # Decode, GQA 4:1, page 3 (tiles straddle pages), D=80 padded to 128, append with rotary on
    # half the channels, causal, bf16.
    Spec("decode-gqa-page3-d80-rot", q_lens=(1, 1, 1), cache_lens=(7, 0, 150), new_lens=(1, 1, 1), heads=8, kv_heads=2,
         head_dim=80, dtype=torch.bfloat16, page_size=3, max_pages=60, rotary_frac=0.5, causal=True),
    # Speculative decoding, MQA, varlen queries incl. an empty sequence, rows with no visible key
    # (Sq > Sk under causal), page aligned to the key tile (one block-table read per tile).
    Spec("spec-mqa-varlen-aligned", q_lens=(3, 0, 2, 4), cache_lens=(300, 5, 170, 1), new_lens=(0, 0, 0, 0), heads=4,
         kv_heads=1, head_dim=32, page_size=128, max_pages=4, causal=True),
    # Contiguous cache (one page per sequence, shuffled rows), leftpad, ALiBi, local window, fp32.
    Spec("contig-leftpad-alibi-window-fp32", q_lens=(2, 3), cache_lens=(140, 133), new_lens=(2, 1), heads=4, kv_heads=2,
         head_dim=16, dtype=torch.float32, page_size=200, contiguous=True, leftpad=(5, 70), alibi=True, window=(90, 1),
         rotary_frac=1.0, interleaved=False),
    # Softcap, non-interleaved full rotary, several new keys, left window only, non-causal.
    Spec("softcap-rot-noninterleaved", q_lens=(2, 1), cache_lens=(200, 290), new_lens=(3, 2), heads=6, kv_heads=3,
         head_dim=64, dtype=torch.bfloat16, page_size=16, max_pages=20, rotary_frac=1.0, interleaved=False,
         softcap=3.0, window=(250, -1)),
    # Chunked prefill: many query rows (several M tiles), causal, keys partly in the cache, tiles
    # fully masked for early rows are skipped.
    Spec("prefill-causal-multitile", q_lens=(70, 9), cache_lens=(12, 0), new_lens=(70, 9), heads=2, kv_heads=1,
         head_dim=16, page_size=64, max_pages=3, causal=True, splits=(1, 3)),
    # Sliding-window prefill over tiles of 64 query positions: the window's left edge moves across
    # each M tile, some key tiles are fully visible (unmasked), some not.
    Spec("prefill-sliding-window", q_lens=(150,), cache_lens=(100,), new_lens=(150,), heads=2, kv_heads=1,
         head_dim=16, page_size=32, max_pages=8, causal=True, window=(200, 0), splits=(1, 2)),
]


# Not marked `interpreter`, so that they also run compiled on the GPU: Triton passes an integer
# argument equal to 1 as a constant, so a contiguous cache of one sequence (one page in the pool,
# one table column) and a single KV head compile to their own variants. (A page clamp that called
# `.to` on num_pages - 1 compiled for every batch but 1, 2026-11-28.)
ONE_SEQUENCE_SPECS = [
    Spec("one-sequence-contiguous-mqa-decode", q_lens=(1,), cache_lens=(900,), new_lens=(1,), heads=8, kv_heads=1,
         head_dim=128, dtype=torch.bfloat16, page_size=1024, contiguous=True, extra_pages=0, rotary_frac=1.0,
         causal=True, splits=(1, 0, 3)),
    Spec("one-sequence-contiguous-prefill", q_lens=(200,), cache_lens=(60,), new_lens=(200,), heads=4, kv_heads=2,
         head_dim=64, dtype=torch.bfloat16, page_size=512, contiguous=True, extra_pages=0, causal=True,
         splits=(1, 2)),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_kernels_match_brute_force_for_every_split_count(spec, device):
    """Every split count of each case against the float64 brute force, and against each other."""
    check_every_split_count(spec, device)


@pytest.mark.parametrize("spec", ONE_SEQUENCE_SPECS, ids=lambda s: s.name)
def test_one_sequence_and_one_kv_head_match_brute_force(spec, device):
    check_every_split_count(spec, device)


def check_every_split_count(spec: Spec, device) -> None:
    p = build(spec, device)
    want_out, want_lse, want_k, want_v = brute_force(p)
    results = {}
    for n in spec.splits:
        if n > 1:  # the case is big enough for the split count to take effect
            assert _launch()._plan(dataclasses.replace(p, num_splits=n))[2] > 1
        out, lse, kc, vc = run_triton(p, n)
        assert_close_attention(out, lse, want_out, want_lse, spec.dtype, f"{spec.name} splits={n}")
        results[n] = (out, lse)
        # The cache after the append: v bit-exact, k the rotated key rounded once, and nothing
        # else touched.
        assert torch.equal(vc.cpu().double(), want_v), "v cache differs"
        k_err = (kc.cpu().double() - want_k).abs()
        k_tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[spec.dtype]
        assert (k_err <= k_tol * want_k.abs().clamp(min=1)).all(), f"k cache error {k_err.max().item()}"
        written = (want_k != p.k_pages.cpu().double()).any(-1).any(-1)
        assert torch.equal(kc.cpu()[~written], p.k_pages.cpu()[~written]), "slots outside the append changed"
    # Split counts agree with each other within rounding of the output dtype.
    for got in results.values():
        assert_agree_within_rounding(got, results[spec.splits[0]], spec.dtype)


def assert_agree_within_rounding(got, base, dt) -> None:
    """Two kernel results ``(out, lse)`` of one problem that sum in different orders."""
    (out, lse), (base_out, base_lse) = got, base
    fin = torch.isfinite(base_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert ((lse - base_lse)[fin].abs() <= 1e-4).all()
    assert (out.float() - base_out.float()).abs().max().item() <= 2 * TOL[dt][0]


def spied_spec_problem(name: str, device, monkeypatch, seed: int):
    """(launch module, attention-kernel spy, spec, problem, want_out, want_lse) for a case of SPECS."""
    launch = _launch()
    spy = _spy_on_triton_kernel(launch, monkeypatch)
    spec = next(s for s in SPECS if s.name == name)
    p = build(spec, device, seed=seed)
    want_out, want_lse, _, _ = brute_force(p)
    return launch, spy, spec, p, want_out, want_lse


# ---- key addresses: unsigned 32-bit products or 64-bit products (OFFSETS_32) ----------------


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["decode-gqa-page3-d80-rot", "spec-mqa-varlen-aligned", "contig-leftpad-alibi-window-fp32"])
def test_32_and_64_bit_key_offsets_match_brute_force(name, device, monkeypatch):
    """Both address paths equal the float64 brute force and each other bit for bit (paged with
    pages straddling tiles, paged with tile-aligned pages, contiguous); the launcher picks the
    32-bit one for these small caches."""
    launch, spy, spec, p, want_out, want_lse = spied_spec_problem(name, device, monkeypatch, seed=5)
    got = {}
    for wide in (True, False):
        if not wide:
            monkeypatch.setattr(launch, "offsets_32", lambda k_pages, v_pages: False)
        out, lse, _, _ = run_triton(p, spec.splits[-1])
        assert spy.calls[-1]["OFFSETS_32"] is wide
        assert_close_attention(out, lse, want_out, want_lse, spec.dtype, f"{name} OFFSETS_32={wide}")
        got[wide] = (out, lse)
    assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[False][1])


def test_offsets_32_needs_page_and_slot_strides_in_2_to_2_31():
    launch = _launch()
    small = torch.empty(4, 16, 2, 8)
    assert launch.offsets_32(small, small)
    wide_page = torch.empty(16, 2, 8).as_strided((1, 16, 2, 8), (2**31, 16, 8, 1))  # one page: any stride
    assert not launch.offsets_32(wide_page, small) and not launch.offsets_32(small, wide_page)
    unit_slot = torch.empty(4, 16, 1, 1)  # slot stride 1: Triton would pass it as a constant
    assert not launch.offsets_32(unit_slot, unit_slot)
    assert launch.offsets_32(small[:, :, :1], small[:, :, 1:])  # views keep the pool's strides


# ---- paged gather variants (FLASHDECODE_PAGED_GATHER) --------------------------------------


def _gather_spec(page_size: int, windowed: bool, aligned: bool = False) -> Spec:
    """GQA 4:1, D=32 (key tiles of 128 slots), leftpad, and either a causal left window (masked
    tiles at both ends of the range, unmasked ones in between) or a non-causal call with ALiBi and
    a right window. Capacity 400 slots (4 tiles: 3 splits leave one empty), a table width that is
    no multiple of a tile's pages; or with ``aligned`` 512 slots, a table width that is (the
    kernel's TABLE_ALIGNED), and a first sequence that fills the table to its last slot, so the
    look-ahead read of the next tile's entries falls past the table."""
    cap = 512 if aligned else 400
    return Spec(
        f"gather-page{page_size}-{'causal-window' if windowed else 'alibi-right'}{'-aligned' if aligned else ''}",
        q_lens=(1, 2, 1), cache_lens=(cap - 1 if aligned else 397, 150, 260), new_lens=(1, 2, 0), heads=8, kv_heads=2,
        head_dim=32, dtype=torch.bfloat16, page_size=page_size, max_pages=-(-cap // page_size), leftpad=(0, 37, 5),
        causal=windowed, window=(230, 0) if windowed else (-1, 100), alibi=not windowed, splits=(1, 3),
    )


class _KernelSpy:
    """Stands in for `attention_split_kernel` in launch.py and records the constexprs it gets."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def _spy_on_triton_kernel(launch, monkeypatch) -> _KernelSpy:
    """A spy in place of launch.py's `attention_split_kernel`, with the Gluon kernel turned off
    (``FLASHDECODE_GLUON=0``) so that on a Hopper GPU the calls reach it too."""
    monkeypatch.setenv("FLASHDECODE_GLUON", "0")
    spy = _KernelSpy(launch.attention_split_kernel)
    monkeypatch.setattr(launch, "attention_split_kernel", spy)
    return spy


@pytest.mark.interpreter
@pytest.mark.parametrize("page_size, windowed, aligned", [
    (1, True, False), (2, False, False), (4, True, False), (16, True, False), (16, False, False), (3, True, False),
    (16, True, True), (4, False, True), (2, True, True),
])
def test_paged_gather_modes_match_brute_force(page_size, windowed, aligned, device, monkeypatch):
    """Both gather modes equal the float64 brute force and each other bit for bit; ``page`` reaches
    the kernel as GATHER_PAGE = page size for powers of two below the key tile, and a page of 3
    falls back to the per-slot lookup; with ``FLASHDECODE_ALIGNED_TABLE=1``, TABLE_ALIGNED is set
    exactly when the table's width is a multiple of a tile's pages (in the interpreter the
    conftest checks the kernel's `tl.multiple_of` hints, which a misaligned table read breaks)."""
    launch = _launch()
    spy = _spy_on_triton_kernel(launch, monkeypatch)
    monkeypatch.setenv("FLASHDECODE_ALIGNED_TABLE", "1")
    spec = _gather_spec(page_size, windowed, aligned)
    p = build(spec, device, seed=page_size)
    want_out, want_lse, _, _ = brute_force(p)
    block_n = launch._plan(p)[0].block_n
    assert page_size < block_n
    for n in spec.splits:
        assert launch._plan(dataclasses.replace(p, num_splits=n))[2] == n
        got = {}
        for mode in ("row", "page"):
            monkeypatch.setenv("FLASHDECODE_PAGED_GATHER", mode)
            out, lse, _, _ = run_triton(p, n)
            want_gather = page_size if mode == "page" and page_size & (page_size - 1) == 0 else 0
            assert spy.calls[-1]["GATHER_PAGE"] == want_gather
            assert spy.calls[-1]["TABLE_ALIGNED"] is (want_gather > 0 and aligned)
            assert_close_attention(out, lse, want_out, want_lse, spec.dtype, f"{spec.name} {mode} splits={n}")
            got[mode] = (out, lse)
        assert torch.equal(got["row"][0], got["page"][0]) and torch.equal(got["row"][1], got["page"][1])


@pytest.mark.interpreter
@pytest.mark.parametrize("name, late", [
    ("decode-gqa-page3-d80-rot", True),  # fused append: the extra tile of new keys sums per tile
    ("spec-mqa-varlen-aligned", True),
    ("softcap-rot-noninterleaved", True),
    ("contig-leftpad-alibi-window-fp32", True),
    ("prefill-causal-multitile", False),  # a 128 x 64 tile: never late
])
def test_late_row_sum_matches_brute_force(name, late, device, monkeypatch):
    """``FLASHDECODE_LATE_ROW_SUM=1`` (the default) reaches decode tiles as LATE_SUM and gives the brute force's
    result at every split count, within rounding of the per-tile sum's result."""
    _, spy, spec, p, want_out, want_lse = spied_spec_problem(name, device, monkeypatch, seed=9)
    for n in spec.splits:
        got = {}
        for flag in ("0", "1"):
            monkeypatch.setenv("FLASHDECODE_LATE_ROW_SUM", flag)
            out, lse, _, _ = run_triton(p, n)
            assert spy.calls[-1]["LATE_SUM"] is (late and flag == "1")
            assert_close_attention(out, lse, want_out, want_lse, spec.dtype, f"{name} late={flag} splits={n}")
            got[flag] = (out, lse)
        assert_agree_within_rounding(got["1"], got["0"], spec.dtype)


def test_aligned_table_knob_is_on_by_default_and_checked(monkeypatch):
    launch = _launch()
    monkeypatch.delenv("FLASHDECODE_ALIGNED_TABLE", raising=False)
    assert launch.aligned_table(32, 128, 16)
    monkeypatch.setenv("FLASHDECODE_ALIGNED_TABLE", "0")
    assert not launch.aligned_table(32, 128, 16)
    monkeypatch.setenv("FLASHDECODE_ALIGNED_TABLE", "1")
    assert launch.aligned_table(32, 128, 16)
    assert not launch.aligned_table(30, 128, 16)  # 8 pages per tile do not divide 30
    assert not launch.aligned_table(32, 128, 0)  # a lookup per slot
    monkeypatch.setenv("FLASHDECODE_ALIGNED_TABLE", "yes")
    with pytest.raises(ValueError, match="FLASHDECODE_ALIGNED_TABLE"):
        launch.aligned_table(32, 128, 16)


# ---- K/V tiles through tensor descriptors (TMA_KV, FLASHDECODE_TMA=1) --------------------------

# Caches the descriptor path takes: 16-bit, power-of-two head dims, one page per sequence or pages
# of whole key tiles.
TMA_SPECS = [
    # Decode with the append fused (new key rotated), GQA 4:1, some sequences short of a tile.
    Spec("tma-decode-gqa-append-rot", q_lens=(1, 1, 1), cache_lens=(7, 0, 150), new_lens=(1, 1, 1), heads=8,
         kv_heads=2, head_dim=64, dtype=torch.bfloat16, page_size=200, contiguous=True, rotary_frac=1.0, causal=True),
    # Speculative verification with leftpad, ALiBi, softcap and a two-sided window: masked tiles at
    # both ends of the visible range, fp16.
    Spec("tma-spec-leftpad-window", q_lens=(3, 2), cache_lens=(190, 133), new_lens=(3, 2), heads=4, kv_heads=1,
         head_dim=32, dtype=torch.float16, page_size=256, contiguous=True, leftpad=(5, 70), alibi=True,
         window=(90, 1), softcap=4.0),
    # Prefill (append kernel first, 128-row query tiles), causal: pointer loads, TMA is for decode tiles.
    Spec("tma-prefill-causal", q_lens=(150, 9), cache_lens=(40, 0), new_lens=(150, 9), heads=2, kv_heads=1,
         head_dim=16, dtype=torch.bfloat16, page_size=256, contiguous=True, causal=True, splits=(1, 3)),
    # Paged, pages of two 64-key tiles (D=128): each tile finds its page, sequences cross pages.
    Spec("tma-paged-page128-gqa-append", q_lens=(1, 1), cache_lens=(300, 129), new_lens=(1, 1), heads=6, kv_heads=3,
         head_dim=128, dtype=torch.bfloat16, page_size=128, max_pages=4, rotary_frac=0.5, causal=True),
    # Paged, one 128-key tile per page (D=64), speculative rows and a left window, fp16.
    Spec("tma-paged-page128-spec-window", q_lens=(2, 4), cache_lens=(390, 200), new_lens=(2, 4), heads=4, kv_heads=2,
         head_dim=64, dtype=torch.float16, page_size=128, max_pages=4, window=(250, 0), causal=True),
    # One sequence and one KV head (num_pages == 1 reaches the kernel as a constant).
    Spec("tma-one-sequence-mqa", q_lens=(1,), cache_lens=(900,), new_lens=(1,), heads=8, kv_heads=1, head_dim=128,
         dtype=torch.bfloat16, page_size=1024, contiguous=True, extra_pages=0, rotary_frac=1.0, causal=True,
         splits=(1, 0, 3)),
]


def _contiguous_poisoned(p: PackedProblem) -> PackedProblem:
    """`p` with contiguous K/V pools whose slots outside every sequence's visible keys (before its
    left padding, after its last key, unused pages) hold NaN: a tile read past the keys must not
    let them into the result."""
    k, v = p.k_pages.contiguous().clone(), p.v_pages.contiguous().clone()
    keep = torch.zeros(k.shape[:2], dtype=torch.bool)
    table = p.block_table.cpu().tolist()
    lens, lefts = p.cache_seqlens.cpu().tolist(), p.cache_leftpad.cpu().tolist()
    cu_k = p.cu_seqlens_k_new.cpu().tolist()
    page_size = k.shape[1]
    for b in range(p.batch):
        for t in range(lefts[b], lens[b] + cu_k[b + 1] - cu_k[b]):
            keep[table[b][t // page_size], t % page_size] = True
    keep = keep.to(k.device)
    k[~keep] = float("nan")
    v[~keep] = float("nan")
    return dataclasses.replace(p, k_pages=k, v_pages=v)


@pytest.mark.interpreter
@pytest.mark.parametrize("knob", ["1", "0"], ids=["tma", "pointers"])
@pytest.mark.parametrize("spec", TMA_SPECS, ids=lambda s: s.name)
def test_tma_tiles_match_brute_force(spec, knob, device, monkeypatch):
    """A contiguous 16-bit cache, or a pool of pages that hold whole key tiles, is read through
    tensor descriptors (TMA_KV; on a GPU, Hopper's TMA) unless ``FLASHDECODE_TMA=0``, and either
    way every split count equals the float64 brute force with NaN in every slot outside the keys."""
    launch = _launch()
    spy = _spy_on_triton_kernel(launch, monkeypatch)
    monkeypatch.setenv("FLASHDECODE_TMA", knob)
    p = _contiguous_poisoned(build(spec, device, seed=11))
    want_out, want_lse, _, _ = brute_force(p)
    # A GPU without TMA (before compute capability 9.0) takes the pointer path, and so do prefill tiles.
    tma = knob == "1" and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9)
    for n in spec.splits:
        out, lse, _, _ = run_triton(p, n)
        call = spy.calls[-1]
        assert call["TMA_KV"] is (tma and call["BLOCK_M"] * call["BLOCK_N"] <= launch.DECODE_TILE_MAX_ELEMENTS)
        assert_close_attention(out, lse, want_out, want_lse, spec.dtype, f"{spec.name} splits={n}")


@pytest.mark.interpreter
def test_page_sized_tma_tiles_with_a_deep_pipeline_match_brute_force(device, monkeypatch):
    """Pages of 16 slots read as 16-key tiles, one page per tile through TMA, 8 stages deep (a tile
    config only `scripts/sweep_splits.py --block-n 16` asks for today): every split count equals
    the float64 brute force, with NaN in every slot outside the keys."""
    launch = _launch()
    spy = _spy_on_triton_kernel(launch, monkeypatch)
    tile = launch.heuristics.TileConfig(block_m=16, block_n=16, num_warps=4, num_stages=8)
    monkeypatch.setattr(launch.heuristics, "choose_tiles", lambda *a, **k: tile)
    spec = Spec("tma-page16-tile16", q_lens=(1, 1, 1), cache_lens=(300, 129, 15), new_lens=(1, 1, 1), heads=8,
                kv_heads=2, head_dim=128, dtype=torch.bfloat16, page_size=16, max_pages=24, rotary_frac=1.0,
                causal=True)
    p = _contiguous_poisoned(build(spec, device, seed=13))
    want_out, want_lse, _, _ = brute_force(p)
    tma = device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9
    for n in (0, 1, 3):
        out, lse, _, _ = run_triton(p, n)
        call = spy.calls[-1]
        assert (call["BLOCK_N"], call["TMA_KV"]) == (16, tma)
        assert_close_attention(out, lse, want_out, want_lse, spec.dtype, f"{spec.name} splits={n}")


def test_tma_knob_and_eligibility(monkeypatch):
    """On by default (``FLASHDECODE_TMA=0`` turns it off), only where one descriptor per cache
    covers every tile."""
    launch = _launch()
    spec = TMA_SPECS[0]
    p = _contiguous_poisoned(build(spec, torch.device("cpu")))
    monkeypatch.setenv("FLASHDECODE_TMA", "0")
    assert launch.kv_descriptors(p, 64) is None
    monkeypatch.delenv("FLASHDECODE_TMA", raising=False)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert launch.kv_descriptors(p, 64) is not None
    strided = build(spec, torch.device("cpu"))  # pools are views of wider rows
    assert not strided.k_pages.is_contiguous() and launch.kv_descriptors(strided, 64) is None
    paged = _contiguous_poisoned(build(dataclasses.replace(spec, contiguous=False, page_size=16, max_pages=16),
                                       torch.device("cpu")))
    assert launch.kv_descriptors(paged, 64) is None  # a tile spans 4 pages
    if os.environ.get("TRITON_INTERPRET") == "1":
        whole = _contiguous_poisoned(build(dataclasses.replace(spec, contiguous=False, page_size=128, max_pages=2),
                                           torch.device("cpu")))
        assert launch.kv_descriptors(whole, 64) is not None and launch.kv_descriptors(whole, 256) is None
    fp32 = _contiguous_poisoned(build(dataclasses.replace(spec, dtype=torch.float32), torch.device("cpu")))
    assert launch.kv_descriptors(fp32, 64) is None
    d80 = _contiguous_poisoned(build(dataclasses.replace(spec, head_dim=80), torch.device("cpu")))
    assert launch.kv_descriptors(d80, 64) is None
    monkeypatch.setenv("FLASHDECODE_TMA", "yes")
    with pytest.raises(ValueError, match="FLASHDECODE_TMA"):
        launch.kv_descriptors(p, 64)


def _meta_problem(batch, heads, kv_heads, keys, page_size=None, q_len=1, head_dim=128):
    """The shapes of a bf16 problem (meta tensors) with ``keys`` slots per sequence, in pages of
    ``page_size`` slots (default: a contiguous cache, one page per sequence)."""
    import types

    page = page_size or keys
    meta = dict(device="meta", dtype=torch.bfloat16)
    return types.SimpleNamespace(
        q=torch.empty(batch * q_len, heads, head_dim, **meta),
        k_pages=torch.empty(batch * keys // page, page, kv_heads, head_dim, **meta),
        block_table=torch.empty(batch, keys // page, dtype=torch.int32, device="meta"),
        max_seqlen_q=q_len, batch=batch, page_size=page, num_splits=0,
    )


def _planned(monkeypatch, batch, heads, kv_heads, keys, page_size=None, q_len=1, head_dim=128):
    """`launch._plan` of a bf16 problem of these shapes on a 132-SM GPU (meta tensors: shapes only)."""
    launch = _launch()
    monkeypatch.setattr(launch, "num_sms", lambda device: 132)
    return launch._plan(_meta_problem(batch, heads, kv_heads, keys, page_size, q_len, head_dim))


@pytest.mark.parametrize("batch, heads, kv_heads, keys, head_dim, contiguous, paged", [
    # (splits, stages) of a contiguous cache, then of pages of 16 slots
    (1, 32, 8, 32768, 128, (16, 4), (32, 3)),
    (8, 32, 8, 8192, 128, (2, 4), (4, 3)),
    (32, 32, 1, 8192, 128, (4, 4), (8, 3)),
    (16, 16, 8, 8192, 256, (1, 4), (2, 3)),
    (1, 32, 8, 4096, 128, (16, 3), (32, 3)),  # 4 tiles per contiguous split; paged: 4 of 32 keys
    (64, 9, 3, 2048, 64, (1, 3), (1, 3)),  # 192 programs: two on some SMs
    (1, 8, 1, 1 << 20, 128, (128, 4), (128, 3)),  # MAX_SPLITS: one program per SM for the paged cache too
])
def test_contiguous_decode_grids_fill_the_sms_once(monkeypatch, batch, heads, kv_heads, keys, head_dim,
                                                   contiguous, paged):
    """A contiguous cache's small decode grid gets one program per SM, with a deeper pipeline
    when its splits are long; a paged cache keeps two per SM and the tiles' stages."""
    cfg, _, splits = _planned(monkeypatch, batch, heads, kv_heads, keys, head_dim=head_dim)
    assert (splits, cfg.num_stages) == contiguous
    cfg, _, splits = _planned(monkeypatch, batch, heads, kv_heads, keys, page_size=16, head_dim=head_dim)
    assert (splits, cfg.num_stages) == paged


@pytest.mark.parametrize("batch, keys, contiguous, paged", [
    # (block_n, splits, stages) of a contiguous cache, then of pages of 16 slots (32/8 heads, D=128)
    (1, 4096, (64, 16, 3), (32, 32, 3)),
    (1, 1024, (64, 8, 2), (32, 8, 3)),
    (2, 2048, (64, 8, 3), (32, 16, 3)),
    (2, 4096, (64, 8, 4), (64, 16, 3)),  # 4 paged tiles of 64 keys per split: kept
])
def test_short_paged_splits_take_half_size_key_tiles(monkeypatch, batch, keys, contiguous, paged):
    """A paged decode split of fewer than 3 key tiles gets 32-key tiles; a contiguous one keeps its
    64-key tiles (measured slower with half-size ones)."""
    for page_size, want in ((None, contiguous), (16, paged)):
        cfg, _, splits = _planned(monkeypatch, batch, 32, 8, keys, page_size=page_size)
        assert (cfg.block_n, splits, cfg.num_stages) == want


@pytest.mark.interpreter
@pytest.mark.parametrize("append", [False, True], ids=["decode", "fused-append"])
def test_lone_program_pipeline_matches_brute_force(append, device, monkeypatch):
    """The deepest pipeline the launcher asks for (one program per SM, 4 stages; on a GPU through
    TMA) gives the float64 brute force's result: with 4 SMs pretended, 4 sequences of one KV head
    run one program each over 10 key tiles."""
    launch = _launch()
    monkeypatch.setattr(launch, "num_sms", lambda device: 4)
    spy = _spy_on_triton_kernel(launch, monkeypatch)
    spec = Spec("lone-programs", q_lens=(1, 1, 1, 1), cache_lens=(600, 639, 37, 333),
                new_lens=(1, 1, 1, 1) if append else (0, 0, 0, 0), heads=4, kv_heads=1, head_dim=128,
                dtype=torch.bfloat16, page_size=640, contiguous=True, rotary_frac=1.0 if append else 0.0,
                causal=True)
    p = _contiguous_poisoned(build(spec, device, seed=5))
    want_out, want_lse, want_k, want_v = brute_force(p)
    out, lse, k, v = run_triton(p, 0)
    call = spy.calls[-1]
    assert (call["num_stages"], call["SPLIT"], call["APPEND"]) == (launch.heuristics.LONE_PROGRAM_STAGES, False, append)
    assert_close_attention(out, lse, want_out, want_lse, spec.dtype, "lone programs")
    # The cache after the append: v bit-exact, k the rotated key rounded once (NaN where poisoned).
    torch.testing.assert_close(v.cpu().double(), want_v, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(k.cpu().double(), want_k, rtol=1.6e-2, atol=1.6e-2, equal_nan=True)


def test_plan_keeps_to_the_devices_shared_memory(monkeypatch):
    """The launcher plans within the device's shared memory per program (`launch.smem_budget`)."""
    launch = _launch()
    assert launch.smem_budget(torch.device("cpu")) == launch.heuristics.SMEM_BUDGET_BYTES
    monkeypatch.setattr(launch, "smem_budget", lambda device: 101376)  # consumer Ampere/Ada
    cfg, _, _ = _planned(monkeypatch, 1, 8, 8, 16384, q_len=128)
    assert cfg.block_m == 128 and cfg.num_stages == 2
    cfg, _, splits = _planned(monkeypatch, 32, 32, 1, 8192)  # MQA: one program per SM, but no room for 4 stages
    assert splits == 4 and cfg.num_stages == 2


def test_prefill_grids_keep_the_target_programs_per_sm(monkeypatch):
    cfg, m_tiles, splits = _planned(monkeypatch, 1, 8, 8, 16384, q_len=128)
    assert cfg.block_m == 128 and m_tiles == 1 and splits == 32  # 8 programs -> 256 (two per SM), not 128
    assert cfg.num_stages == 3


def test_late_row_sum_knob_is_checked(monkeypatch):
    launch = _launch()
    decode = launch.heuristics.TileConfig(block_m=16, block_n=64, num_warps=4, num_stages=3)
    monkeypatch.delenv("FLASHDECODE_LATE_ROW_SUM", raising=False)
    assert launch.late_row_sum(decode)  # on by default
    monkeypatch.setenv("FLASHDECODE_LATE_ROW_SUM", "0")
    assert not launch.late_row_sum(decode)
    monkeypatch.setenv("FLASHDECODE_LATE_ROW_SUM", "1")
    assert launch.late_row_sum(decode)
    prefill = launch.heuristics.TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    assert not launch.late_row_sum(prefill)
    monkeypatch.setenv("FLASHDECODE_LATE_ROW_SUM", "yes")
    with pytest.raises(ValueError, match="FLASHDECODE_LATE_ROW_SUM"):
        launch.late_row_sum(decode)


@pytest.mark.interpreter
@pytest.mark.parametrize("tile_elements", [None, 2 * 128])
def test_combine_in_one_tile_and_in_chunks_match_brute_force(tile_elements, device, monkeypatch):
    """The combine kernel loads every split's partial output at once when they fit
    ``COMBINE_TILE_ELEMENTS``, else chunk by chunk (forced here: 2 splits per chunk of D=128)."""
    launch = _launch()
    spy = _KernelSpy(launch.combine_splits_kernel)
    monkeypatch.setattr(launch, "combine_splits_kernel", spy)
    if tile_elements is not None:
        monkeypatch.setattr(launch, "COMBINE_TILE_ELEMENTS", tile_elements)
    spec = SPECS[0]  # D=80 (padded to 128), three sequences of very different lengths
    p = build(spec, device, seed=11)
    want_out, want_lse, _, _ = brute_force(p)
    out, lse, _, _ = run_triton(p, 5)
    chunk, splits_p2 = spy.calls[-1]["SPLIT_CHUNK"], spy.calls[-1]["SPLITS_P2"]
    assert (chunk < splits_p2) == (tile_elements is not None), (chunk, splits_p2)
    assert_close_attention(out, lse, want_out, want_lse, spec.dtype, f"combine chunk={chunk}")


@pytest.mark.interpreter
def test_paged_gather_env_override_is_read_at_each_call(device, monkeypatch):
    """Unset follows the heuristic's default, ``row``/``page`` are honoured (same results), and an
    unknown value is refused."""
    from flashdecode.attention import heuristics

    launch = _launch()
    spy = _spy_on_triton_kernel(launch, monkeypatch)
    spec = Spec("gather-env", q_lens=(1, 1), cache_lens=(40, 23), new_lens=(0, 0), heads=4, kv_heads=2, head_dim=16,
                page_size=8, max_pages=6)
    p = build(spec, device, seed=4)
    block_n = launch._plan(p)[0].block_n
    results = {}
    for mode in (None, "row", "page", " Page ", "auto"):
        if mode is None:
            monkeypatch.delenv("FLASHDECODE_PAGED_GATHER", raising=False)
        else:
            monkeypatch.setenv("FLASHDECODE_PAGED_GATHER", mode)
        results[mode] = run_triton(p, 2)[:2]
        used = spy.calls[-1]["GATHER_PAGE"]
        expect = heuristics.gather_page(8, block_n, None if mode in (None, "auto") else mode.strip().lower())
        assert used == expect, (mode, used)
    assert spy.calls[-4]["GATHER_PAGE"] == 0 and spy.calls[-3]["GATHER_PAGE"] == 8  # row, page
    for out, lse in results.values():
        assert torch.equal(out, results["row"][0]) and torch.equal(lse, results["row"][1])
    monkeypatch.setenv("FLASHDECODE_PAGED_GATHER", "tile")
    with pytest.raises(ValueError, match="paged gather mode"):
        run_triton(p, 1)


def test_attention_pdl_switch_is_on_by_default_never_on_cpu_and_checked(monkeypatch):
    launch = _launch()
    monkeypatch.delenv("FLASHDECODE_ATTENTION_PDL", raising=False)
    assert not launch.attention_pdl(torch.device("cpu"))
    monkeypatch.setenv("FLASHDECODE_ATTENTION_PDL", "1")
    assert not launch.attention_pdl(torch.device("cpu"))
    if torch.cuda.is_available():
        monkeypatch.delenv("FLASHDECODE_ATTENTION_PDL")
        assert launch.attention_pdl(torch.device("cuda")) == launch.pdl_supported(torch.device("cuda"))
        monkeypatch.setenv("FLASHDECODE_ATTENTION_PDL", "0")
        assert not launch.attention_pdl(torch.device("cuda"))
    monkeypatch.setenv("FLASHDECODE_ATTENTION_PDL", "2")
    with pytest.raises(ValueError, match="FLASHDECODE_ATTENTION_PDL"):
        launch.attention_pdl(torch.device("cpu"))


@pytest.mark.interpreter
def test_fused_append_env_switches_to_the_append_kernel(device, monkeypatch):
    """``FLASHDECODE_FUSED_APPEND=0`` appends with the separate kernel (the attention kernel gets
    APPEND=False); both paths match the brute force and leave the same cache."""
    launch = _launch()
    spy = _spy_on_triton_kernel(launch, monkeypatch)
    spec = SPECS[0]
    p = build(spec, device, seed=11)
    want_out, want_lse, want_k, want_v = brute_force(p)
    got = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FLASHDECODE_FUSED_APPEND", flag)
        out, lse, kc, vc = run_triton(p, 2)
        assert spy.calls[-1]["APPEND"] is (flag == "1")
        assert_close_attention(out, lse, want_out, want_lse, spec.dtype, f"fused append={flag}")
        assert torch.equal(vc.cpu().double(), want_v)
        got[flag] = kc
    assert torch.equal(got["0"], got["1"]), "the two append paths wrote different keys"
    monkeypatch.setenv("FLASHDECODE_FUSED_APPEND", "maybe")
    with pytest.raises(ValueError, match="FLASHDECODE_FUSED_APPEND"):
        run_triton(p, 1)


@pytest.mark.interpreter
def test_no_write_and_no_read_outside_the_pool_with_bad_lengths(device):
    """During CUDA-graph capture the host checks are skipped: bad lengths and block-table entries
    must neither write outside the pages nor read pages outside the pool."""
    spec = Spec("bad", q_lens=(1, 2), cache_lens=(30, 5), new_lens=(4, 3), head_dim=16, page_size=8, max_pages=4,
                extra_pages=1)
    p = build(spec, device, seed=3)
    num_pages, max_pages = p.k_pages.shape[0], p.block_table.shape[1]
    # The pool is a window of a larger buffer; its guard pages hold NaN, which would reach the
    # output if a kernel read them, and must stay NaN (bitwise) if nothing writes there.
    big_k = torch.full((num_pages + 4, *p.k_pages.shape[1:]), float("nan"), dtype=spec.dtype, device=device)
    big_v = big_k.clone()
    big_k[2:-2].copy_(p.k_pages)
    big_v[2:-2].copy_(p.v_pages)
    # The block table is a view whose row continues with a valid page id: an append past the
    # capacity that did not check it would land there.
    table_store = torch.full((p.batch, max_pages + 2), num_pages - 1, dtype=torch.int32, device=device)
    table_store[:, :max_pages] = p.block_table
    table = table_store[:, :max_pages]
    table[0, 1] = -1  # slots 8..15 of sequence 0 point before the pool
    table[1, 0] = num_pages + 1  # slots 0..7 of sequence 1 point past it
    p = dataclasses.replace(
        p, k_pages=big_k[2:-2], v_pages=big_v[2:-2], block_table=table,
        # Sequence 0 appends at slots 30..33: 32 and 33 are past the capacity (32 slots); sequence
        # 1 appends at 5..7, in its invalid page; its leftpad is negative.
        cache_leftpad=torch.tensor([0, -3], dtype=torch.int32, device=device),
    )
    before_k, before_v = big_k.clone(), big_v.clone()
    expected_k, expected_v = big_k.clone(), big_v.clone()
    page, (k0, k1) = 2 + int(table[0, 3]), (p.k_new[0], p.k_new[1])
    expected_v[page, 6], expected_v[page, 7] = p.v_new[0], p.v_new[1]
    for n in (1, 3):
        big_k.copy_(before_k), big_v.copy_(before_v)
        out = torch.full(p.q.shape, float("nan"), dtype=p.q.dtype, device=device)
        lse = torch.full((p.q.shape[1], p.q.shape[0]), float("nan"), device=device)
        _launch().triton_forward(dataclasses.replace(p, num_splits=n), out, lse)
        assert not out.isnan().any() and not lse.isnan().any(), "read a page outside the pool"
        # Only slots 30 and 31 of sequence 0 are written (k rotated? no rotary here: exact).
        expected_k[page, 6], expected_k[page, 7] = k0, k1
        for got, want in ((big_k, expected_k), (big_v, expected_v)):
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), "wrote outside the valid slots"


# ---- merge_attention_states ----------------------------------------------------------------


def _attn64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """q (N, H, D), k/v (N, S, H, D) float64 -> out (N, H, D), lse (N, H); +inf and 0 if S == 0."""
    if k.shape[1] == 0:
        return torch.zeros_like(q), torch.full(q.shape[:2], math.inf, dtype=torch.float64)
    s = torch.einsum("nhd,nshd->nhs", q, k) * scale
    lse = torch.logsumexp(s, -1)
    return torch.einsum("nhs,nshd->nhd", torch.exp(s - lse[..., None]), v), lse


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_merge_equals_attention_over_concatenated_keys(backend, layout, dt, device, monkeypatch):
    monkeypatch.setenv("FLASHDECODE_BACKEND", "triton" if backend == "triton" else "reference")
    g = torch.Generator().manual_seed(5)
    B, S, H, D, La, Lb = 2, 3, 5, 40, 7, 12
    N = B * S
    f64 = dict(generator=g, dtype=torch.float64)
    q = torch.randn(N, H, D, **f64)
    ka, va = torch.randn(N, La, H, D, **f64), torch.randn(N, La, H, D, **f64)
    kb, vb = torch.randn(N, Lb, H, D, **f64), torch.randn(N, Lb, H, D, **f64)
    scale = D**-0.5
    # Row 0: side a saw no key; row 1: side b saw none (-inf, also accepted); row 2: neither.
    a_empty, b_empty = [0, 2], [1, 2]
    oa, la = _attn64(q, ka, va, scale)
    ob, lb = _attn64(q, kb, vb, scale)
    oa[a_empty] = torch.randn(2, H, D, **f64)  # ignored: its lse says "empty"
    la[a_empty] = math.inf
    ob[b_empty] = torch.randn(2, H, D, **f64)
    lb[1], lb[2] = -math.inf, math.inf
    want_o, want_l = _attn64(q, torch.cat([ka, kb], 1), torch.cat([va, vb], 1), scale)
    want_o[0], want_l[0] = _attn64(q[:1], kb[:1], vb[:1], scale)[0][0], _attn64(q[:1], kb[:1], vb[:1], scale)[1][0]
    want_o[1], want_l[1] = _attn64(q[1:2], ka[1:2], va[1:2], scale)[0][0], _attn64(q[1:2], ka[1:2], va[1:2], scale)[1][0]
    want_o[2], want_l[2] = 0.0, math.inf

    if layout == "batched":  # out (B, S, H, D), lse (B, H, S)
        to_o = lambda o: o.reshape(B, S, H, D).to(dt).to(device)  # noqa: E731
        to_l = lambda lse: lse.reshape(B, S, H).transpose(1, 2).float().contiguous().to(device)  # noqa: E731
    else:  # out (T, H, D), lse (H, T)
        to_o = lambda o: o.to(dt).to(device)  # noqa: E731
        to_l = lambda lse: lse.T.float().contiguous().to(device)  # noqa: E731
    out, lse = merge_attention_states(to_o(oa), to_l(la), to_o(ob), to_l(lb))
    assert out.dtype == dt and lse.dtype == torch.float32
    assert out.shape == to_o(oa).shape and lse.shape == to_l(la).shape
    out = out.reshape(N, H, D).cpu().double()
    lse = (lse.transpose(1, 2) if layout == "batched" else lse.T).reshape(N, H).cpu().double()
    assert torch.isinf(lse[2]).all() and (lse[2] > 0).all() and (out[2] == 0).all()
    atol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dt]
    assert (out - want_o).abs().max().item() <= atol
    fin = torch.isfinite(want_l)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin] - want_l[fin]).abs().max().item() <= 1e-5


@pytest.mark.interpreter
def test_merge_of_two_kernel_calls_equals_one_call_over_both_caches(device):
    """A shared prefix and a per-request suffix attended separately, then merged."""
    spec = Spec("merge-e2e", q_lens=(2, 1), cache_lens=(21, 9), new_lens=(0, 0), heads=4, kv_heads=2, head_dim=32,
                dtype=torch.float16, page_size=4, max_pages=8)
    full = build(spec, device, seed=11)
    want_out, want_lse, _, _ = brute_force(full)
    # Prefix = slots [0, 10) (leftpad 0, end 10); suffix = slots [10, end) via leftpad.
    seqlens = full.cache_seqlens
    prefix = dataclasses.replace(full, cache_seqlens=torch.minimum(seqlens, torch.full_like(seqlens, 10)))
    suffix = dataclasses.replace(full, cache_leftpad=torch.minimum(seqlens, torch.full_like(seqlens, 10)))
    # The prefix call must not apply a causal shift relative to the full length: non-causal here.
    oa, la, _, _ = run_triton(prefix, 1)
    ob, lb, _, _ = run_triton(suffix, 2)
    out, lse = merge_attention_states(oa, la, ob, lb)
    assert_close_attention(out, lse, want_out, want_lse, spec.dtype, "merged")


def test_merge_validates_arguments():
    o = torch.randn(2, 3, 4, 8)
    lse = torch.randn(2, 4, 3)
    with pytest.raises(TypeError, match="out_a"):
        merge_attention_states(o.numpy(), lse, o, lse)
    with pytest.raises(TypeError, match="lse_b"):
        merge_attention_states(o, lse, o, lse.double())
    with pytest.raises(TypeError, match="out_b"):
        merge_attention_states(o, lse, o.half(), lse)
    with pytest.raises(TypeError, match="out_a"):
        merge_attention_states(o.int(), lse, o.int(), lse)
    with pytest.raises(ValueError, match="out_b"):
        merge_attention_states(o, lse, o[:1], lse)
    with pytest.raises(ValueError, match="lse_a"):
        merge_attention_states(o, lse.transpose(1, 2), o, lse)
    with pytest.raises(ValueError, match="out_a"):
        merge_attention_states(o[0, 0], lse, o[0, 0], lse)
    with pytest.raises(ValueError, match="lse_b"):
        merge_attention_states(o[0], lse[0], o[0], lse[0, :, :2])


# ---- GPU only ------------------------------------------------------------------------------


def _decode_problem(g, device, *, B=4, H=8, Hk=2, D=128, page_size=16, max_pages=64, num_splits=0):
    num_pages = B * max_pages + 5
    dt = torch.bfloat16
    table = torch.randperm(num_pages, generator=g)[: B * max_pages].reshape(B, max_pages).int()
    cos_sin = torch.rand(max_pages * page_size + 2, D // 4, generator=g) * 6.3
    return PackedProblem(
        q=_randn(g, B, H, D, dtype=dt, device=device),
        k_pages=_randn(g, num_pages, page_size, Hk, D, dtype=dt, device=device),
        v_pages=_randn(g, num_pages, page_size, Hk, D, dtype=dt, device=device),
        block_table=table.to(device),
        cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32, device=device), max_seqlen_q=1,
        cache_seqlens=torch.randint(1, max_pages * page_size - 1, (B,), generator=g).int().to(device),
        cache_leftpad=torch.zeros(B, dtype=torch.int32, device=device),
        k_new=_randn(g, B, Hk, D, dtype=dt, device=device), v_new=_randn(g, B, Hk, D, dtype=dt, device=device),
        cu_seqlens_k_new=torch.arange(B + 1, dtype=torch.int32, device=device), max_seqlen_k_new=1,
        rotary_cos=cos_sin.cos().to(dt).to(device), rotary_sin=cos_sin.sin().to(dt).to(device),
        rotary_interleaved=False, rotary_seqlens=torch.zeros(B, dtype=torch.int32, device=device),
        softmax_scale=D**-0.5, causal=True, window_left=-1, window_right=0, softcap=0.0, alibi_slopes=None,
        num_splits=num_splits,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", ["0", "1"], ids=["plain-launch", "attention-pdl"])
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_cuda_graph_replay_equals_eager(num_splits, pdl, monkeypatch):
    """Also with the attention and combine kernels under programmatic dependent launch."""
    monkeypatch.setenv("FLASHDECODE_ATTENTION_PDL", pdl)
    device = torch.device("cuda")
    launch = _launch()
    g = torch.Generator().manual_seed(21)
    p = _decode_problem(g, device, num_splits=num_splits)
    out = torch.empty_like(p.q)
    lse = torch.empty(p.q.shape[1], p.q.shape[0], device=device)
    # Warm up (compiles) on a side stream, then capture one decode step.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        launch.triton_forward(p, out, lse)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch.triton_forward(p, out, lse)

    for step in range(3):
        # New lengths, new cache contents, new inputs, written in place into the static tensors.
        p.cache_seqlens.copy_(torch.randint(0, 64 * 16 - 1, (p.batch,), generator=g).int())
        p.rotary_seqlens.copy_(p.cache_seqlens)
        p.k_pages.copy_(_randn(g, *p.k_pages.shape, dtype=p.k_pages.dtype))
        p.v_pages.copy_(_randn(g, *p.v_pages.shape, dtype=p.v_pages.dtype))
        for t in (p.q, p.k_new, p.v_new):
            t.copy_(_randn(g, *t.shape, dtype=t.dtype))
        want_out, want_lse, _, _ = brute_force(p)
        eager = with_fresh_cache(p, p.num_splits)
        out_e = torch.full_like(out, float("nan"))
        lse_e = torch.full_like(lse, float("nan"))
        launch.triton_forward(eager, out_e, lse_e)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, out_e), f"step {step}: graph output differs from eager"
        assert torch.equal(lse, lse_e)
        assert torch.equal(p.k_pages, eager.k_pages) and torch.equal(p.v_pages, eager.v_pages)
        assert_close_attention(out, lse, want_out, want_lse, torch.bfloat16, f"graph step {step}")


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 4])
def test_paged_gather_modes_agree_on_the_gpu(page_size, monkeypatch):
    """The compiled ``row`` and ``page`` gathers give the same bits, and match the brute force."""
    device = torch.device("cuda")
    launch = _launch()
    g = torch.Generator().manual_seed(33)
    p = _decode_problem(g, device, page_size=page_size, max_pages=1024 // page_size)
    want_out, want_lse, _, _ = brute_force(p)
    for splits in (0, 1, 3):
        got = {}
        for mode in ("row", "page"):
            monkeypatch.setenv("FLASHDECODE_PAGED_GATHER", mode)
            q = with_fresh_cache(p, splits)
            out = torch.full_like(q.q, float("nan"))
            lse = torch.full((q.q.shape[1], q.q.shape[0]), float("nan"), device=device)
            launch.triton_forward(q, out, lse)
            torch.cuda.synchronize()
            assert_close_attention(out, lse, want_out, want_lse, torch.bfloat16, f"{mode} splits={splits}")
            got[mode] = (out, lse)
        assert torch.equal(got["row"][0], got["page"][0]), f"splits={splits}: outputs differ between gathers"
        assert torch.equal(got["row"][1], got["page"][1])


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_cache_with_more_than_2_31_elements(layout):
    """Offsets past 2^31 elements: pages/rows at the top of a ~2.2e9-element pool."""
    device = torch.device("cuda")
    free, _ = torch.cuda.mem_get_info()
    dt, Hk, D, H = torch.bfloat16, 2, 128, 8
    if layout == "paged":
        page_size = 16
        num_pages = (2**31 // (page_size * Hk * D)) * 21 // 20  # ~1.05 * 2^31 elements
    else:
        page_size = (2**31 // (Hk * D)) * 11 // 20  # two rows of ~0.55 * 2^31 elements
        num_pages = 2
    need = 2 * num_pages * page_size * Hk * D * 2
    if free < need * 1.2:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free")
    g = torch.Generator().manual_seed(7)
    k_pages = torch.empty(num_pages, page_size, Hk, D, dtype=dt, device=device)
    v_pages = torch.empty_like(k_pages)
    if layout == "paged":
        table = torch.tensor([[num_pages - 1, num_pages - 7, num_pages - 3, num_pages - 2, num_pages - 5, num_pages - 4],
                              [num_pages - 6, 1, num_pages - 8, 0, 5, num_pages - 9]], dtype=torch.int32)
        lens = [90, 70]
    else:
        table = torch.tensor([[1], [0]], dtype=torch.int32)
        lens = [page_size - 2, 50]  # sequence 0 reads the end of row 1, ~2.3e9 elements in
    B = 2
    for b in range(B):  # fill only what is read, with fresh random values
        for t in range(max(0, lens[b] - 300), lens[b] + 1):
            page, off = int(table[b, t // page_size]), t % page_size
            k_pages[page, off] = _randn(g, Hk, D, dtype=dt, device=device)
            v_pages[page, off] = _randn(g, Hk, D, dtype=dt, device=device)
    leftpad = torch.tensor([max(0, n - 300) for n in lens], dtype=torch.int32, device=device)
    p = PackedProblem(
        q=_randn(g, B, H, D, dtype=dt, device=device), k_pages=k_pages, v_pages=v_pages, block_table=table.to(device),
        cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32, device=device), max_seqlen_q=1,
        cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device), cache_leftpad=leftpad,
        k_new=_randn(g, B, Hk, D, dtype=dt, device=device), v_new=_randn(g, B, Hk, D, dtype=dt, device=device),
        cu_seqlens_k_new=torch.arange(B + 1, dtype=torch.int32, device=device), max_seqlen_k_new=1,
        rotary_cos=None, rotary_sin=None, rotary_interleaved=True,
        rotary_seqlens=torch.tensor(lens, dtype=torch.int32, device=device), softmax_scale=D**-0.5, causal=True,
        window_left=-1, window_right=0, softcap=0.0, alibi_slopes=None, num_splits=3,
    )
    twin = _compact(p)  # small copy of what is read, for the brute force (before the append)
    out = torch.full_like(p.q, float("nan"))
    lse = torch.full((H, B), float("nan"), device=device)
    _launch().triton_forward(p, out, lse)
    want_out, want_lse, _, _ = brute_force(twin)
    assert_close_attention(out, lse, want_out, want_lse, dt, f"{layout} >2^31")
    for b in range(B):  # the appended key/value landed at the high address
        page, off = int(table[b, lens[b] // page_size]), lens[b] % page_size
        assert torch.equal(v_pages[page, off], p.v_new[b])


def _compact(p: PackedProblem) -> PackedProblem:
    """The same problem over a small pool: one page per sequence holding its valid slots (and room
    for the append), so that the brute force does not copy a huge cache to the host."""
    lens, lefts = p.cache_seqlens.tolist(), p.cache_leftpad.tolist()
    news = (p.cu_seqlens_k_new[1:] - p.cu_seqlens_k_new[:-1]).tolist()
    size = max(n - lp + m for n, lp, m in zip(lens, lefts, news))
    k = torch.randn(p.batch, size, *p.k_pages.shape[2:]).to(p.k_pages)
    v = torch.randn(p.batch, size, *p.v_pages.shape[2:]).to(p.v_pages)
    for b in range(p.batch):
        for t in range(lefts[b], lens[b]):
            page, off = int(p.block_table[b, t // p.page_size]), t % p.page_size
            k[b, t - lefts[b]], v[b, t - lefts[b]] = p.k_pages[page, off], p.v_pages[page, off]
    dev = p.q.device
    return dataclasses.replace(
        p, k_pages=k, v_pages=v, block_table=torch.arange(p.batch, dtype=torch.int32, device=dev).reshape(-1, 1),
        cache_seqlens=p.cache_seqlens - p.cache_leftpad, cache_leftpad=torch.zeros_like(p.cache_leftpad),
    )


# ---- compiler check without a GPU -----------------------------------------------------------


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not run Triton's compiler; compile the main variants for sm_90 (in a
    subprocess, since this process imported the kernels in interpreter mode)."""
    pytest.importorskip("triton.backends.compiler")
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "flashdecode.attention.kernels.aot_check"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every attention variant pipelines its K/V loads (cp.async), whatever the page size.
    for line in proc.stdout.splitlines():
        if line.split()[1].startswith(("decode", "prefill")):
            assert "async_copies=0" not in line, line
        # The per-page gather keeps every K/V copy 16 bytes wide and spills nothing.
        if "gather" in line.split()[1]:
            fields = dict(f.split("=", 1) for f in line.split()[2:])
            done, total = fields["cp16"].split("/")
            assert done == total and int(total) > 0, line
            assert fields.get("stack", "0") == "0", line


# ---- the Gluon decode kernel (Hopper) ------------------------------------------------------------

# Plain decode, which `launch.gluon_problem_supported` accepts: lengths that
# end inside a tile, empty sequences, left padding, GQA / 9-3 / MHA / 16:1 groups, capacities that
# are not a multiple of the key tile, one sequence in a pool of one page (a constant in the kernel).
GLUON_SPECS = [
    Spec("gluon-gqa-d128-leftpad", q_lens=(1, 1, 1, 1), cache_lens=(1000, 0, 64, 333), new_lens=(0, 0, 0, 0),
         heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, page_size=1024, contiguous=True,
         leftpad=(0, 0, 5, 70), causal=True, splits=(1, 0, 3, 7)),
    Spec("gluon-9-3-d64-fp16", q_lens=(1, 1, 1, 1), cache_lens=(2048, 1, 129, 700), new_lens=(0, 0, 0, 0), heads=9,
         kv_heads=3, head_dim=64, dtype=torch.float16, page_size=2048, contiguous=True, splits=(1, 0, 2, 5)),
    Spec("gluon-mha-capacity-320", q_lens=(1, 1), cache_lens=(320, 65), new_lens=(0, 0), heads=4, kv_heads=4,
         head_dim=128, dtype=torch.bfloat16, page_size=320, contiguous=True, splits=(1, 0, 4)),
    Spec("gluon-one-sequence-group16", q_lens=(1,), cache_lens=(517,), new_lens=(0,), heads=16, kv_heads=1,
         head_dim=128, dtype=torch.bfloat16, page_size=600, contiguous=True, extra_pages=0, splits=(1, 0, 3)),
    # Paged caches: 16-slot pages (four TMA boxes per 64-key tile), a table of 45 pages (720
    # slots, no multiple of the tile), left padding; 32-slot pages at D=64 (four boxes per
    # 128-key tile); pages of two whole tiles. Both of the producer's ways to its first page ids
    # run: with the lengths where a split starts where it would in a full table (e.g. sequence 0
    # of the first case, 720 slots), after them elsewhere (its left-padded and short sequences).
    Spec("gluon-paged16-gqa-leftpad", q_lens=(1, 1, 1, 1), cache_lens=(720, 0, 64, 333), new_lens=(0, 0, 0, 0),
         heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, page_size=16, max_pages=45,
         leftpad=(0, 0, 5, 70), causal=True, splits=(1, 0, 3, 7)),
    Spec("gluon-paged32-9-3-d64-fp16", q_lens=(1, 1, 1), cache_lens=(1000, 1, 129), new_lens=(0, 0, 0), heads=9,
         kv_heads=3, head_dim=64, dtype=torch.float16, page_size=32, max_pages=33, splits=(1, 0, 2, 5)),
    Spec("gluon-paged128-mha", q_lens=(1, 1), cache_lens=(500, 65), new_lens=(0, 0), heads=4, kv_heads=4,
         head_dim=128, dtype=torch.bfloat16, page_size=128, max_pages=4, splits=(1, 0, 4)),
    # MQA, 32 query rows (and 20: rows past the group are masked), contiguous and paged.
    Spec("gluon-mqa-leftpad", q_lens=(1, 1, 1), cache_lens=(900, 3, 200), new_lens=(0, 0, 0), heads=32, kv_heads=1,
         head_dim=128, dtype=torch.bfloat16, page_size=1024, contiguous=True, leftpad=(0, 1, 64),
         splits=(1, 0, 3)),
    Spec("gluon-paged16-group20", q_lens=(1, 1), cache_lens=(400, 17), new_lens=(0, 0), heads=40, kv_heads=2,
         head_dim=128, dtype=torch.bfloat16, page_size=16, max_pages=26, splits=(1, 0, 5)),
]


def _gluon_expected(device) -> bool:
    """Where `launch.gluon_plan` takes the Gluon kernel for a supported problem."""
    import triton

    launch = _launch()
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
            and triton.__version__.startswith(launch.GLUON_TRITON_VERSIONS))


@pytest.mark.gpu
@pytest.mark.parametrize("spec", GLUON_SPECS, ids=lambda s: s.name)
def test_gluon_decode_matches_brute_force(spec, device, monkeypatch):
    """With ``FLASHDECODE_GLUON=1``, on a Hopper GPU the Gluon decode kernel runs these calls, and
    every split count equals the float64 brute force with NaN in every slot outside the keys;
    ``FLASHDECODE_GLUON=0`` hands the same calls to the Triton kernel."""
    if device.type != "cuda":
        pytest.skip("the Gluon kernel compiles for a GPU only")
    from flashdecode.attention.kernels import gluon_decode

    monkeypatch.setenv("FLASHDECODE_GLUON", "1")
    calls = []
    real = gluon_decode.launch
    monkeypatch.setattr(gluon_decode, "launch", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    p = _contiguous_poisoned(build(spec, device, seed=17))
    assert _launch().gluon_problem_supported(p)
    want_out, want_lse, _, _ = brute_force(p)
    for n in spec.splits:
        out, lse, _, _ = run_triton(p, n)
        assert_close_attention(out, lse, want_out, want_lse, spec.dtype, f"{spec.name} splits={n}")
    assert len(calls) == (len(spec.splits) if _gluon_expected(device) else 0)
    monkeypatch.setenv("FLASHDECODE_GLUON", "0")
    out, lse, _, _ = run_triton(p, 0)
    assert_close_attention(out, lse, want_out, want_lse, spec.dtype, f"{spec.name} FLASHDECODE_GLUON=0")
    assert len(calls) == (len(spec.splits) if _gluon_expected(device) else 0)


def test_gluon_problem_supported_takes_plain_decode_only():
    """Every feature the Gluon kernel leaves out sends the call to the Triton kernel."""
    launch = _launch()
    cpu = torch.device("cpu")
    base = GLUON_SPECS[0]
    for spec in GLUON_SPECS:
        assert launch.gluon_problem_supported(_contiguous_poisoned(build(spec, cpu))), spec.name
    assert not launch.gluon_problem_supported(build(base, cpu))  # pools are views of wider rows
    turned_down = {
        "pages of 8 slots": dict(contiguous=False, page_size=8, max_pages=128),
        "pages of 48 slots": dict(contiguous=False, page_size=48, max_pages=21),
        "pages of 96 slots": dict(contiguous=False, page_size=96, max_pages=11),
        "two queries": dict(q_lens=(2, 1, 1, 1)),
        "append": dict(new_lens=(1, 1, 1, 1), causal=True),
        "window": dict(window=(100, -1)),
        "softcap": dict(softcap=5.0),
        "alibi": dict(alibi=True),
        "fp32": dict(dtype=torch.float32),
        "head dim 32": dict(head_dim=32),
        "head dim 256": dict(head_dim=256),
        "64 heads per kv head": dict(heads=64, kv_heads=1),
    }
    for what, change in turned_down.items():
        p = _contiguous_poisoned(build(dataclasses.replace(base, **change), cpu))
        assert not launch.gluon_problem_supported(p), what


def test_gluon_knob_defaults_to_auto_is_checked_and_a_cpu_tensor_keeps_the_triton_kernel(monkeypatch):
    launch = _launch()
    p = _contiguous_poisoned(build(GLUON_SPECS[4], torch.device("cpu")))
    monkeypatch.delenv("FLASHDECODE_GLUON", raising=False)
    assert launch.gluon_mode() == "auto"
    for value, mode in (("1", "1"), ("on", "1"), ("0", "0"), ("OFF", "0"), (" auto ", "auto")):
        monkeypatch.setenv("FLASHDECODE_GLUON", value)
        assert launch.gluon_mode() == mode
        assert launch.gluon_plan(p) is None  # a CPU tensor
    monkeypatch.setenv("FLASHDECODE_GLUON", "yes")
    with pytest.raises(ValueError, match="FLASHDECODE_GLUON"):
        launch.gluon_plan(p)


@pytest.mark.parametrize("batch, heads, kv_heads, keys, page_size, preferred", [
    # Every paged cache; a contiguous one where each program has an SM of its own (132 SMs) and
    # at most 64 key tiles (B=1 L=131072: 16 splits of 128 tiles).
    (1, 32, 8, 32768, 16, True),
    (16, 32, 32, 4096, 16, True),
    (64, 9, 3, 2048, 16, True),
    (32, 32, 1, 8192, 16, True),
    (1, 32, 8, 131072, 16, True),
    (1, 32, 8, 4096, None, True),
    (32, 32, 1, 8192, None, True),
    (8, 32, 8, 8192, None, True),
    (132, 4, 1, 4096, None, True),  # 132 programs of 64 tiles: at both limits
    (133, 4, 1, 4096, None, False),
    (1, 32, 8, 131072, None, False),
    (64, 9, 3, 2048, None, False),
    (16, 32, 32, 4096, None, False),
])
def test_gluon_preferred(batch, heads, kv_heads, keys, page_size, preferred):
    launch = _launch()
    p = _meta_problem(batch, heads, kv_heads, keys, page_size, head_dim=64 if heads == 9 else 128)
    assert launch.gluon_preferred(p, launch.gluon_launch_plan(p, 132)) is preferred


@pytest.mark.parametrize("batch, heads, kv_heads, keys, page_size, head_dim, plan", [
    # (block_n, stages, splits) on 132 SMs: the split count of the Triton kernel's contiguous plan;
    # 4 stages where every program has an SM and at least 8 tiles, else 2 for splits of at most 4
    # tiles, 3 otherwise.
    (1, 32, 8, 32768, None, 128, (64, 4, 16)),
    (1, 32, 8, 4096, None, 128, (64, 2, 16)),
    (8, 32, 8, 8192, None, 128, (64, 4, 2)),
    (32, 32, 1, 8192, None, 128, (64, 4, 4)),
    (64, 9, 3, 2048, None, 64, (128, 3, 1)),
    (16, 32, 32, 4096, None, 128, (64, 3, 4)),
    (128, 32, 8, 2048, None, 128, (64, 3, 1)),
    # A paged cache (pages of 16 slots) gets the plan of the contiguous one.
    (1, 32, 8, 32768, 16, 128, (64, 4, 16)),
    (64, 9, 3, 2048, 16, 64, (128, 3, 1)),
])
def test_gluon_launch_plan(batch, heads, kv_heads, keys, page_size, head_dim, plan):
    got = _launch().gluon_launch_plan(_meta_problem(batch, heads, kv_heads, keys, page_size, head_dim=head_dim), 132)
    assert (got.block_n, got.num_stages, got.splits) == plan
