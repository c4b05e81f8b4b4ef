"""Launcher of the Triton path: append, split-KV attention, combine.

A call with at most ``FUSED_APPEND_ROWS`` new keys per sequence (decode, speculative
verification) appends inside the attention kernel; larger appends (prefill) run the append kernel
first. Either way the cache ends up with the same bytes.

Everything here is decided from shapes and device properties, never from tensor values: no host
synchronisation and no data-dependent allocation, so a call can be captured in a CUDA graph and
replayed after the caller changes ``cache_seqlens``, the block table or the cache contents.

Tuning knob (read at each call, so also at CUDA-graph capture): ``FLASHDECODE_PAGED_GATHER``
= ``row`` | ``page`` (unset or ``auto``: ``heuristics.PAGED_GATHER_DEFAULT``) picks how a key tile
finds its pages when the page size is a power of two smaller than the key tile: ``row`` looks up
the block table per key slot, ``page`` once per page (see ``heuristics.gather_page``). Both read
the same addresses and run the same floating-point code (bit-identical in the interpreter tests);
the knob exists to A/B their speed on a GPU
(``python scripts/tune_decode.py --paged-variants``). The on/off knobs ``FLASHDECODE_FUSED_APPEND``,
``FLASHDECODE_ATTENTION_PDL``, ``FLASHDECODE_LATE_ROW_SUM``, ``FLASHDECODE_ALIGNED_TABLE``,
``FLASHDECODE_TMA`` and ``FLASHDECODE_GLUON`` (``auto``/``0``/``1``: where the Gluon decode
kernel runs) are described at the functions that read them.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton

from flashdecode.attention import heuristics
from flashdecode.attention.kernels.append import append_kv_kernel
from flashdecode.attention.kernels.attention import attention_split_kernel
from flashdecode.attention.kernels.combine import combine_splits_kernel
from flashdecode.attention.kernels.constants import GLUON_TRITON_VERSIONS
from flashdecode.attention.problem import PackedProblem

LOG2E = math.log2(math.e)
PAGED_GATHER_ENV = "FLASHDECODE_PAGED_GATHER"
FUSED_APPEND_ENV = "FLASHDECODE_FUSED_APPEND"
ATTENTION_PDL_ENV = "FLASHDECODE_ATTENTION_PDL"
LATE_ROW_SUM_ENV = "FLASHDECODE_LATE_ROW_SUM"
ALIGNED_TABLE_ENV = "FLASHDECODE_ALIGNED_TABLE"
TMA_ENV = "FLASHDECODE_TMA"
GLUON_ENV = "FLASHDECODE_GLUON"
# Largest query-rows x keys tile that counts as a decode tile (`decode_sized`), for the variants
# measured or compiled on decode tiles only. The late row sum keeps that many float32 values, 16
# registers per thread at 4 warps; prefill tiles (128 x 64) spilled with it (Triton 3.6, sm_90).
DECODE_TILE_MAX_ELEMENTS = 2048
# New keys per program of the append kernel.
APPEND_BLOCK_T = 16
# Up to this many new keys per sequence, the attention kernel appends them itself (no append kernel).
FUSED_APPEND_ROWS = 16
# Partial-output elements the combine kernel loads at once (64 float32 registers per thread at 4
# warps): up to 64 splits of D=128 in one load, issued together with the LSEs.
COMBINE_TILE_ELEMENTS = 8192


@functools.lru_cache(maxsize=None)
def _num_sms(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).multi_processor_count
    # The interpreter runs programs one after the other: splitting only costs time there.
    return 1


def num_sms(device: torch.device) -> int:
    """SM count of ``device`` (1 for CPU tensors run by the Triton interpreter)."""
    return _num_sms(device.type, device.index)


@functools.lru_cache(maxsize=None)
def _compute_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def compute_major(device: torch.device) -> int:
    """Major compute capability of CUDA ``device`` (asked once per device: the query costs host
    time on every call otherwise)."""
    return _compute_major(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _max_shared_mem(device_type: str, index: int | None) -> int | None:
    if device_type != "cuda":
        return None
    from triton.runtime import driver  # noqa: PLC0415

    index = index if index is not None else torch.cuda.current_device()
    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])


def smem_budget(device: torch.device) -> int:
    """Shared memory the tile heuristics may plan for one program on ``device``:
    ``SMEM_BUDGET_BYTES``, or the GPU's opt-in limit per block where that is lower (99 KiB on
    consumer Ampere and Ada, where a 3-stage prefill tile, 128 KiB, would not launch)."""
    limit = _max_shared_mem(device.type, device.index)
    return heuristics.SMEM_BUDGET_BYTES if limit is None else min(heuristics.SMEM_BUDGET_BYTES, limit)


def _plan(p: PackedProblem, append: bool = False) -> tuple[heuristics.TileConfig, int, int]:
    """Tile config, number of query tiles and split count for ``p`` (shapes only); ``append``: the
    kernel variant with the fused append, which holds fewer programs per SM."""
    _, num_heads, head_dim = p.q.shape
    num_kv_heads = p.k_pages.shape[2]
    group = num_heads // num_kv_heads
    budget = smem_budget(p.q.device)
    cfg = heuristics.choose_tiles(head_dim, p.q.element_size(), max(1, p.max_seqlen_q) * group, smem_budget=budget)
    n_m_tiles = heuristics.num_query_tiles(p.max_seqlen_q, group, cfg.block_m)
    capacity = p.block_table.shape[1] * p.page_size
    resident = heuristics.FUSED_APPEND_RESIDENT_PROGRAMS_PER_SM if append else heuristics.RESIDENT_PROGRAMS_PER_SM
    # A contiguous cache (one page per sequence) fills the SMs once (see the heuristics' constants).
    contiguous_decode = p.block_table.shape[1] == 1 and decode_sized(cfg)
    fill = heuristics.CONTIGUOUS_PROGRAMS_PER_SM if contiguous_decode else heuristics.TARGET_PROGRAMS_PER_SM
    sms = num_sms(p.q.device)
    splits = heuristics.choose_num_splits(
        p.num_splits, p.batch, num_kv_heads, n_m_tiles, capacity, cfg.block_n, sms,
        resident_per_sm=resident, fill_per_sm=fill,
    )
    if decode_sized(cfg) and not contiguous_decode:
        cfg = heuristics.halve_short_split_tiles(cfg, capacity, splits)
    cfg = heuristics.cap_stages(cfg, capacity, splits)
    if contiguous_decode and sms > 1:
        cfg = heuristics.deepen_lone_programs(cfg, p.batch * num_kv_heads * n_m_tiles * splits, sms, capacity,
                                              splits, head_dim, p.q.element_size(), smem_budget=budget)
    return cfg, n_m_tiles, splits


def env_flag(name: str, default: str) -> bool:
    """An on/off knob read from the environment: ``0``/``off`` or ``1``/``on``, else ValueError."""
    value = os.environ.get(name, default).strip().lower()
    if value not in ("0", "1", "off", "on"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value in ("1", "on")


def fused_append_enabled() -> bool:
    """``FLASHDECODE_FUSED_APPEND`` (read on every call): ``0`` runs the append kernel before the
    attention kernel even for a few new keys per sequence (an A/B knob; default ``1``)."""
    return env_flag(FUSED_APPEND_ENV, "1")


def attention_pdl(device: torch.device) -> bool:
    """Launch the attention and combine kernels with programmatic dependent launch on sm90+ CUDA
    devices, unless ``FLASHDECODE_ATTENTION_PDL=0`` (read on every call). Each waits for the
    previous kernel before its first load and lets the next one launch after its key loop, so
    only a launch and a tail overlap. On an H200 (2026-11-28, run 16, batch-1 decode, same run)
    it took SmolLM2-135M from 1440 to 1666 tok/s and Llama-3-8B from 235.4 to 238.4; on the
    256-request throughput workload (run 17) SmolLM2 went from 36,230 to 42,120 tok/s."""
    return env_flag(ATTENTION_PDL_ENV, "1") and pdl_supported(device)


def decode_sized(cfg: heuristics.TileConfig) -> bool:
    """A decode tile (few query rows), not a prefill one: see ``DECODE_TILE_MAX_ELEMENTS``."""
    return cfg.block_m * cfg.block_n <= DECODE_TILE_MAX_ELEMENTS


def aligned_table(max_pages: int, block_n: int, gather_page: int) -> bool:
    """The kernel's ``TABLE_ALIGNED`` (see `page_ids` in key_tile.py): key tiles that read their
    block-table entries once per page (``gather_page`` > 0) read them as one aligned vector when
    the table's width is a multiple of a tile's page count. Compiled by Triton 3.6 for sm_90
    (page 16, late row sum), the unmasked key loop of the paged decode kernel goes from 356 to
    330 instructions at D=64 (9/3 heads; registers 184 -> 152), 293 to 278 at D=128 (as many as
    the contiguous cache's; 168 registers and 16 bytes of spill, none in the loop) and 408 to
    396 for MQA: two 16-byte loads of the table per 128-key tile instead of eight 4-byte ones,
    and no clamp per entry.

    On unless ``FLASHDECODE_ALIGNED_TABLE=0`` (read on every call). On an H200 (run 39) it took
    paged MQA from 45.4 to 44.7 µs and 9/3 heads from 31.4 to 31.0, but MHA from 250.7 to 253.9.
    Its first version faulted on the GPU (run 41, misaligned address): the look-ahead read before
    a key loop also runs at a range end that is no tile start, and the vector load took that
    unaligned index. `page_ids` rounds it down to the tile; with that, every GPU test module
    passed with the read on (runs 42-43), and the interpreter checks the hint in the CPU tests.
    """
    return (env_flag(ALIGNED_TABLE_ENV, "1") and gather_page > 0
            and max_pages % (block_n // gather_page) == 0)


def descriptor_pools(k_pages: torch.Tensor, v_pages: torch.Tensor) -> bool:
    """Whether TMA tensor descriptors can view both pools as (slots, heads x dim): one 16-bit
    dtype, contiguous, 16-byte aligned, fewer than 2**31 slots (TMA coordinates are int32)."""
    num_pages, page_size = k_pages.shape[:2]
    return (k_pages.dtype in (torch.bfloat16, torch.float16) and v_pages.dtype == k_pages.dtype
            and k_pages.is_contiguous() and v_pages.is_contiguous()
            and k_pages.data_ptr() % 16 == 0 and v_pages.data_ptr() % 16 == 0
            and num_pages * page_size < 2**31)


def kv_descriptors(p: PackedProblem, block_n: int) -> tuple[object, object] | None:
    """Tensor descriptors of the K and V caches for the kernel's ``TMA_KV`` path, or None for the
    pointer path. On unless ``FLASHDECODE_TMA=0`` (read on every call).

    Compiled by Triton 3.6 for sm_90 (`aot_check`, bf16, late row sum), the unmasked key loop of
    the contiguous decode kernel goes from 286 SASS instructions to 217 at D=128 (64-key tiles)
    and from 393 to 332 for MQA (32-row tiles), the TMA copies pipelined with barriers; registers
    122 -> 153 at D=128 (168 for MQA, as before), shared memory unchanged (70 KiB): still 3
    programs per SM. A paged pool of pages that hold whole tiles: 353 -> 267 instructions, but
    144 -> 182 registers, 2 programs per SM instead of 3. Masked tiles keep the pointer loads
    (see `key_tile`).

    Timed on an H200 (2026-11-28, run 48, A/B in one call, two rounds): contiguous decode 0.0-1.1%
    faster on the eleven decode shapes (B=128 L=2048 250.4 -> 247.8 µs, 9/3 heads 29.4 -> 29.1,
    B=1 L=4096 10.5 -> 10.4), the append step unchanged; the tile sweep of run 49 found the same
    best tiles with it as without. Every test of tests/test_kernels.py and
    tests/test_unchecked_values.py passed on the GPU with it (runs 48 and 50). The launcher asks
    for it on decode tiles only (`decode_sized`): the causal prefill of the benchmark (B=4,
    L=4096, contiguous) took 1413 µs with it in run 51, against 1325 without in run 44, while
    the paged prefill stayed at 1441 against 1439.

    The path applies where one descriptor per cache covers every tile: one page per sequence
    (every contiguous cache) or pages that hold whole tiles (a multiple of ``block_n`` slots), a
    contiguous 16-bit pool, a power-of-two head dim (no channel mask), fewer than 2**31 slots
    (TMA coordinates are int32), and a GPU with TMA (compute capability 9.0+) or the interpreter.
    The pool is viewed as (pages x page size, heads x dim) and a tile is the block (``block_n``,
    dim) at the row of its first slot and the head's column.
    """
    if not env_flag(TMA_ENV, "1"):
        return None
    kc, vc = p.k_pages, p.v_pages
    num_pages, page_size, num_kv_heads, head_dim = kc.shape
    if kc.is_cuda:
        if compute_major(kc.device) < 9:
            return None
    elif os.environ.get("TRITON_INTERPRET") != "1":
        return None
    eligible = (
        (p.block_table.shape[1] == 1 or page_size % block_n == 0)
        and head_dim == heuristics.padded_head_dim(head_dim)
        and descriptor_pools(kc, vc)
    )
    if not eligible:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows = num_pages * page_size
    block = [block_n, head_dim]
    return (TensorDescriptor.from_tensor(kc.view(rows, num_kv_heads * head_dim), block),
            TensorDescriptor.from_tensor(vc.view(rows, num_kv_heads * head_dim), block))


def late_row_sum(cfg: heuristics.TileConfig) -> bool:
    """The kernel's ``LATE_SUM`` (see `attend` in key_tile.py), for decode-sized tiles when
    ``FLASHDECODE_LATE_ROW_SUM`` is on (read on every call; default ``1``, ``0`` turns it off).

    It removes a reduction across warps from every key tile. Compiled by Triton 3.6 for sm_90
    (bf16, the variants `aot_check` builds), the unmasked key loop loses 8-10% of its
    instructions: contiguous D=128 310 -> 278 (split) and 310 -> 283 (unsplit), D=64 338 -> 310,
    paged page 16 317 -> 293 (D=128) and 381 -> 353 (D=64), MQA 438 -> 395, D=256 314 -> 288.
    Registers stay within a few of before, except the split contiguous D=128 kernel (105 -> 168,
    still 3 programs per SM, which its 70 KiB of shared memory allow) and the paged MQA one
    (168 -> 183; its 16 bytes of spill go). The fused-append kernel goes from 182 registers to
    168 with 16 bytes of spill. Timed on an H200 (2026-11-28, run 34, A/B in one call): decode
    0.3-2.3% faster on 10 of 11 contiguous shapes (9/3 heads 30.2 -> 29.5 µs, MQA 43.7 -> 43.1),
    the append step 0.2% faster, no row more than 0.3% slower except one paged row (1.4%).
    """
    return env_flag(LATE_ROW_SUM_ENV, "1") and decode_sized(cfg)


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch needs a CUDA device of compute capability 9.0 or later."""
    return device.type == "cuda" and compute_major(device) >= 9


def offsets_32(k_pages: torch.Tensor, v_pages: torch.Tensor) -> bool:
    """The kernel's ``OFFSETS_32``: page and slot strides of both caches in [2, 2**31), so that key
    addresses can take unsigned 32 x 32 -> 64-bit products (a page id and a slot are non-negative
    int32). A stride of 1 is left out because Triton passes an argument equal to 1 as a constant."""
    return all(2 <= s < 2**31 for t in (k_pages, v_pages) for s in t.stride()[:2])


def paged_gather_mode() -> str | None:
    """``FLASHDECODE_PAGED_GATHER`` as set now (None if unset); validated by ``heuristics.gather_page``."""
    mode = os.environ.get(PAGED_GATHER_ENV)
    return None if mode is None else mode.strip().lower()


def _rotary_tables(p: PackedProblem, dummy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(cos, sin, row stride, rows) as the kernels index them: unit channel stride, one row stride."""
    if not p.rotary_dim:
        return dummy, dummy, 0, 0
    cos, sin = p.rotary_cos, p.rotary_sin
    if cos.stride(1) != 1 or sin.stride(1) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, cos.stride(0), cos.shape[0]


def append_kv(p: PackedProblem) -> None:
    """Write ``p.k_new`` (rotated when ``p.rotary_cos`` is set) and ``p.v_new`` into the pages."""
    if p.k_new is None or p.v_new is None or p.k_new.shape[0] == 0 or p.max_seqlen_k_new <= 0:
        return
    _, num_kv_heads, head_dim = p.k_new.shape
    kc, vc, kn, vn = p.k_pages, p.v_pages, p.k_new, p.v_new
    cos, sin, stride_cos, seqlen_ro = _rotary_tables(p, kn)
    grid = (triton.cdiv(p.max_seqlen_k_new, APPEND_BLOCK_T), p.batch, num_kv_heads)
    append_kv_kernel[grid](
        kn, vn, kc, vc, p.block_table, p.cache_seqlens, p.cu_seqlens_k_new, p.rotary_seqlens, cos, sin,
        kn.shape[0], kc.shape[0], p.block_table.shape[1], p.page_size, seqlen_ro,
        kn.stride(0), kn.stride(1), kn.stride(2),
        vn.stride(0), vn.stride(1), vn.stride(2),
        kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3),
        vc.stride(0), vc.stride(1), vc.stride(2), vc.stride(3),
        p.block_table.stride(0),
        stride_cos,
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=heuristics.padded_head_dim(head_dim),
        BLOCK_T=APPEND_BLOCK_T,
        ROTARY_DIM=p.rotary_dim,
        INTERLEAVED=p.rotary_interleaved,
        num_warps=4,
    )


def fuse_append(p: PackedProblem) -> bool:
    """Whether the attention kernel appends ``p``'s new keys itself: a few per sequence (decode,
    speculative verification) and at least one query row (else no attention program runs)."""
    return p.k_new is not None and p.v_new is not None and p.k_new.shape[0] > 0 \
        and 0 < p.max_seqlen_k_new <= FUSED_APPEND_ROWS and p.q.shape[0] > 0 and fused_append_enabled()


@dataclass(frozen=True)
class GluonPlan:
    """Launch plan of the Gluon decode kernel (`gluon_decode.py`): tiles, stages, splits, the key
    tiles of the longest split, and whether every program has an SM of its own."""

    block_n: int
    num_stages: int
    splits: int
    tiles_per_split: int
    lone: bool


def gluon_block_n(head_dim: int) -> int:
    """Keys per tile of the Gluon decode kernel: the Triton kernel's decode tile (16 KiB of K)."""
    return 128 if head_dim == 64 else 64


def gluon_pages_fit(page_size: int, max_pages: int, block_n: int) -> bool:
    """Whether TMA boxes can carry a cache's key tiles: one page per sequence (a contiguous
    cache; a tile may run past it, into slots the kernel masks), pages of whole tiles, or
    pages of at least 16 slots that tile a key tile (one box per page; 16 rows keep every box
    on whole 128-byte swizzle periods of the tile's shared memory)."""
    return max_pages == 1 or page_size % block_n == 0 or (block_n % page_size == 0 and page_size >= 16)


def gluon_problem_supported(p: PackedProblem) -> bool:
    """Whether `gluon_decode_kernel` covers ``p`` (shapes, dtypes and features only): a 16-bit
    cache, contiguous or of pages that `gluon_pages_fit` (pool contiguous and 16-byte aligned,
    under 2**31 slots), head dim 64 or 128, at most 32 query heads per KV head, one query per
    sequence, nothing appended, no rotary, window, softcap or ALiBi (a causal mask is no mask
    for one query)."""
    q, kc = p.q, p.k_pages
    _, page_size, num_kv_heads, head_dim = kc.shape
    return (
        p.max_seqlen_q == 1 and q.shape[0] == p.batch
        and (p.k_new is None or p.k_new.shape[0] == 0)
        and p.rotary_dim == 0 and p.window_left < 0 and p.window_right in (-1, 0)
        and p.softcap == 0.0 and p.alibi_slopes is None
        and descriptor_pools(kc, p.v_pages) and q.dtype == kc.dtype
        and head_dim in (64, 128) and q.shape[1] // num_kv_heads <= 32
        and gluon_pages_fit(page_size, p.block_table.shape[1], gluon_block_n(head_dim))
    )


def gluon_mode() -> str:
    """``FLASHDECODE_GLUON`` (read on every call): ``auto`` (default) lets `gluon_plan` take the
    Gluon decode kernel where `gluon_preferred` says it was faster, ``1`` wherever it applies,
    ``0`` nowhere."""
    value = os.environ.get(GLUON_ENV, "auto").strip().lower()
    if value in ("1", "on"):
        return "1"
    if value in ("0", "off"):
        return "0"
    if value != "auto":
        raise ValueError(f"{GLUON_ENV} must be auto, 0 or 1, got {value!r}")
    return "auto"


# A contiguous grid of one program per SM takes the Gluon kernel for splits of at most this many
# key tiles: it has less fixed cost per program than the Triton kernel (a producer warp issues
# the loads, the page id is read with the lengths), but a longer key loop (every consumer warp
# computes the whole score tile). On an H200 (runs 71-74, Triton kernel -> Gluon kernel, µs;
# not all in one call): B=1 L=4096 (4 tiles per split) 10.3 -> 9.4, B=1 L=32768 (32) 37.0 ->
# 36.3, MQA (32) 41.9 -> 41.1, B=8 L=8192 (64) 66.5 -> 66.4, but B=1 L=131072 (128 tiles)
# 125.2 -> 126.4 (126.6 in run 71).
GLUON_CONTIGUOUS_MAX_TILES = 64


def gluon_preferred(p: PackedProblem, plan: GluonPlan) -> bool:
    """Where ``FLASHDECODE_GLUON=auto`` takes the Gluon kernel: every paged cache it supports
    (its producer warp reads the block table while the consumers compute, and a tile's pages
    arrive as TMA boxes), and a contiguous cache whose grid gives every program an SM of its own
    (``plan.lone``) and whose splits hold at most ``GLUON_CONTIGUOUS_MAX_TILES`` key tiles.

    Timed on an H200 (2026-11-29, benchmark A/B, best of 2 rounds, µs, Triton kernel -> Gluon
    kernel). Run 73, the kernel as it is, paged (page 16): B=1 L=4096 10.7 -> 10.1, MQA B=32
    L=8192 44.8 -> 42.9, B=1 L=32768 39.4 -> 37.7, 9/3 heads D=64 31.1 -> 30.5. Run 71, with the
    next kernel launched early (see `gluon_decode`), paged: 128,2048 252.2 -> 248.9, MHA 16,4096
    254.2 -> 249.3, ragged 503.5 -> 501.0, B=64 L=16384 976.5 -> 985.9. Contiguous grids of more
    than one program per SM stay on the Triton kernel: 0.3-1.8% slower there in run 71 (B=64
    L=16384 957.5 -> 974.4), and 9/3 heads 29.1 -> 31.5 in run 73."""
    if p.block_table.shape[1] > 1:
        return True
    return plan.lone and plan.tiles_per_split <= GLUON_CONTIGUOUS_MAX_TILES


def gluon_plan(p: PackedProblem) -> GluonPlan | None:
    """The plan of the Gluon decode kernel (`gluon_decode.py`) for ``p``, or None where the Triton
    kernel runs: as `gluon_mode` says, never on a GPU other than compute capability 9.x (Hopper's
    TMA with Ampere-style MMA), with a Triton outside ``GLUON_TRITON_VERSIONS``, or for the
    problems `gluon_problem_supported` turns down."""
    mode = gluon_mode()
    if mode == "0":
        return None
    if not (p.q.is_cuda and compute_major(p.q.device) == 9
            and triton.__version__.startswith(GLUON_TRITON_VERSIONS) and gluon_problem_supported(p)):
        return None
    plan = gluon_launch_plan(p, num_sms(p.q.device))
    return plan if mode == "1" or gluon_preferred(p, plan) else None


def gluon_launch_plan(p: PackedProblem, sms: int) -> GluonPlan:
    """Tiles, stages and splits of the Gluon decode kernel for ``p`` on ``sms`` SMs (shapes only):
    the split count of the Triton kernel's contiguous decode grid, paged or not (the producer warp
    hides the block-table reads)."""
    head_dim, num_kv_heads = p.k_pages.shape[3], p.k_pages.shape[2]
    block_n = gluon_block_n(head_dim)
    capacity = p.block_table.shape[1] * p.page_size
    splits = heuristics.choose_num_splits(
        p.num_splits, p.batch, num_kv_heads, 1, capacity, block_n, sms,
        fill_per_sm=heuristics.CONTIGUOUS_PROGRAMS_PER_SM,
    )
    tiles = heuristics.tiles_per_split(capacity, block_n, splits)
    lone = p.batch * num_kv_heads * splits <= sms
    if lone and tiles >= heuristics.LONE_PROGRAM_MIN_TILES:
        stages = heuristics.LONE_PROGRAM_STAGES  # an SM to itself: its shared memory for loads in flight
    else:
        stages = 2 if tiles <= 4 else 3
    return GluonPlan(block_n=block_n, num_stages=stages, splits=splits, tiles_per_split=tiles, lone=lone)


def _split_buffers(out: torch.Tensor, lse: torch.Tensor, splits: int):
    """Where the attention kernels write: (o_dst, l_dst, o_strides, l_strides). With splits, float32
    partials (split, token, head, dim) and log2 LSEs (split, token, head), strides given as (split,
    head, token); without, ``out`` and ``lse`` themselves with a split stride of 0."""
    if splits > 1:
        total_q, num_heads, head_dim = out.shape
        o_dst = torch.empty((splits, total_q, num_heads, head_dim), device=out.device, dtype=torch.float32)
        l_dst = torch.empty((splits, total_q, num_heads), device=out.device, dtype=torch.float32)
        return o_dst, l_dst, o_dst.stride(), (l_dst.stride(0), l_dst.stride(2), l_dst.stride(1))
    return out, lse, (0, *out.stride()), (0, lse.stride(0), lse.stride(1))


def _combine(o_dst: torch.Tensor, l_dst: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, splits: int,
             pdl: bool) -> None:
    """Merge the splits' partial results into ``out`` and ``lse`` (nothing to do for one split)."""
    if splits <= 1:
        return
    total_q, num_heads, head_dim = out.shape
    d_p2 = heuristics.padded_head_dim(head_dim)
    splits_p2 = max(2, heuristics.next_pow2(splits))
    combine_splits_kernel[(total_q, num_heads)](
        o_dst, l_dst, out, lse, splits,
        o_dst.stride(0), o_dst.stride(1), o_dst.stride(2),
        l_dst.stride(0), l_dst.stride(1), l_dst.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=d_p2,
        SPLITS_P2=splits_p2,
        SPLIT_CHUNK=min(splits_p2, max(1, COMBINE_TILE_ELEMENTS // d_p2)),
        USE_PDL=pdl,
        num_warps=4,
        **({"launch_pdl": True} if pdl else {}),
    )


def attention(p: PackedProblem, out: torch.Tensor, lse: torch.Tensor, append: bool = False) -> None:
    """Split-KV attention over the cache; writes ``out`` and ``lse``. With ``append`` (see
    `fuse_append`) the kernel also writes the new keys/values into the cache; otherwise they must
    be there already (`append_kv`)."""
    total_q, num_heads, head_dim = p.q.shape
    if total_q == 0:
        return
    gluon = None if append else gluon_plan(p)
    if gluon is not None:
        from flashdecode.attention.kernels import gluon_decode  # Gluon loads only where it runs

        o_dst, l_dst, o_strides, l_strides = _split_buffers(out, lse, gluon.splits)
        pdl = attention_pdl(p.q.device)
        gluon_decode.launch(p, o_dst, l_dst, o_strides, l_strides, gluon.block_n, gluon.num_stages, gluon.splits,
                            p.softmax_scale * LOG2E, pdl)
        _combine(o_dst, l_dst, out, lse, gluon.splits, pdl)
        return
    num_pages, page_size, num_kv_heads, _ = p.k_pages.shape
    group = num_heads // num_kv_heads
    cfg, n_m_tiles, splits = _plan(p, append)
    d_p2 = heuristics.padded_head_dim(head_dim)
    q, kc, vc, bt = p.q, p.k_pages, p.v_pages, p.block_table
    cos, sin, stride_cos, seqlen_ro = _rotary_tables(p, q)
    alibi = p.alibi_slopes.contiguous() if p.alibi_slopes is not None else q
    softcap = float(p.softcap)
    if softcap > 0.0:
        qk_scale, softcap_log2 = p.softmax_scale / softcap, softcap * LOG2E
    else:
        qk_scale, softcap_log2 = p.softmax_scale * LOG2E, 0.0

    o_dst, l_dst, o_strides, l_strides = _split_buffers(out, lse, splits)

    kn, vn = (p.k_new, p.v_new) if append else (q, q)
    pdl = attention_pdl(q.device)
    pdl_launch = {"launch_pdl": True} if pdl else {}
    gather = heuristics.gather_page(page_size, cfg.block_n, paged_gather_mode())
    descs = kv_descriptors(p, cfg.block_n) if decode_sized(cfg) else None  # measured on decode tiles
    k_desc, v_desc = descs if descs is not None else (kc, vc)
    grid = (n_m_tiles * num_kv_heads, p.batch, splits)
    attention_split_kernel[grid](
        q, kc, vc, bt, p.cu_seqlens_q, p.cache_seqlens, p.cache_leftpad, p.cu_seqlens_k_new,
        p.rotary_seqlens, cos, sin, alibi, o_dst, l_dst, kn, vn, k_desc, v_desc,
        total_q, kn.shape[0] if append else 0, num_kv_heads, num_pages, bt.shape[1], page_size, seqlen_ro,
        qk_scale, softcap_log2, p.window_left, p.window_right,
        q.stride(0), q.stride(1), q.stride(2),
        kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3),
        vc.stride(0), vc.stride(1), vc.stride(2), vc.stride(3),
        bt.stride(0),
        stride_cos,
        alibi.stride(0) if p.alibi_slopes is not None else 0,
        *o_strides,
        *l_strides,
        kn.stride(0), kn.stride(1), kn.stride(2),
        vn.stride(0), vn.stride(1), vn.stride(2),
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=d_p2,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        SPLIT=splits > 1,
        TILE_IN_PAGE=page_size % cfg.block_n == 0,
        GATHER_PAGE=gather,
        SINGLE_PAGE=bt.shape[1] == 1,
        TABLE_ALIGNED=aligned_table(bt.shape[1], cfg.block_n, gather),
        OFFSETS_32=offsets_32(kc, vc),
        HAS_WINDOW_LEFT=p.window_left >= 0,
        HAS_WINDOW_RIGHT=p.window_right >= 0,
        HAS_SOFTCAP=softcap > 0.0,
        HAS_ALIBI=p.alibi_slopes is not None,
        ROTARY_DIM=p.rotary_dim,
        ROTARY_INTERLEAVED=p.rotary_interleaved,
        ROTARY_PER_POSITION=p.causal or p.local,
        # fp32 inputs need exact (not tf32) products; the interpreter's dot mishandles bf16.
        DOT_FP32=q.dtype == torch.float32 or not q.is_cuda,
        LATE_SUM=late_row_sum(cfg),
        APPEND=append,
        APPEND_ROWS=FUSED_APPEND_ROWS,
        USE_PDL=pdl,
        TMA_KV=descs is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_launch,
    )
    _combine(o_dst, l_dst, out, lse, splits, pdl)


def triton_forward(p: PackedProblem, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Append ``p.k_new``/``p.v_new`` into the cache in place, then write ``out`` and ``lse``.

    ``out`` is ``(total_q, H, D)`` in q's dtype, ``lse`` ``(H, total_q)`` float32 (natural log;
    +inf with a zero output for a query row that sees no key). Same contract as
    ``reference_forward``.
    """
    if fuse_append(p):
        attention(p, out, lse, append=True)
    else:
        append_kv(p)
        attention(p, out, lse)
