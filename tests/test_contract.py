"""Contract tests for `flashdecode.flash_attn_with_kvcache` against the float64 brute force.

Every case draws fresh random inputs from its seed. Paged cases use a shuffled block pool whose
unused pages (and unused slots of used pages) hold large garbage; each paged case may also run a
contiguous twin holding the same logical cache. Low-precision outputs follow FlashAttention's rule:
max |out - oracle| <= 3 * max |out_pt - oracle| + 1e-4, where out_pt is plain PyTorch attention in
the same dtype (``lowp_attention`` below); fp32 must match within 1e-4.

Backends: the reference (PyTorch) path runs a broad grid; the Triton path runs, in the
interpreter on CPU (marked ``interpreter``), a smaller grid that still covers every feature, and
the broad grid when FLASHDECODE_TEST_DEVICE=cuda.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
import torch

from conftest import TEST_DEVICE, make_generator, set_backend
from oracle import oracle

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GARBAGE_SCALE, GARBAGE_SHIFT = 30.0, 7.0


def _op():
    from flashdecode import flash_attn_with_kvcache

    return flash_attn_with_kvcache


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    seed: int
    dtype: str = "fp16"
    B: int = 2
    H: int = 4
    Hk: int = 2
    D: int = 32
    page: int | None = None  # None = contiguous cache
    qlayout: str = "padded"  # "padded" (B, Sq, H, D) | "varlen" (cu_seqlens_q)
    Sq: int = 1  # padded: every sequence; varlen: the maximum
    append: str | None = None  # None | "padded" (B, S_new, Hk, D) | "packed" (cu_seqlens_k_new)
    S_new: int = 1  # padded: every sequence; packed: the maximum
    seqlens: str = "tensor"  # "tensor" | "int" | "none"
    max_len: int = 24  # bound on the existing cache length
    leftpad: bool = False
    batch_idx: bool = False
    rot: float = 0.0  # rotary_dim as a fraction of D
    interleaved: bool = True
    rotary_seqlens: bool = False
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # None | "H" | "BH"
    scale: float | None = None
    lse: bool = True
    strided: bool = False  # caches are head-sliced views of a larger tensor
    twin: bool = False  # paged: also run the contiguous twin
    zero_len: bool = False  # varlen / packed: allow sequences with 0 queries / 0 new keys
    min_len: int = 0
    strided_qkv: bool = False  # q, k, v are head-sliced views (like slices of a fused qkv projection)
    qscale: float = 1.0  # magnitude of q (large values stress the softmax's stability)
    no_max_seqlen: bool = False  # varlen: leave max_seqlen_q as None
    dup_rows: bool = False  # cache_batch_idx repeats a row (read-only: no append)
    leftpad_from: float = 0.0  # leftpad drawn in [leftpad_from * seqlens, seqlens]

    @property
    def id(self) -> str:
        parts = [f"s{self.seed}", self.dtype, f"B{self.B}H{self.H}k{self.Hk}D{self.D}"]
        parts.append(f"p{self.page}" if self.page else "contig")
        parts.append(f"q{self.qlayout[0]}{self.Sq}")
        if self.append:
            parts.append(f"app{self.append[:3]}{self.S_new}")
        parts.append(f"sl{self.seqlens}")
        for flag, name in [
            (self.leftpad, "lpad"),
            (self.batch_idx, "bidx"),
            (self.causal, "causal"),
            (self.rotary_seqlens, "rseq"),
            (self.strided, "strided"),
            (self.twin, "twin"),
            (self.zero_len, "zero"),
            (not self.lse, "nolse"),
            (self.strided_qkv, "sqkv"),
            (self.no_max_seqlen, "nomaxq"),
            (self.dup_rows, "duprows"),
        ]:
            if flag:
                parts.append(name)
        if self.rot:
            parts.append(f"rot{self.rot}{'i' if self.interleaved else 'n'}")
        if self.window != (-1, -1):
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap}")
        if self.alibi:
            parts.append(f"alibi{self.alibi}")
        if self.scale is not None:
            parts.append(f"sc{self.scale}")
        if self.qscale != 1.0:
            parts.append(f"qx{self.qscale}")
        return "-".join(parts)


def random_case(seed: int) -> Case:
    r = random.Random(seed * 7919 + 17)
    kind = r.choice(["mha", "gqa", "mqa"])
    H, Hk = {"mha": (r.choice([1, 2, 3]),) * 2, "gqa": r.choice([(4, 2), (6, 2), (6, 3), (8, 2)]), "mqa": (r.choice([2, 4]), 1)}[kind]
    page = r.choice([None, None, None, 1, 3, 5, 16, 256])
    append = r.choice([None, "padded", "packed", "padded"])
    seqlens = r.choice(["tensor", "tensor", "tensor", "int", "none"])
    if seqlens == "none":
        append = None
    rot = r.choice([0.0, 0.5, 1.0]) if append else 0.0
    causal = r.random() < 0.5
    window = (-1, -1)
    if r.random() < 0.3:
        window = (r.choice([-1, 0, 1, 3, 7]), r.choice([-1, 0, 2, 5]))
    qlayout = r.choice(["padded", "padded", "varlen"])
    B = r.choice([1, 2, 3])
    if page == 256 or seqlens == "none":
        B = min(B, 2)
    return Case(
        seed=seed,
        dtype=r.choice(["fp32", "fp16", "bf16"]),
        B=B,
        H=H,
        Hk=Hk,
        D=r.choice([16, 32, 64, 80, 96, 128]),
        page=page,
        qlayout=qlayout,
        Sq=r.randint(1, 8),
        append=append,
        S_new=r.randint(1, 8),
        seqlens=seqlens,
        max_len=r.choice([6, 24, 40, 40, 150]),
        leftpad=r.random() < 0.3,
        batch_idx=r.random() < 0.3,
        rot=rot,
        interleaved=r.random() < 0.5,
        rotary_seqlens=bool(rot) and r.random() < 0.2,
        causal=causal,
        window=window,
        softcap=r.choice([0.0, 0.0, 0.0, 2.0, 30.0]),
        alibi=r.choice([None, None, None, "H", "BH"]),
        scale=r.choice([None, None, None, 0.25]),
        lse=r.random() < 0.8,
        strided=r.random() < 0.15,
        twin=page is not None,
        zero_len=(qlayout == "varlen" or append == "packed") and r.random() < 0.2,
        strided_qkv=r.random() < 0.15,
        qscale=r.choice([1.0, 1.0, 1.0, 1.0, 6.0]),
        no_max_seqlen=qlayout == "varlen" and r.random() < 0.3,
    )


# Hand-picked cases: every feature at least once; the Triton interpreter grid is this list.
FEATURE_CASES = [
    # decode, MHA, contiguous, fp32
    Case(1001, "fp32", B=2, H=2, Hk=2, D=32),
    # GQA decode with append + full rotary interleaved, causal, fp16, page 16 shuffled + twin
    Case(1002, "fp16", B=3, H=4, Hk=2, D=64, page=16, append="padded", S_new=1, rot=1.0, causal=True, twin=True, max_len=40),
    # MQA, bf16, page 1, speculative Sq=4 append 4, half rotary non-interleaved, causal, leftpad, int seqlens
    Case(1003, "bf16", B=2, H=4, Hk=1, D=80, page=1, Sq=4, append="padded", S_new=4, rot=0.5, interleaved=False,
         causal=True, leftpad=True, seqlens="int", twin=True, min_len=3),
    # page 3, batch_idx with paging, window + softcap, D=96, varlen q
    Case(1004, "fp16", B=3, H=6, Hk=3, D=96, page=3, qlayout="varlen", Sq=5, window=(3, 1), softcap=5.0,
         batch_idx=True, twin=True),
    # page 256, packed append (varlen new keys), varlen q, rotary_seqlens, alibi (B, H), lse off
    Case(1005, "bf16", B=2, H=4, Hk=2, D=32, page=256, qlayout="varlen", Sq=3, append="packed", S_new=3, rot=1.0,
         interleaved=False, rotary_seqlens=True, causal=True, alibi="BH", lse=False),
    # None seqlens (full capacity), alibi (H,), explicit scale, strided contiguous cache
    Case(1006, "fp32", B=2, H=3, Hk=3, D=16, seqlens="none", alibi="H", scale=0.3, strided=True, Sq=2, max_len=12),
    # prefill-ish: Sq=8 append 8 causal, leftpad + batch_idx contiguous, rotary 0.5 interleaved, window left
    Case(1007, "fp16", B=2, H=2, Hk=1, D=64, Sq=8, append="padded", S_new=8, causal=True, window=(5, -1), rot=0.5,
         leftpad=True, batch_idx=True, max_len=12),
    # non-causal Sq>1 with rotary (queries at a fixed position), padded q + packed k, strided paged
    Case(1008, "fp32", B=2, H=4, Hk=2, D=32, page=16, Sq=3, append="packed", S_new=4, rot=1.0, strided=True, twin=True),
    # empty rows: Sq > Sk with causal (rows with no key), leftpad == seqlens, zero-length varlen
    Case(1009, "fp16", B=3, H=2, Hk=2, D=16, qlayout="varlen", Sq=6, append="packed", S_new=2, causal=True,
         leftpad=True, max_len=3, zero_len=True),
    # bf16 GQA, leftpad + batch_idx + paging + append + window both sides + softcap + alibi
    Case(1010, "bf16", B=3, H=8, Hk=2, D=128, page=3, Sq=2, append="padded", S_new=2, leftpad=True, batch_idx=True,
         window=(4, 2), softcap=30.0, alibi="H", twin=True),
    # D=80 fp32 page 1 with None seqlens
    Case(1011, "fp32", B=1, H=2, Hk=1, D=80, page=1, seqlens="none", Sq=3, causal=True, max_len=9),
    # int seqlens, window (0, 0) (only the diagonal), fp16 D=96 rotary interleaved half
    Case(1012, "fp16", B=2, H=3, Hk=1, D=96, seqlens="int", Sq=3, append="padded", S_new=2, rot=0.5, window=(0, 0)),
]

RANDOM_CASES = [random_case(s) for s in range(500)]
EXTRA_CASES = [
    # a longer chunk through the same op (chunked prefill)
    Case(2001, "bf16", B=2, H=4, Hk=2, D=32, Sq=20, append="padded", S_new=20, causal=True, rot=1.0, max_len=16),
    Case(2002, "fp16", B=2, H=2, Hk=1, D=32, page=3, qlayout="varlen", Sq=16, append="packed", S_new=16,
         causal=True, window=(9, 0), twin=True, max_len=16),
    # prefill of 64 tokens into a paged cache, chunked on top of an existing prefix
    Case(2003, "bf16", B=1, H=4, Hk=2, D=64, page=16, Sq=64, append="padded", S_new=64, causal=True, rot=1.0,
         interleaved=False, max_len=40, min_len=30, twin=True),
    # head dim 256, and large GQA groups (8 and 16 query heads per KV head)
    Case(2004, "fp16", B=2, H=8, Hk=1, D=256, page=16, Sq=2, append="padded", S_new=2, causal=True, rot=0.5),
    Case(2005, "bf16", B=1, H=16, Hk=2, D=64, Sq=3, qlayout="varlen", append="packed", S_new=3, causal=True,
         softcap=0.5, alibi="H", max_len=40),
    Case(2006, "fp32", B=2, H=16, Hk=1, D=256, Sq=1, append="padded", S_new=1, rot=1.0, max_len=40),
    # repeated cache rows (two sequences reading the same row), with paging
    Case(2007, "fp16", B=3, H=4, Hk=2, D=32, page=5, batch_idx=True, dup_rows=True, leftpad=True, Sq=2,
         causal=True, twin=True),
    Case(2008, "bf16", B=2, H=2, Hk=2, D=32, batch_idx=True, dup_rows=True, seqlens="none", Sq=2, max_len=20),
    # q, k, v as strided views, huge q magnitude, rotary_seqlens without causal
    Case(2009, "fp16", B=2, H=4, Hk=2, D=64, page=3, Sq=3, append="padded", S_new=3, rot=1.0, rotary_seqlens=True,
         strided_qkv=True, qscale=12.0, twin=True),
    Case(2010, "bf16", B=3, H=6, Hk=2, D=80, qlayout="varlen", Sq=4, append="packed", S_new=4, strided_qkv=True,
         window=(-1, 2), no_max_seqlen=True, leftpad=True),
    # many query rows per KV group, not a multiple of any tile (33 positions x 3 heads)
    Case(2011, "fp16", B=2, H=6, Hk=2, D=32, Sq=33, append="padded", S_new=33, causal=True, page=16, max_len=70,
         twin=True),
    # very uneven lengths in one batch: an empty sequence next to a long one
    Case(2012, "bf16", B=3, H=4, Hk=2, D=64, page=16, Sq=2, append="packed", S_new=2, zero_len=True, causal=True,
         max_len=300, min_len=0, leftpad=True),
]

REF_CASES = FEATURE_CASES + EXTRA_CASES + RANDOM_CASES
# The interpreter is slow: on CPU the Triton path takes the hand-picked and extra cases plus a slice
# of the random ones (every feature is in FEATURE_CASES); on CUDA it takes the whole grid.
TRITON_CASES = REF_CASES if TEST_DEVICE == "cuda" else FEATURE_CASES + EXTRA_CASES + RANDOM_CASES[:200]


# --------------------------------------------------------------------------------------------
# Input construction
# --------------------------------------------------------------------------------------------


@dataclass
class Built:
    kw: dict  # keyword arguments for the op (all of them)
    base_k: torch.Tensor  # the storage the caches view (same as the caches unless strided)
    base_v: torch.Tensor
    meta: dict = field(default_factory=dict)


def build(case: Case, device, *, garbage_nan: bool = False) -> Built:
    r = random.Random(case.seed)
    g = make_generator(case.seed)
    dt = DTYPES[case.dtype]
    B, H, Hk, D = case.B, case.H, case.Hk, case.D

    def rn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dt)

    lo_q = 0 if case.zero_len else 1
    sq = [r.randint(lo_q, case.Sq) for _ in range(B)] if case.qlayout == "varlen" else [case.Sq] * B
    if case.append is None:
        n = [0] * B
    elif case.append == "padded":
        n = [case.S_new] * B
    else:
        n = [r.randint(0 if case.zero_len else 1, case.S_new) for _ in range(B)]

    page = case.page
    if case.seqlens == "none":
        assert case.append is None
        want = r.randint(max(1, case.min_len), max(1, case.max_len))
        nblk = -(-want // page) if page else None
        capacity = nblk * page if page else want
        L = [capacity] * B
    else:
        if case.seqlens == "int":
            L = [r.randint(case.min_len, case.max_len)] * B
        else:
            L = [r.randint(case.min_len, case.max_len) for _ in range(B)]
        need = max(max(L[b] + n[b] for b in range(B)), 1)
        if page:
            nblk = -(-need // page) + r.randint(0, 1)
            capacity = nblk * page
        else:
            capacity = need + r.randint(0, 3)
    lp = [r.randint(int(case.leftpad_from * L[b]), L[b]) if case.leftpad else 0 for b in range(B)]
    nrows = B + (2 if case.batch_idx else 0)
    rows = torch.randperm(nrows, generator=g)[:B].tolist() if case.batch_idx else list(range(B))
    if case.dup_rows:
        assert case.batch_idx and case.append is None and B >= 2
        rows[1] = rows[0]

    Hk_alloc = Hk + (1 if case.strided else 0)
    if page:
        num_blocks = nrows * nblk + r.randint(2, 4)
        shape = (num_blocks, page, Hk_alloc, D)
    else:
        shape = (nrows, capacity, Hk_alloc, D)
    if garbage_nan:
        base_k = torch.full(shape, float("nan"), dtype=dt)
        base_v = torch.full(shape, float("nan"), dtype=dt)
    else:
        base_k = rn(*shape, scale=GARBAGE_SCALE, shift=GARBAGE_SHIFT)
        base_v = rn(*shape, scale=GARBAGE_SCALE, shift=-GARBAGE_SHIFT)
    if page:
        pool = torch.randperm(num_blocks, generator=g)
        bt = pool[: nrows * nblk].view(nrows, nblk).to(torch.int32)
        bt_list = bt.tolist()

        def loc(row, t):
            return bt_list[row][t // page], t % page

    else:
        bt = None
        bt_list = None

        def loc(row, t):
            return row, t

    # Existing keys: normal random data in [leftpad, seqlens); the slots the append will write
    # keep their (non-zero, large) garbage so a missing write is visible.
    for b in range(B):
        for t in range(lp[b], L[b]):
            p, o = loc(rows[b], t)
            base_k[p, o, :Hk] = rn(Hk, D)
            base_v[p, o, :Hk] = rn(Hk, D)
        if garbage_nan:  # the slots to be written must hold finite data for the NaN test too
            for t in range(L[b], L[b] + n[b]):
                p, o = loc(rows[b], t)
                base_k[p, o, :Hk] = rn(Hk, D, scale=GARBAGE_SCALE)
                base_v[p, o, :Hk] = rn(Hk, D, scale=GARBAGE_SCALE)
    base_k = base_k.to(device)
    base_v = base_v.to(device)
    k_cache = base_k[:, :, :Hk] if case.strided else base_k
    v_cache = base_v[:, :, :Hk] if case.strided else base_v

    extra_h = 1 if case.strided_qkv else 0
    if case.qlayout == "varlen":
        q = rn(sum(sq), H + extra_h, D, scale=case.qscale).to(device)[:, :H]
        cu_q = torch.tensor([0] + list(_cumsum(sq)), dtype=torch.int32, device=device)
        max_sq = None if case.no_max_seqlen else max(sq)
    else:
        q = rn(B, case.Sq, H + extra_h, D, scale=case.qscale).to(device)[:, :, :H]
        cu_q = None
        max_sq = None

    k = v = cu_k = None
    if case.append:
        lead = (B, case.S_new) if case.append == "padded" else (sum(n),)
        if case.strided_qkv:  # k and v interleaved in one tensor, like a fused kv projection
            kv = rn(*lead, 2 * Hk, D).to(device)
            k, v = kv[..., :Hk, :], kv[..., Hk:, :]
        else:
            k = rn(*lead, Hk, D).to(device)
            v = rn(*lead, Hk, D).to(device)
        if case.append == "packed":
            cu_k = torch.tensor([0] + list(_cumsum(n)), dtype=torch.int32, device=device)

    if case.seqlens == "tensor":
        seqlens_arg = torch.tensor(L, dtype=torch.int32, device=device)
    elif case.seqlens == "int":
        seqlens_arg = L[0]
    else:
        seqlens_arg = None

    rd = 0
    cos = sin = rseq = None
    rbase = list(L)
    if case.rot:
        rd = D if case.rot == 1.0 else (int(D * case.rot) // 2) * 2
        if case.rotary_seqlens:
            rbase = [r.randint(0, capacity) for _ in range(B)]
            rseq = torch.tensor(rbase, dtype=torch.int32, device=device)
        seqlen_ro = max(capacity, max(rbase)) + max(case.Sq, case.S_new) + 1
        ang = torch.randn(seqlen_ro, rd // 2, generator=g) * 2.0
        cos = ang.cos().to(dt).to(device)
        sin = ang.sin().to(dt).to(device)

    alibi = None
    if case.alibi == "H":
        alibi = (torch.rand(H, generator=g) * 0.5 + 0.05).to(device)
    elif case.alibi == "BH":
        alibi = (torch.rand(B, H, generator=g) * 0.5 + 0.05).to(device)

    kw = dict(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        k=k,
        v=v,
        rotary_cos=cos,
        rotary_sin=sin,
        cache_seqlens=seqlens_arg,
        cache_batch_idx=torch.tensor(rows, dtype=torch.int32, device=device) if case.batch_idx else None,
        cache_leftpad=torch.tensor(lp, dtype=torch.int32, device=device) if case.leftpad else None,
        block_table=bt.to(device) if bt is not None else None,
        softmax_scale=case.scale,
        causal=case.causal,
        window_size=case.window,
        softcap=case.softcap,
        rotary_interleaved=case.interleaved,
        alibi_slopes=alibi,
        cu_seqlens_q=cu_q,
        max_seqlen_q=max_sq,
        cu_seqlens_k_new=cu_k,
        rotary_seqlens=rseq,
    )
    meta = dict(sq=sq, n=n, L=L, lp=lp, rows=rows, rbase=rbase, rd=rd, bt=bt_list, page=page, nrows=nrows,
                capacity=capacity)
    return Built(kw=kw, base_k=base_k, base_v=base_v, meta=meta)


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s


def call_op(kw: dict, *, num_splits: int = 0, return_lse: bool = True):
    """Call with FlashAttention 2.8's positional order for the positional part of the signature."""
    res = _op()(
        kw["q"], kw["k_cache"], kw["v_cache"], kw["k"], kw["v"], kw["rotary_cos"], kw["rotary_sin"],
        kw["cache_seqlens"], kw["cache_batch_idx"], kw["cache_leftpad"], kw["block_table"], kw["softmax_scale"],
        kw["causal"], kw["window_size"], kw["softcap"], kw["rotary_interleaved"], kw["alibi_slopes"], num_splits,
        return_lse,
        cu_seqlens_q=kw["cu_seqlens_q"], max_seqlen_q=kw["max_seqlen_q"], cu_seqlens_k_new=kw["cu_seqlens_k_new"],
        rotary_seqlens=kw["rotary_seqlens"],
    )
    if return_lse:
        assert isinstance(res, tuple) and len(res) == 2, "return_softmax_lse=True must return (out, lse)"
        return res
    assert isinstance(res, torch.Tensor), "return_softmax_lse=False must return a tensor"
    return res, None


def oracle_of(kw: dict):
    return oracle(**kw)


def clone_kw(kw: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


# --------------------------------------------------------------------------------------------
# Plain PyTorch attention in the inputs' own low precision (FlashAttention's "out_pt")
# --------------------------------------------------------------------------------------------


def _rot_lowp(x, cos, sin, interleaved):
    rd = 2 * cos.shape[-1]
    xr, rest = x[..., :rd], x[..., rd:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        o = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
        o = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((o, rest), dim=-1)


def lowp_attention(built: Built, orc, dt):
    """Plain attention computed in dtype dt on CPU: rotary, scores, softcap, alibi, softmax, P@V.

    Keys come from the oracle's expected cache rounded to dt (what a correct op stores)."""
    kw, m = built.kw, built.meta
    q = kw["q"].cpu()
    K = orc.k_cache.to(dt)
    V = orc.v_cache
    H, D = q.shape[-2], q.shape[-1]
    Hk = K.shape[2]
    group = H // Hk
    scale = D ** -0.5 if kw["softmax_scale"] is None else kw["softmax_scale"]
    left, right = kw["window_size"]
    per_pos = kw["causal"] or left >= 0 or right >= 0
    if kw["causal"]:
        right = 0
    cos = kw["rotary_cos"].cpu() if kw["rotary_cos"] is not None else None
    sin = kw["rotary_sin"].cpu() if kw["rotary_sin"] is not None else None
    alibi = kw["alibi_slopes"].cpu() if kw["alibi_slopes"] is not None else None
    varlen = kw["cu_seqlens_q"] is not None
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((H, q.shape[0]) if varlen else (q.shape[0], H, q.shape[1]), math.inf, dtype=torch.float64)
    start = 0
    for b in range(len(m["sq"])):
        Sq = m["sq"][b]
        qb = q[start : start + Sq] if varlen else q[b]
        Sk = m["L"][b] + m["n"][b] - m["lp"][b]
        pages, offs = [], []
        for jj in range(Sk):
            t = m["lp"][b] + jj
            if m["page"]:
                pages.append(m["bt"][m["rows"][b]][t // m["page"]])
                offs.append(t % m["page"])
            else:
                pages.append(m["rows"][b])
                offs.append(t)
        if Sq == 0:
            continue
        if Sk > 0:
            Kb = K[pages, offs].repeat_interleave(group, dim=1)  # (Sk, H, D)
            Vb = V[pages, offs].repeat_interleave(group, dim=1)
        else:
            Kb = torch.zeros(0, H, D, dtype=dt)
            Vb = torch.zeros(0, H, D, dtype=dt)
        if m["rd"]:
            pos = torch.arange(Sq) + m["rbase"][b] if per_pos else torch.full((Sq,), m["rbase"][b])
            qb = _rot_lowp(qb, cos[pos][:, None, :], sin[pos][:, None, :], kw["rotary_interleaved"])
        s = torch.einsum("ihd,jhd->hij", qb * scale, Kb)  # (H, Sq, Sk) in dt
        if kw["softcap"] > 0:
            s = torch.tanh(s / kw["softcap"]) * kw["softcap"]
        i = torch.arange(Sq)[:, None]
        j = torch.arange(Sk)[None, :]
        diag = i + Sk - Sq
        if alibi is not None:
            sl = alibi if alibi.dim() == 1 else alibi[b]
            s = s - sl.to(dt)[:, None, None] * (diag - j).abs().to(dt)[None]
        vis = torch.ones(Sq, Sk, dtype=torch.bool)
        if left >= 0:
            vis &= j >= diag - left
        if right >= 0:
            vis &= j <= diag + right
        s = s.masked_fill(~vis[None], -math.inf)
        ls = torch.logsumexp(s, dim=-1)  # (H, Sq) in dt
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        ob = torch.einsum("hij,jhd->ihd", p, Vb)
        empty = ~vis.any(dim=-1)  # (Sq,)
        ob[empty] = 0
        ls = ls.to(torch.float64)
        ls[:, empty] = math.inf
        if varlen:
            out[start : start + Sq] = ob.to(torch.float64)
            lse[:, start : start + Sq] = ls
        else:
            out[b] = ob.to(torch.float64)
            lse[b] = ls
        start += Sq
    return out, lse


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def check_out_lse(case_id, dt, out, lse, orc, pt, *, lse_expected: bool):
    ref_out, ref_lse = orc.out, orc.lse
    out_pt, lse_pt = pt
    assert out.dtype == dt, f"{case_id}: out dtype {out.dtype} != q dtype {dt}"
    assert tuple(out.shape) == tuple(ref_out.shape), f"{case_id}: out shape {tuple(out.shape)} != {tuple(ref_out.shape)}"
    o = out.detach().cpu().to(torch.float64)
    assert torch.isfinite(o).all(), f"{case_id}: non-finite output"
    err = (o - ref_out).abs().max().item() if o.numel() else 0.0
    if dt == torch.float32:
        bound = 1e-4
    else:
        err_pt = (out_pt - ref_out).abs().max().item() if o.numel() else 0.0
        bound = 3 * err_pt + 1e-4
    assert err <= bound, f"{case_id}: max |out - oracle| = {err:.3g} > bound {bound:.3g}"
    if not lse_expected:
        return
    assert lse.dtype == torch.float32, f"{case_id}: lse dtype {lse.dtype}, want float32"
    assert tuple(lse.shape) == tuple(ref_lse.shape), f"{case_id}: lse shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}"
    ls = lse.detach().cpu().to(torch.float64)
    ref_inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isposinf(ls), ref_inf), (
        f"{case_id}: lse +inf pattern differs (empty rows): got {torch.isposinf(ls).nonzero().tolist()} "
        f"want {ref_inf.nonzero().tolist()}")
    fin = ~ref_inf
    if fin.any():
        lerr = (ls[fin] - ref_lse[fin]).abs().max().item()
        assert math.isfinite(lerr), f"{case_id}: non-finite lse on a non-empty row"
        if dt == torch.float32:
            lbound = 1e-4 + 1e-5 * ref_lse[fin].abs().max().item()
        else:
            lbound = 3 * (lse_pt[fin] - ref_lse[fin]).abs().max().item() + 1e-3
        assert lerr <= lbound, f"{case_id}: max |lse - oracle| = {lerr:.3g} > bound {lbound:.3g}"


def k_tolerance(dt):
    eps = torch.finfo(dt).eps
    return (2 * eps, 2 * eps) if dt != torch.float32 else (4 * eps, 1e-5)


def check_caches(case_id, built: Built, before: dict, orc, Hk: int):
    """V bitwise; K within rounding where written; every other slot (and the view's surroundings) untouched."""
    kc, vc = built.kw["k_cache"], built.kw["v_cache"]
    kc_now, vc_now = kc.detach().cpu(), vc.detach().cpu()
    written = orc.written
    # v: exact everywhere (unwritten = before; written = the new values)
    assert bit_equal(vc_now, orc.v_cache), (
        f"{case_id}: v_cache differs from expected at {_diff_where(vc_now, orc.v_cache)}")
    # k: unwritten slots bit-identical
    assert bit_equal(kc_now[~written], before["k_cache"].cpu()[~written]), f"{case_id}: k_cache modified outside the append"
    if written.any():
        got = kc_now[written].to(torch.float64)
        exp = orc.k_cache[written]
        rtol, atol = k_tolerance(kc.dtype)
        bad = (got - exp).abs() > atol + rtol * exp.abs()
        assert not bad.any(), (
            f"{case_id}: appended k differs beyond rounding: max err {(got - exp).abs().max().item():.3g}, "
            f"{int(bad.sum())} elements")
    if built.base_k.shape != kc.shape:  # strided view: the rest of the storage is untouched
        assert bit_equal(built.base_k[:, :, Hk:], before["base_k_rest"]), f"{case_id}: wrote outside the k_cache view"
        assert bit_equal(built.base_v[:, :, Hk:], before["base_v_rest"]), f"{case_id}: wrote outside the v_cache view"


def _diff_where(a, b):
    d = (bits(a) != bits(b)).nonzero()
    return d[:5].tolist()


def snapshot(built: Built, Hk: int) -> dict:
    snap = clone_kw(built.kw)
    snap["base_k_rest"] = built.base_k[:, :, Hk:].clone()
    snap["base_v_rest"] = built.base_v[:, :, Hk:].clone()
    return snap


def check_inputs_unchanged(case_id, built: Built, before: dict):
    for name in ["q", "k", "v", "cache_seqlens", "cache_batch_idx", "cache_leftpad", "block_table", "rotary_cos",
                 "rotary_sin", "alibi_slopes", "cu_seqlens_q", "cu_seqlens_k_new", "rotary_seqlens"]:
        a = built.kw[name]
        if isinstance(a, torch.Tensor):
            assert bit_equal(a, before[name]), f"{case_id}: input {name} was modified by the op"


def contiguous_twin(built: Built) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous cache (rows, capacity, Hk, D) holding the same logical slots as the paged one."""
    m = built.meta
    kc, vc = built.kw["k_cache"], built.kw["v_cache"]
    idx = torch.tensor(m["bt"], dtype=torch.long, device=kc.device)  # (rows, nblk)
    tk = kc[idx].flatten(1, 2).contiguous()  # (rows, nblk * page, Hk, D)
    tv = vc[idx].flatten(1, 2).contiguous()
    return tk, tv


def close_pair(case_id, what, a, b, dt):
    a = a.detach().cpu().to(torch.float64)
    b = b.detach().cpu().to(torch.float64)
    assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{case_id}: {what}: inf pattern differs"
    fin = torch.isfinite(a) & torch.isfinite(b)
    eps = torch.finfo(dt).eps if dt != torch.float32 else 1e-6
    tol = 4 * eps * (1 + b[fin].abs())
    err = (a[fin] - b[fin]).abs()
    assert (err <= tol).all(), f"{case_id}: {what}: differ by up to {err.max().item():.3g}"


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def run_case(case: Case, device, *, twin_allowed=True):
    dt = DTYPES[case.dtype]
    built = build(case, device)
    before = snapshot(built, case.Hk)
    orc = oracle_of(clone_kw(built.kw))
    twin_in = contiguous_twin(built) if (case.page and case.twin and twin_allowed) else None

    out, lse = call_op(built.kw, return_lse=case.lse)
    pt = lowp_attention(built, orc, dt) if dt != torch.float32 else (None, None)
    check_out_lse(case.id, dt, out, lse, orc, pt, lse_expected=case.lse)
    check_caches(case.id, built, before, orc, case.Hk)
    check_inputs_unchanged(case.id, built, before)

    if twin_in is not None:
        tkw = dict(before)
        for key in ("base_k_rest", "base_v_rest"):
            tkw.pop(key)
        tkw["k_cache"], tkw["v_cache"] = twin_in
        tkw["block_table"] = None
        t_out, t_lse = call_op(tkw, return_lse=case.lse)
        check_out_lse(case.id + "[twin]", dt, t_out, t_lse, orc, pt, lse_expected=case.lse)
        close_pair(case.id, "paged vs contiguous twin out", out, t_out, dt)
        if case.lse:
            close_pair(case.id, "paged vs contiguous twin lse", lse, t_lse, torch.float32)
        # the twin's cache after the append holds the same logical contents as the paged one
        paged_view_k, paged_view_v = contiguous_twin(built)
        assert bit_equal(tkw["v_cache"], paged_view_v), f"{case.id}: twin v_cache differs from the paged v_cache"
        close_pair(case.id, "twin k_cache vs paged k_cache", tkw["k_cache"], paged_view_k, dt)
    return out, lse


@pytest.mark.parametrize("case", REF_CASES, ids=lambda c: c.id)
def test_contract_reference(case, device, monkeypatch):
    set_backend(monkeypatch, "reference")
    run_case(case, device)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.id)
def test_contract_triton(case, device, monkeypatch):
    set_backend(monkeypatch, "triton")
    run_case(case, device)


# num_splits is a hint: 0 (heuristic), 1 (no split) and 3 agree within rounding; long enough
# sequences that a split kernel really splits.
SPLIT_CASES = [
    Case(3001, "fp16", B=2, H=4, Hk=2, D=32, page=16, Sq=1, append="padded", S_new=1, rot=1.0, causal=True,
         max_len=90, min_len=60),
    Case(3002, "bf16", B=2, H=2, Hk=1, D=64, qlayout="varlen", Sq=3, append="packed", S_new=3, causal=True,
         leftpad=True, softcap=10.0, max_len=90, min_len=50),
    Case(3003, "fp32", B=1, H=4, Hk=4, D=16, page=3, Sq=2, window=(40, 0), alibi="H", max_len=100, min_len=70),
    Case(3004, "bf16", B=2, H=8, Hk=2, D=128, page=16, Sq=1, append="padded", S_new=1, causal=True, leftpad=True,
         max_len=420, min_len=300),
    Case(3005, "fp16", B=3, H=4, Hk=1, D=64, Sq=4, qlayout="varlen", append="packed", S_new=4, causal=True,
         rot=0.5, interleaved=False, max_len=500, min_len=200),
    # a small window on a long sequence: most splits see no key at all
    Case(3006, "fp16", B=2, H=4, Hk=2, D=32, page=16, Sq=3, append="padded", S_new=1, causal=True, window=(8, 0),
         max_len=400, min_len=300),
    # leftpad near the end of a long sequence (leading splits empty); rows with no key (Sq > Sk)
    Case(3007, "bf16", B=2, H=2, Hk=1, D=64, Sq=6, causal=True, leftpad=True, max_len=400, min_len=380, alibi="BH",
         leftpad_from=0.97),
]


SPLITS = (1, 0, 3, 17)


def _split_params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


def _run_splits(case, device):
    dt = DTYPES[case.dtype]
    built = build(case, device)
    pristine = clone_kw(built.kw)
    orc = oracle_of(clone_kw(built.kw))
    pt = lowp_attention(built, orc, dt) if dt != torch.float32 else (None, None)
    results = {}
    for ns in SPLITS:
        kw = clone_kw(pristine)
        out, lse = call_op(kw, num_splits=ns, return_lse=True)
        check_out_lse(f"{case.id}[num_splits={ns}]", dt, out, lse, orc, pt, lse_expected=True)
        results[ns] = (out, lse, kw["k_cache"], kw["v_cache"])
    for ns in SPLITS[1:]:
        close_pair(case.id, f"out num_splits={ns} vs 1", results[ns][0], results[1][0], dt)
        close_pair(case.id, f"lse num_splits={ns} vs 1", results[ns][1], results[1][1], torch.float32)
        assert bit_equal(results[ns][3], results[1][3]), f"{case.id}: v_cache differs with num_splits={ns}"
        assert bit_equal(results[ns][2], results[1][2]), f"{case.id}: k_cache differs with num_splits={ns}"


@pytest.mark.parametrize("case", _split_params(SPLIT_CASES))
def test_num_splits_agree_reference(case, device, monkeypatch):
    set_backend(monkeypatch, "reference")
    _run_splits(case, device)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", _split_params(SPLIT_CASES))
def test_num_splits_agree_triton(case, device, monkeypatch):
    set_backend(monkeypatch, "triton")
    _run_splits(case, device)


AGREE_CASES = [FEATURE_CASES[1], FEATURE_CASES[3], FEATURE_CASES[4], FEATURE_CASES[9]]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", _split_params(AGREE_CASES))
def test_backends_agree(case, device, monkeypatch):
    """FLASHDECODE_BACKEND=reference and =triton give the same out, lse and caches (within rounding)."""
    dt = DTYPES[case.dtype]
    built = build(case, device)
    pristine = clone_kw(built.kw)
    res = {}
    for name in ("reference", "triton"):
        set_backend(monkeypatch, name)
        kw = clone_kw(pristine)
        out, lse = call_op(kw, return_lse=True)
        res[name] = (out, lse, kw["k_cache"], kw["v_cache"])
    close_pair(case.id, "out reference vs triton", res["triton"][0], res["reference"][0], dt)
    close_pair(case.id, "lse reference vs triton", res["triton"][1], res["reference"][1], torch.float32)
    assert bit_equal(res["triton"][3], res["reference"][3]), f"{case.id}: v_cache differs between backends"
    close_pair(case.id, "k_cache reference vs triton", res["triton"][2], res["reference"][2], dt)


NAN_CASES = [
    Case(4001, "fp16", B=2, H=4, Hk=2, D=32, page=16, Sq=2, append="padded", S_new=2, causal=True, leftpad=True,
         batch_idx=True, max_len=30),
    Case(4002, "bf16", B=2, H=2, Hk=1, D=64, qlayout="varlen", Sq=3, append="packed", S_new=2, leftpad=True, max_len=20),
]


@pytest.mark.parametrize("case", _split_params(NAN_CASES))
def test_stale_nan_slots_are_never_read(case, backend, device):
    """Slots outside [leftpad, seqlens + S_new), unused pages and unused rows hold NaN (as an
    uninitialised cache may): the result must not depend on them."""
    dt = DTYPES[case.dtype]
    built = build(case, device, garbage_nan=True)
    orc = oracle_of(clone_kw(built.kw))
    out, lse = call_op(built.kw, return_lse=True)
    check_out_lse(case.id, dt, out, lse, orc, lowp_attention(built, orc, dt), lse_expected=True)


# --------------------------------------------------------------------------------------------
# The oracle checked against known answers (no flashdecode needed)
# --------------------------------------------------------------------------------------------


def _sdpa64(q, k, v, scale, mask=None):
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, -1)
    return torch.einsum("hij,jhd->ihd", p, v), torch.logsumexp(s, -1)


def test_oracle_unmasked_equals_softmax_attention():
    g = make_generator(5)
    B, Sq, H, S, D = 2, 3, 4, 7, 8
    q = torch.randn(B, Sq, H, D, generator=g, dtype=torch.float64)
    kc = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    vc = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    res = oracle(q, kc, vc)
    for b in range(B):
        o, l = _sdpa64(q[b], kc[b], vc[b], D ** -0.5)
        torch.testing.assert_close(res.out[b], o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.lse[b], l, rtol=1e-12, atol=1e-12)
    assert not res.written.any()


def test_oracle_hand_computed():
    # one query, two keys, D=2, scale 1: scores 1 and 0 -> weights e/(e+1), 1/(e+1)
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    kc = torch.tensor([[[[1.0, 5.0]], [[0.0, 3.0]]]], dtype=torch.float64)
    vc = torch.tensor([[[[2.0, 0.0]], [[0.0, 4.0]]]], dtype=torch.float64)
    res = oracle(q, kc, vc, softmax_scale=1.0)
    e = math.e
    torch.testing.assert_close(res.out[0, 0, 0], torch.tensor([2 * e / (e + 1), 4 / (e + 1)], dtype=torch.float64))
    assert abs(res.lse[0, 0, 0].item() - math.log(e + 1)) < 1e-12
    # softcap 0.5: s = 0.5 * tanh(2) and 0
    res = oracle(q, kc, vc, softmax_scale=1.0, softcap=0.5)
    s0 = 0.5 * math.tanh(2.0)
    assert abs(res.lse[0, 0, 0].item() - math.log(math.exp(s0) + 1)) < 1e-12
    # alibi slope 2, Sq=1, Sk=2: key 0 at distance 1 -> s0 = 1 - 2, s1 = 0
    res = oracle(q, kc, vc, softmax_scale=1.0, alibi_slopes=torch.tensor([2.0]))
    assert abs(res.lse[0, 0, 0].item() - math.log(math.exp(-1.0) + 1)) < 1e-12
    # window (0, 0): only the last key (diagonal) -> out = v[1], lse = 0
    res = oracle(q, kc, vc, softmax_scale=1.0, window_size=(0, 0))
    torch.testing.assert_close(res.out[0, 0, 0], torch.tensor([0.0, 4.0], dtype=torch.float64))
    assert res.lse[0, 0, 0].item() == 0.0
    # leftpad 2 = seqlens 2: no keys -> 0 and +inf
    res = oracle(q, kc, vc, cache_seqlens=2, cache_leftpad=torch.tensor([2], dtype=torch.int32))
    assert res.out.abs().max().item() == 0.0 and math.isinf(res.lse[0, 0, 0].item())


def test_oracle_masks_and_gqa_match_formula():
    g = make_generator(6)
    Sq, S, H, Hk, D = 4, 9, 6, 2, 8
    q = torch.randn(1, Sq, H, D, generator=g, dtype=torch.float64)
    kc = torch.randn(1, S, Hk, D, generator=g, dtype=torch.float64)
    vc = torch.randn(1, S, Hk, D, generator=g, dtype=torch.float64)
    lp, L = 2, 7
    Sk = L - lp
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Sk)[None, :]
    for causal, win in [(True, (-1, -1)), (False, (1, 1)), (True, (2, -1)), (False, (-1, 0))]:
        res = oracle(q, kc, vc, cache_seqlens=torch.tensor([L]), cache_leftpad=torch.tensor([lp]), causal=causal,
                     window_size=win)
        right = 0 if causal else win[1]
        mask = torch.ones(Sq, Sk, dtype=torch.bool)
        if right >= 0:
            mask &= j <= i + Sk - Sq + right
        if win[0] >= 0:
            mask &= j >= i + Sk - Sq - win[0]
        kk = kc[0, lp:L].repeat_interleave(H // Hk, dim=1)
        vv = vc[0, lp:L].repeat_interleave(H // Hk, dim=1)
        o, l = _sdpa64(q[0], kk, vv, D ** -0.5, mask)
        torch.testing.assert_close(res.out[0], o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.lse[0], l, rtol=1e-12, atol=1e-12)


def test_oracle_rotary_matches_complex_rotation():
    g = make_generator(7)
    D, rd, S = 8, 6, 5
    ang = torch.randn(20, rd // 2, generator=g, dtype=torch.float64)
    cos, sin = ang.cos(), ang.sin()
    q = torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64)
    kc = torch.randn(1, S + 2, 1, D, generator=g, dtype=torch.float64)
    vc = torch.randn(1, S + 2, 1, D, generator=g, dtype=torch.float64)
    knew = torch.randn(1, 2, 1, D, generator=g, dtype=torch.float64)
    vnew = torch.randn(1, 2, 1, D, generator=g, dtype=torch.float64)
    for interleaved in (True, False):
        res = oracle(q, kc, vc, knew, vnew, cos, sin, cache_seqlens=S, rotary_interleaved=interleaved)
        for j in range(2):
            x = knew[0, j, 0]
            if interleaved:
                z = torch.complex(x[0:rd:2], x[1:rd:2]) * torch.polar(torch.ones(rd // 2, dtype=torch.float64), ang[S + j])
                exp = torch.stack((z.real, z.imag), -1).flatten()
            else:
                z = torch.complex(x[: rd // 2], x[rd // 2 : rd]) * torch.polar(torch.ones(rd // 2, dtype=torch.float64), ang[S + j])
                exp = torch.cat((z.real, z.imag))
            torch.testing.assert_close(res.k_cache[0, S + j, 0, :rd], exp)
            torch.testing.assert_close(res.k_cache[0, S + j, 0, rd:], x[rd:])
            assert torch.equal(res.v_cache[0, S + j, 0], vnew[0, j, 0])
        assert res.written[0, S:S + 2].all() and not res.written[0, :S].any()


def test_oracle_paged_equals_contiguous_and_varlen_equals_padded():
    g = make_generator(8)
    B, Sq, H, Hk, D, page, nblk = 2, 2, 2, 1, 4, 3, 3
    q = torch.randn(B, Sq, H, D, generator=g, dtype=torch.float64)
    pool_k = torch.randn(8, page, Hk, D, generator=g, dtype=torch.float64)
    pool_v = torch.randn(8, page, Hk, D, generator=g, dtype=torch.float64)
    bt = torch.randperm(8, generator=g)[: B * nblk].view(B, nblk).int()
    kn = torch.randn(B, 2, Hk, D, generator=g, dtype=torch.float64)
    vn = torch.randn(B, 2, Hk, D, generator=g, dtype=torch.float64)
    sl = torch.tensor([4, 6], dtype=torch.int32)
    paged = oracle(q, pool_k, pool_v, kn, vn, cache_seqlens=sl, block_table=bt, causal=True)
    ck = pool_k[bt.long()].flatten(1, 2)
    cv = pool_v[bt.long()].flatten(1, 2)
    contig = oracle(q, ck, cv, kn, vn, cache_seqlens=sl, causal=True)
    torch.testing.assert_close(paged.out, contig.out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(paged.k_cache[bt.long()].flatten(1, 2), contig.k_cache)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    cuk = torch.tensor([0, 2, 4], dtype=torch.int32)
    var = oracle(q.flatten(0, 1), ck, cv, kn.flatten(0, 1), vn.flatten(0, 1), cache_seqlens=sl, causal=True,
                 cu_seqlens_q=cu, max_seqlen_q=2, cu_seqlens_k_new=cuk)
    torch.testing.assert_close(var.out, contig.out.flatten(0, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var.lse, contig.lse.permute(1, 0, 2).flatten(1), rtol=1e-12, atol=1e-12)


def test_lowp_baseline_is_close_to_oracle():
    """Sanity of the test's own low-precision baseline: it has a small, nonzero error."""
    for case in FEATURE_CASES:
        dt = DTYPES[case.dtype]
        if dt == torch.float32:
            continue
        built = build(case, "cpu")
        orc = oracle_of(clone_kw(built.kw))
        out_pt, lse_pt = lowp_attention(built, orc, dt)
        err = (out_pt - orc.out).abs().max().item()
        assert err < (0.05 if dt == torch.bfloat16 else 0.01), (case.id, err)
        assert torch.equal(torch.isinf(lse_pt), torch.isinf(orc.lse)), case.id


def test_constant_offsets_are_made_once_and_never_written(backend, device):
    """Per-call constants (query/key offsets, zero left-padding) are cached across calls; no call
    may write into them."""
    from flashdecode import flash_attn_with_kvcache
    from flashdecode.attention import ramps

    g = torch.Generator().manual_seed(11)
    q = torch.randn(3, 1, 4, 16, generator=g).to(device)
    k_cache = torch.randn(3, 32, 2, 16, generator=g).to(device)
    v_cache = torch.randn(3, 32, 2, 16, generator=g).to(device)
    k_new = torch.randn(3, 1, 2, 16, generator=g).to(device)
    lens = torch.tensor([5, 0, 30], dtype=torch.int32, device=device)
    first = ramps.ramp(4, 1, q.device)
    for _ in range(2):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=k_new, cache_seqlens=lens, causal=True)
    assert ramps.ramp(4, 1, q.device) is first
    assert first.tolist() == [0, 1, 2, 3]
    assert ramps.ramp(3, 0, q.device).tolist() == [0, 0, 0]
    assert ramps.ramp(4, 0, q.device).tolist() == [0, 0, 0, 0]
