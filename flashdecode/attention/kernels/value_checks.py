"""The op's checks of tensor values in one kernel launch (the Triton backend's way to run
`validation.validate_values`).

The checks as PyTorch expressions are some 50-80 small operations on the device, each a few
microseconds of host time: on an H200 (2026-11-29, `scripts/profile_host.py`, runs 91 and 93 in
BENCHMARKS.md) an eager call of B=1 L=4096 took 528 µs of host time with them against 301
without, 798 against 433 with a paged cache; in one kernel (a single program, run 93), 292 and
493. Here a program per 128 sequences reads their lengths, offsets and the block-table columns
in use once and adds the failures of every check to a counter; the caller reads the counters
back with its one host sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:  # torch loads in the launcher only, so that offline compile checks run without it
    import torch

# Index of each check's failure count in the kernel's output (validation.py names them).
SEQLENS_NEGATIVE, PAST_CAPACITY, LEFTPAD, BATCH_IDX, TABLE, CU_Q, CU_K, MAX_SEQLEN_Q, ROTARY = range(9)
NUM_CHECKS = 9
_FLAGS = 16  # the output's length: a power of two for tl.arange
BLOCK_B = 128
BLOCK_W = 32


@triton.jit
def _count(cond):
    return tl.sum(cond.to(tl.int32), axis=0)


@triton.jit
def value_checks_kernel(
    FLAGS, SEQLENS, CU_Q, CU_K, LEFTPAD, BATCH_IDX, TABLE, ROTARY_SEQLENS,
    batch, capacity, rows_available, num_pages, page_size, table_width, stride_table,
    total_q, total_new, max_seqlen_q, rotary_rows,
    HAS_LEFTPAD: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, PAGED: tl.constexpr, CHECK_CU_Q: tl.constexpr,
    CHECK_CU_K: tl.constexpr, CHECK_MAX_Q: tl.constexpr, HAS_ROTARY: tl.constexpr,
    ROTARY_ALL_QUERIES: tl.constexpr, NUM_FLAGS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Program i checks sequences ``[i * BLOCK_B, (i + 1) * BLOCK_B)`` and adds its failure counts
    to ``FLAGS`` (zeroed by the caller): entry c counts the items that fail check c (the module's
    indices). Sequence b's keys end at ``cache_seqlens[b] + new_lens[b]`` (``new_lens`` from
    ``CU_K``); a paged sequence uses its table row's first ``ceil(end / page_size)`` entries."""
    seq = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    ok = seq < batch
    seqlen = tl.load(SEQLENS + seq, mask=ok, other=0).to(tl.int64)
    new_len = (tl.load(CU_K + seq + 1, mask=ok, other=0) - tl.load(CU_K + seq, mask=ok, other=0)).to(tl.int64)
    q_len = (tl.load(CU_Q + seq + 1, mask=ok, other=0) - tl.load(CU_Q + seq, mask=ok, other=0)).to(tl.int64)
    end = seqlen + new_len
    n_neg = _count(ok & (seqlen < 0))
    n_cap = _count(ok & (end > capacity))
    n_pad = 0
    n_idx = 0
    n_tab = 0
    n_cuq = 0
    n_cuk = 0
    n_maxq = 0
    n_rot = 0
    if HAS_LEFTPAD:
        pad = tl.load(LEFTPAD + seq, mask=ok, other=0).to(tl.int64)
        n_pad = _count(ok & ((pad < 0) | (pad > seqlen)))
    if HAS_BATCH_IDX:
        row = tl.load(BATCH_IDX + seq, mask=ok, other=0)
        n_idx = _count(ok & ((row < 0) | (row >= rows_available)))
    if PAGED:
        pages_used = (end + page_size - 1) // page_size  # 0 past the batch (lengths loaded as 0)
        for w0 in range(0, tl.minimum(tl.max(pages_used, axis=0), table_width), BLOCK_W):  # the columns in use
            col = w0 + tl.arange(0, BLOCK_W)
            used = (col[None, :] < pages_used[:, None]) & (col[None, :] < table_width)
            page = tl.load(TABLE + seq.to(tl.int64)[:, None] * stride_table + col[None, :], mask=used, other=0)
            n_tab += tl.sum(_count(used & ((page < 0) | (page >= num_pages))), axis=0)
    if CHECK_CU_Q:
        n_cuq = _count(ok & (q_len < 0))
    if CHECK_CU_K:
        n_cuk = _count(ok & (new_len < 0))
    if CHECK_MAX_Q:
        n_maxq = _count(ok & (q_len > max_seqlen_q))
    if HAS_ROTARY:
        rot = tl.load(ROTARY_SEQLENS + seq, mask=ok, other=0).to(tl.int64)
        if ROTARY_ALL_QUERIES:
            q_span = q_len
        else:
            q_span = tl.minimum(q_len, 1)
        need = rot + tl.maximum(new_len, q_span)
        n_rot = _count(ok & ((need > rotary_rows) | (rot < 0)))
    if tl.program_id(0) == 0:  # the offsets' ends, once
        if CHECK_CU_Q:
            n_cuq += (tl.load(CU_Q) != 0).to(tl.int32) + (tl.load(CU_Q + batch) != total_q).to(tl.int32)
        if CHECK_CU_K:
            n_cuk += (tl.load(CU_K) != 0).to(tl.int32) + (tl.load(CU_K + batch) != total_new).to(tl.int32)
    i = tl.arange(0, NUM_FLAGS)
    flags = tl.where(i == 0, n_neg, 0) + tl.where(i == 1, n_cap, 0) + tl.where(i == 2, n_pad, 0) \
        + tl.where(i == 3, n_idx, 0) + tl.where(i == 4, n_tab, 0) + tl.where(i == 5, n_cuq, 0) \
        + tl.where(i == 6, n_cuk, 0) + tl.where(i == 7, n_maxq, 0) + tl.where(i == 8, n_rot, 0)
    tl.atomic_add(FLAGS + i, flags, mask=flags != 0)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def failure_counts(
    cache_seqlens: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    cache_leftpad: torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
    table: torch.Tensor | None,
    rotary_seqlens: torch.Tensor | None,
    *,
    capacity: int,
    rows_available: int,
    num_pages: int,
    page_size: int,
    total_q: int,
    total_new: int,
    check_cu_q: bool,
    check_cu_k: bool,
    max_seqlen_q: int | None,
    rotary_rows: int,
    rotary_all_queries: bool,
) -> list[int]:
    """Failure counts of the ``NUM_CHECKS`` checks (one host sync). ``cu_q``/``cu_k`` are the
    packed per-sequence offsets of the queries and the appended keys (int32, batch + 1);
    ``table`` the block-table rows the sequences use (None: a contiguous cache);
    ``rotary_seqlens`` the rotary start rows (None: no rotary check); ``max_seqlen_q`` the bound
    on each sequence's queries (None: no check)."""
    import torch  # noqa: PLC0415

    batch = cache_seqlens.shape[0]
    flags = torch.zeros(_FLAGS, dtype=torch.int32, device=cache_seqlens.device)
    seqlens = _flat(cache_seqlens)
    value_checks_kernel[(max(1, triton.cdiv(batch, BLOCK_B)),)](
        flags, seqlens, _flat(cu_q), _flat(cu_k),
        seqlens if cache_leftpad is None else _flat(cache_leftpad),
        seqlens if cache_batch_idx is None else _flat(cache_batch_idx),
        seqlens if table is None else table,
        seqlens if rotary_seqlens is None else _flat(rotary_seqlens),
        batch, capacity, rows_available, num_pages, page_size,
        0 if table is None else table.shape[1], 0 if table is None else table.stride(0),
        total_q, total_new, 0 if max_seqlen_q is None else max_seqlen_q, rotary_rows,
        HAS_LEFTPAD=cache_leftpad is not None, HAS_BATCH_IDX=cache_batch_idx is not None, PAGED=table is not None,
        CHECK_CU_Q=check_cu_q, CHECK_CU_K=check_cu_k, CHECK_MAX_Q=max_seqlen_q is not None,
        HAS_ROTARY=rotary_seqlens is not None, ROTARY_ALL_QUERIES=rotary_all_queries,
        NUM_FLAGS=_FLAGS, BLOCK_B=BLOCK_B, BLOCK_W=BLOCK_W, num_warps=4,
    )
    return flags.tolist()[:NUM_CHECKS]
