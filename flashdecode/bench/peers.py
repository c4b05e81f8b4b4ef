"""The implementations under test, each built from one shape's inputs, and the fp32 reference.

`make_problems` draws one shape's inputs (several copies when one set would fit in L2; the copies
share lengths, block table and masks, and differ in data). Each `Peer` turns the problems into a
`Built`: a callable `fn(state)` and one state per copy. A peer that cannot run a shape says why:
`unsupported()` returns "n/a: ..." and any exception while building or running becomes
"error: ..." in the table; nothing a peer does may stop the benchmark.

Layouts: flashdecode and FlashInfer read the caches as stored, ``(B, L, Hkv, D)`` or pages of 16
``(num_pages, 16, Hkv, D)`` (the same NHD layout, so the two share one shuffled pool). The PyTorch
peers (naive, SDPA, FlexAttention) get ``(B, H, L, D)`` contiguous copies, their preferred layout,
made once per shape outside the timed region.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from flashdecode.bench.shapes import Shape

PAGE_SIZE = 16


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One set of inputs for one shape (see the module docstring for layouts)."""

    shape: Shape
    device: torch.device
    q: torch.Tensor  # (B, Sq, Hq, D)
    k_cache: torch.Tensor  # (B, Lcap, Hkv, D)
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor  # (B,) int32: keys already in the cache (before any append)
    kv_lens: list[int]  # keys each sequence attends to (after the append)
    kv_lens_t: torch.Tensor  # (B,) int32, same on the device
    block_table: torch.Tensor  # (B, blocks_per_seq) int32, shared by all copies
    page_perm: torch.Tensor  # (B * blocks_per_seq,) int64: pool slot of each in-order page
    scale: float
    k_new: torch.Tensor | None = None  # (B, S_new, Hkv, D) (append kind)
    v_new: torch.Tensor | None = None
    rotary_cos: torch.Tensor | None = None  # (Lcap, D/2), q's dtype
    rotary_sin: torch.Tensor | None = None
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return self.k_cache.shape[1]

    def input_bytes(self) -> int:
        ts = [self.q, self.k_cache, self.v_cache, self.k_new, self.v_new]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def paged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The caches as a shuffled pool of pages of 16 (made once, shared by flashdecode and FlashInfer)."""
        if "paged" not in self._cache:
            self._cache["paged"] = (_to_pages(self.k_cache, self.page_perm), _to_pages(self.v_cache, self.page_perm))
        return self._cache["paged"]

    def bhld(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The caches as (B, Hkv, Lcap, D) contiguous copies (the PyTorch peers' layout)."""
        if "bhld" not in self._cache:
            self._cache["bhld"] = (self.k_cache.transpose(1, 2).contiguous(), self.v_cache.transpose(1, 2).contiguous())
        return self._cache["bhld"]

    def q_bhsd(self) -> torch.Tensor:
        if "q_bhsd" not in self._cache:
            self._cache["q_bhsd"] = self.q.transpose(1, 2).contiguous()
        return self._cache["q_bhsd"]

    def release(self) -> None:
        self._cache.clear()


def _to_pages(cache: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    b, cap, h, d = cache.shape
    nblk = perm.numel() // b
    if cap == nblk * PAGE_SIZE:
        in_order = cache.reshape(b * nblk, PAGE_SIZE, h, d)
    else:
        in_order = cache.new_zeros(b, nblk * PAGE_SIZE, h, d)
        in_order[:, :cap] = cache
        in_order = in_order.view(b * nblk, PAGE_SIZE, h, d)
    pool = torch.empty_like(in_order)
    pool.index_copy_(0, perm, in_order)  # in-order page i lives at pool[perm[i]]
    return pool


def _rotary_tables(length: int, rotary_dim: int, dtype: torch.dtype, device: torch.device):
    inv = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    ang = torch.outer(torch.arange(length, dtype=torch.float32), inv)
    return ang.cos().to(dtype=dtype, device=device), ang.sin().to(dtype=dtype, device=device)


def make_problems(shape: Shape, device: torch.device | str, copies: int = 1, seed: int = 0) -> list[Problem]:
    """`copies` input sets for `shape`; data differs per copy, lengths/block table/masks are shared."""
    dev = torch.device(device)
    dt = shape.torch_dtype
    b, hq, hkv, d = shape.batch, shape.heads_q, shape.heads_kv, shape.head_dim
    kv_lens = shape.kv_lengths()
    cap = shape.seqlen
    s_new = shape.new_tokens
    cache_seqlens = torch.tensor([n - s_new for n in kv_lens], dtype=torch.int32, device=dev)
    kv_lens_t = torch.tensor(kv_lens, dtype=torch.int32, device=dev)
    nblk = math.ceil(cap / PAGE_SIZE)
    g_cpu = torch.Generator().manual_seed(4321 + seed + shape.seed)
    perm = torch.randperm(b * nblk, generator=g_cpu).to(dev)
    block_table = perm.view(b, nblk).to(torch.int32)
    cos = sin = None
    if shape.kind == "append":
        cos, sin = _rotary_tables(cap, d, dt, dev)
    problems = []
    for c in range(copies):
        g = torch.Generator(device=dev)
        g.manual_seed(1000 * (seed + 1) + c)

        def randn(*size):
            return torch.randn(*size, generator=g, device=dev, dtype=dt)

        q = randn(b, shape.seqlen_q, hq, d)
        k_cache = randn(b, cap, hkv, d)
        v_cache = randn(b, cap, hkv, d)
        k_new = v_new = None
        if s_new:
            k_new = randn(b, s_new, hkv, d)
            v_new = randn(b, s_new, hkv, d)
        problems.append(Problem(shape, dev, q, k_cache, v_cache, cache_seqlens, kv_lens, kv_lens_t, block_table, perm,
                                d ** -0.5, k_new, v_new, cos, sin))
    return problems


# ------------------------------------------------------------------------------------------------
# fp32 reference (independent of flashdecode)
# ------------------------------------------------------------------------------------------------


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved (GPT-NeoX / Llama) rotary on the last dim, in fp32. cos/sin broadcast to x[..., :D/2]."""
    x = x.float()
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    c, s = cos.float(), sin.float()
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, x[..., 2 * half:]], dim=-1)


def reference_output(p: Problem, *, chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """Attention in fp32, (B, Sq, Hq, D), per sequence, with the shape's append/rotary/causal rules."""
    sh = p.shape
    b_, sq, hq, d = p.q.shape
    hkv = p.k_cache.shape[2]
    grp = hq // hkv
    out = torch.empty(b_, sq, hq, d, dtype=torch.float32, device=p.device)
    s_new = sh.new_tokens
    for b in range(b_):
        n = p.kv_lens[b]
        start = n - s_new
        q = p.q[b].float()  # (Sq, Hq, D)
        k = p.k_cache[b, :n].float().clone()
        v = p.v_cache[b, :n].float().clone()
        if s_new:
            pos_k = torch.arange(start, start + s_new, device=p.device)
            k[start:n] = rotate(p.k_new[b], p.rotary_cos[pos_k][:, None, :], p.rotary_sin[pos_k][:, None, :])
            v[start:n] = p.v_new[b].float()
            # query i at position cache_seqlens + i when causal, else cache_seqlens
            pos_q = start + torch.arange(sq, device=p.device) if sh.causal else torch.full((sq,), start, device=p.device)
            q = rotate(q, p.rotary_cos[pos_q][:, None, :], p.rotary_sin[pos_q][:, None, :])
        qg = q.view(sq, hkv, grp, d)
        rows = max(1, int(chunk_bytes // max(1, hq * n * 4)))
        for i0 in range(0, sq, rows):
            i1 = min(sq, i0 + rows)
            s = torch.einsum("shgd,nhd->hgsn", qg[i0:i1], k) * p.scale
            if sh.causal:
                qi = torch.arange(i0, i1, device=p.device)[:, None]
                kj = torch.arange(n, device=p.device)[None, :]
                s = s.masked_fill(kj > qi + (n - sq), float("-inf"))
            w = torch.softmax(s, dim=-1)
            w = torch.nan_to_num(w, nan=0.0)  # rows with no visible key -> 0
            out[b, i0:i1] = torch.einsum("hgsn,nhd->shgd", w, v).reshape(i1 - i0, hq, d)
    return out


# Relative to max |ref| over the whole output, and per output row (b, i, h) relative to that row's
# max |ref|. bf16 peers measure about 0.003-0.005 and 0.005-0.02 (naive bf16 scores) on random data;
# a wrong mask, scale or head mapping gives O(1) in the rows it touches.
TOLERANCE = {torch.bfloat16: 0.03, torch.float16: 0.005, torch.float32: 1e-4}
ROW_TOLERANCE = {torch.bfloat16: 0.1, torch.float16: 0.02, torch.float32: 1e-3}


def compare(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """max abs error, relative errors (global and worst row) and the pass flag."""
    tol, row_tol = TOLERANCE.get(dtype, 0.03), ROW_TOLERANCE.get(dtype, 0.1)
    res: dict[str, Any] = {"max_abs_err": None, "rel_err": None, "row_rel_err": None, "tol": tol,
                           "row_tol": row_tol, "correct": False, "check": ""}
    if out.shape != ref.shape:
        res["check"] = f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
        return res
    out = out.float()
    if not ref.numel():
        res.update(max_abs_err=0.0, rel_err=0.0, row_rel_err=0.0, correct=True)
        return res
    diff = (out - ref).abs()
    finite = bool(torch.isfinite(out).all())
    err = float(diff.max()) if finite else float("nan")
    rel = err / max(float(ref.abs().max()), 1e-12)
    row_scale = ref.abs().amax(dim=-1).clamp_min(1e-6 * max(float(ref.abs().max()), 1e-12))
    row_rel = float((diff.amax(dim=-1) / row_scale).max()) if finite else float("nan")
    res.update(max_abs_err=err, rel_err=rel, row_rel_err=row_rel, correct=bool(rel <= tol and row_rel <= row_tol))
    if not finite:
        res["check"] = "non-finite output"
    return res


# ------------------------------------------------------------------------------------------------
# Peers
# ------------------------------------------------------------------------------------------------


@dataclass
class Built:
    """A ready implementation: `fn(state)` for each state (one per input copy)."""

    fn: Callable[[Any], Any]
    states: list[Any]
    to_bshd: Callable[[Any], torch.Tensor]  # raw output -> (B, Sq, Hq, D)
    variant: str = ""
    note: str = ""
    expected: Callable[[], torch.Tensor] | None = None  # own reference (else the shape's)
    cleanup: Callable[[], None] | None = None


class Peer:
    name = "?"
    group = "peer"  # "flashdecode" (ours), "peer" (counted for the best peer), "baseline" (ours, for ratios)
    kinds: tuple[str, ...] = ("decode", "ragged", "spec", "append", "prefill")
    cuda_only = False

    def applies(self, shape: Shape) -> bool:
        """Whether this implementation has a row for the shape's kind at all."""
        return shape.kind in self.kinds

    def unsupported(self, shape: Shape, device: torch.device) -> str | None:
        """Why it cannot run this shape here ("n/a: ..."), or None."""
        if self.cuda_only and device.type != "cuda":
            return "n/a: needs CUDA"
        return None

    def build(self, problems: list[Problem]) -> list[Built | str]:
        """One Built per variant (an "error: ..." string for a variant that could not be built)."""
        raise NotImplementedError


def _err(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {msg[0] if msg else ''}"[:300]


class FlashdecodeContiguous(Peer):
    name = "flashdecode"
    group = "flashdecode"
    kinds = ("decode", "ragged", "spec", "append", "prefill", "memory")
    paged = False

    def build(self, problems):
        import flashdecode  # noqa: PLC0415  (may be missing while the op is written: reported, not fatal)

        op = flashdecode.flash_attn_with_kvcache
        sh = problems[0].shape

        def fn(p: Problem):
            if self.paged:
                k_cache, v_cache = p.paged()
                table = p.block_table
            else:
                k_cache, v_cache, table = p.k_cache, p.v_cache, None
            return op(p.q, k_cache, v_cache, k=p.k_new, v=p.v_new, rotary_cos=p.rotary_cos, rotary_sin=p.rotary_sin,
                      cache_seqlens=p.cache_seqlens, block_table=table, softmax_scale=p.scale, causal=sh.causal,
                      rotary_interleaved=False)

        if self.paged:
            for p in problems:
                p.paged()
        return [Built(fn, list(problems), lambda o: o, note=f"page {PAGE_SIZE}, shuffled" if self.paged else "")]


class FlashdecodePaged(FlashdecodeContiguous):
    name = "flashdecode-paged"
    kinds = ("decode", "ragged", "spec", "append", "prefill")
    paged = True


class FlashdecodeNoAppend(Peer):
    """The append shape's baseline: the same decode (same keys read) without append or rotary."""

    name = "flashdecode-noappend"
    group = "baseline"
    kinds = ("append",)

    def build(self, problems):
        import flashdecode  # noqa: PLC0415

        op = flashdecode.flash_attn_with_kvcache

        def fn(p: Problem):
            return op(p.q, p.k_cache, p.v_cache, cache_seqlens=p.kv_lens_t, softmax_scale=p.scale)

        p0 = problems[0]

        def expected():
            plain = Problem(p0.shape.with_(kind="decode"), p0.device, p0.q, p0.k_cache, p0.v_cache, p0.kv_lens_t,
                            p0.kv_lens, p0.kv_lens_t, p0.block_table, p0.page_perm, p0.scale)
            return reference_output(plain)

        return [Built(fn, list(problems), lambda o: o, expected=expected, note="same decode, no append")]


def _uniform_lengths(p: Problem) -> bool:
    return all(n == p.capacity for n in p.kv_lens)


def _torch_append(p: Problem, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a PyTorch user does per step: rotary on q and new k, write k/v into the cache at the end.

    Uniform lengths (the append shape): new keys go to slots [L - S_new, L) of every sequence.
    k, v: (B, Hkv, L, D) caches (written in place); q: (B, Hq, Sq, D). Returns the rotated q.
    """
    s_new = p.k_new.shape[1]
    start = p.capacity - s_new
    cos, sin = p.rotary_cos[start:start + s_new], p.rotary_sin[start:start + s_new]  # (S_new, D/2)
    k_rot = rotate(p.k_new.transpose(1, 2), cos, sin).to(k.dtype)  # (B, Hkv, S_new, D)
    k[:, :, start:] = k_rot
    v[:, :, start:] = p.v_new.transpose(1, 2)
    return rotate(q, p.rotary_cos[start:start + 1], p.rotary_sin[start:start + 1]).to(q.dtype)


class _TorchLayoutPeer(Peer):
    """Peers that take (B, H, L, D) tensors: states are (q_bhsd, k_bhld, v_bhld, extra)."""

    def states(self, problems: list[Problem]) -> list[tuple]:
        out = []
        for p in problems:
            k, v = p.bhld()
            out.append((p, p.q_bhsd(), k, v))
        return out


class Naive(_TorchLayoutPeer):
    """Standard attention: scores materialised, softmax in fp32, GQA by repeat_interleave."""

    name = "naive"
    kinds = ("decode", "ragged", "spec", "append", "prefill", "memory")

    def build(self, problems):
        sh = problems[0].shape
        p0 = problems[0]
        grp = sh.group
        mask = None  # True = visible; made once, outside the timed call
        lk = p0.capacity
        if not _uniform_lengths(p0):
            mask = (torch.arange(lk, device=p0.device)[None, :] < p0.kv_lens_t[:, None].long())[:, None, None, :]
        if sh.causal:
            qi = torch.arange(sh.seqlen_q, device=p0.device)[:, None]
            cm = torch.arange(lk, device=p0.device)[None, :] <= qi + (lk - sh.seqlen_q)
            mask = cm[None, None] if mask is None else mask & cm[None, None]

        def fn(st):
            p, q, k, v = st
            if p.k_new is not None:
                q = _torch_append(p, k, v, q)
            if grp > 1:
                k = k.repeat_interleave(grp, dim=1)
                v = v.repeat_interleave(grp, dim=1)
            s = torch.matmul(q, k.transpose(-1, -2)) * p.scale
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            w = torch.softmax(s.float(), dim=-1).to(q.dtype)
            return torch.matmul(w, v)

        return [Built(fn, self.states(problems), lambda o: o.transpose(1, 2))]


class SDPA(_TorchLayoutPeer):
    backend_name = "FLASH_ATTENTION"
    kinds = ("decode", "ragged", "spec", "append", "prefill")

    def unsupported(self, shape, device):
        if shape.kind == "ragged":
            return "n/a: SDPA has no per-sequence key lengths"
        return super().unsupported(shape, device)

    def build(self, problems):
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
        import torch.nn.functional as F  # noqa: PLC0415

        backend = getattr(SDPBackend, self.backend_name)
        sh = problems[0].shape
        lk = problems[0].capacity
        kwargs: dict[str, Any] = {"enable_gqa": sh.heads_q != sh.heads_kv}
        if sh.causal and sh.seqlen_q == lk:
            kwargs["is_causal"] = True
        elif sh.causal:
            from torch.nn.attention.bias import causal_lower_right  # noqa: PLC0415

            kwargs["attn_mask"] = causal_lower_right(sh.seqlen_q, lk)

        def fn(st):
            p, q, k, v = st
            if p.k_new is not None:
                q = _torch_append(p, k, v, q)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=p.scale, **kwargs)

        return [Built(fn, self.states(problems), lambda o: o.transpose(1, 2))]


class SDPAFlash(SDPA):
    name = "sdpa-flash"
    backend_name = "FLASH_ATTENTION"
    kinds = ("decode", "ragged", "spec", "append", "prefill", "memory")


class SDPACudnn(SDPA):
    name = "sdpa-cudnn"
    backend_name = "CUDNN_ATTENTION"
    cuda_only = True


def _raise_dynamo_limits() -> None:
    """FlexAttention gets one compile per shape and must never fall back to eager on a recompile limit."""
    try:
        import torch._dynamo.config as cfg  # noqa: PLC0415

        for name, val in (("cache_size_limit", 4096), ("recompile_limit", 4096),
                          ("accumulated_cache_size_limit", 65536), ("accumulated_recompile_limit", 65536)):
            if hasattr(cfg, name) and getattr(cfg, name) < val:
                setattr(cfg, name, val)
        if hasattr(cfg, "automatic_dynamic_shapes"):
            cfg.automatic_dynamic_shapes = False  # static shapes: the best kernels for each size
        if hasattr(cfg, "fail_on_recompile_limit_hit"):
            cfg.fail_on_recompile_limit_hit = True  # an error in the table, never a silent eager fallback
    except Exception:
        pass


class Flex(_TorchLayoutPeer):
    name = "flex"
    kinds = ("decode", "ragged", "spec", "prefill")

    def unsupported(self, shape, device):
        r = super().unsupported(shape, device)
        if r:
            return r
        if device.type != "cuda" and os.environ.get("FLASHDECODE_BENCH_FLEX_CPU") != "1":
            return "n/a: CUDA only here (FLASHDECODE_BENCH_FLEX_CPU=1 tries the CPU)"
        return None

    def build(self, problems):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415

        _raise_dynamo_limits()
        sh = problems[0].shape
        p0 = problems[0]
        lk, sq = p0.capacity, sh.seqlen_q
        block_mask = None
        if not _uniform_lengths(p0):
            lens = p0.kv_lens_t

            def mask_mod(b, h, q_idx, kv_idx):
                return kv_idx < lens[b]

            block_mask = create_block_mask(mask_mod, sh.batch, None, sq, lk, device=p0.device)
        elif sh.causal:
            offset = lk - sq

            def mask_mod(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + offset

            block_mask = create_block_mask(mask_mod, None, None, sq, lk, device=p0.device)
        compiled = torch.compile(flex_attention, dynamic=False)  # a fresh compile for this shape
        gqa = sh.heads_q != sh.heads_kv

        def fn(st):
            p, q, k, v = st
            return compiled(q, k, v, block_mask=block_mask, scale=p.scale, enable_gqa=gqa)

        return [Built(fn, self.states(problems), lambda o: o.transpose(1, 2),
                      note="torch.compile(dynamic=False), default kernel options")]


class FlashInfer(Peer):
    """FlashInfer's paged kernels, page 16 on the shared shuffled pool; decode with and without tensor cores."""

    name = "flashinfer"
    kinds = ("decode", "ragged", "spec", "prefill")
    cuda_only = True

    def unsupported(self, shape, device):
        r = super().unsupported(shape, device)
        if r:
            return r
        import importlib.util  # noqa: PLC0415

        if importlib.util.find_spec("flashinfer") is None:
            return "n/a: FlashInfer not installed"
        return None

    def build(self, problems):
        import flashinfer  # noqa: PLC0415

        sh = problems[0].shape
        p0 = problems[0]
        dev = p0.device
        pages = [math.ceil(n / PAGE_SIZE) for n in p0.kv_lens]
        indptr = torch.tensor([0] + list(_cumsum(pages)), dtype=torch.int32, device=dev)
        indices = torch.cat([p0.block_table[b, :pages[b]] for b in range(sh.batch)]).to(torch.int32)
        last = torch.tensor([n - (pg - 1) * PAGE_SIZE for n, pg in zip(p0.kv_lens, pages)], dtype=torch.int32,
                            device=dev)
        states = []
        for p in problems:
            kp, vp = p.paged()
            states.append((p.q.reshape(sh.batch * sh.seqlen_q, sh.heads_q, sh.head_dim), kp, vp))

        def to_bshd(o):
            return o.reshape(sh.batch, sh.seqlen_q, sh.heads_q, sh.head_dim)

        built: list[Built | str] = []
        if sh.seqlen_q == 1 and not sh.causal:
            for tc in (False, True):
                label = "tensor cores" if tc else "cuda cores"
                try:
                    ws = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
                    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
                    w.plan(indptr, indices, last, sh.heads_q, sh.heads_kv, sh.head_dim, PAGE_SIZE,
                           q_data_type=sh.torch_dtype, kv_data_type=sh.torch_dtype, sm_scale=p0.scale)
                    built.append(Built(_fi_run(w), states, to_bshd, variant=label))
                except Exception as exc:
                    built.append(f"{label}: {_err(exc)}")
        else:
            try:
                ws = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
                qo_indptr = torch.arange(0, (sh.batch + 1) * sh.seqlen_q, sh.seqlen_q, dtype=torch.int32, device=dev)
                w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
                w.plan(qo_indptr, indptr, indices, last, sh.heads_q, sh.heads_kv, sh.head_dim, PAGE_SIZE,
                       causal=sh.causal, sm_scale=p0.scale, q_data_type=sh.torch_dtype, kv_data_type=sh.torch_dtype)
                built.append(Built(_fi_run(w), states, to_bshd, variant="prefill wrapper"))
            except Exception as exc:
                built.append(f"prefill wrapper: {_err(exc)}")
        return built


def _fi_run(wrapper):
    def fn(st):
        q, kp, vp = st
        return wrapper.run(q, (kp, vp))

    return fn


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


ALL_PEERS: list[type[Peer]] = [FlashdecodeContiguous, FlashdecodePaged, FlashdecodeNoAppend, SDPAFlash, SDPACudnn,
                               FlashInfer, Naive, Flex]


def peer_names() -> list[str]:
    return [p.name for p in ALL_PEERS]


def make_peers(names: list[str] | None = None, *, flex: bool = True, flashinfer: bool = True) -> list[Peer]:
    peers = []
    for cls in ALL_PEERS:
        if names and cls.name not in names:
            continue
        if cls is Flex and not flex:
            continue
        if cls is FlashInfer and not flashinfer:
            continue
        peers.append(cls())
    return peers
