"""Launch heuristics for the Triton attention kernels: tile sizes and the split-KV count.

Pure Python (no torch, no GPU) so that they can be unit-tested anywhere. Every input is a shape or
a device property, never a tensor value: the launch grid must depend on capacity only, so a decode
step captured in a CUDA graph stays valid when the caller changes ``cache_seqlens``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Upper bound on the split count: past this the combine kernel and the partial-output traffic
# cost more than the extra parallelism brings.
MAX_SPLITS = 128
# A split should own at least this many key tiles, or its fixed cost (loading the query tile,
# writing a partial result) dominates.
MIN_TILES_PER_SPLIT = 2
# Shared memory we allow one program to use (H100/H200 have 227 KiB per SM; leave room for two
# programs per SM at decode tile sizes).
SMEM_BUDGET_BYTES = 160 * 1024
# Decode is bound by memory latency as much as bandwidth: one program per SM cannot keep enough
# loads in flight. Measured on an H200 (2026-11-28, bf16): unsplit grids of ~1 program per SM
# reached 58-87% of the read ceiling, grids of 2-8 programs per SM 94-102%; a sweep over split
# counts put the optimum of small grids near 2 programs per SM (4 per SM was 10-50% slower: the
# partial results and the combine cost more than the extra loads in flight bring), and splitting a
# grid of 1.45 programs per SM (64 x 9/3 heads) made it slower. So a grid smaller than
# MIN_PROGRAMS_PER_SM * SMs is split until it has about TARGET_PROGRAMS_PER_SM * SMs programs.
MIN_PROGRAMS_PER_SM = 1.25
TARGET_PROGRAMS_PER_SM = 2
# With a full grid, decode programs still split caches longer than this: in a ragged batch the
# longest sequences would otherwise run alone at the end. The partial results cost
# ~8 * splits * H * D bytes per query row, nothing next to reading 8K keys.
LONG_SPLIT_KEYS = 8192


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the attention kernel. ``block_m`` rows pack query positions x heads of a group."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def padded_head_dim(head_dim: int) -> int:
    """Head dim rounded up to a power of two, at least 16 (the smallest `tl.dot` K)."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    return max(16, next_pow2(head_dim))


def choose_tiles(head_dim: int, elem_bytes: int, rows_per_seq: int) -> TileConfig:
    """Tile sizes for one (query-row tile, KV head) program.

    ``rows_per_seq`` is ``max_seqlen_q * group`` (query positions times query heads per KV head):
    the M extent of the packed query tile. Decode (few rows) uses the smallest M that `tl.dot`
    accepts and a wide key tile, since it is bound by reading K/V; prefill uses large M tiles.
    """
    d = padded_head_dim(head_dim)
    if elem_bytes not in (2, 4):
        raise ValueError(f"elem_bytes must be 2 or 4, got {elem_bytes}")
    rows = max(1, rows_per_seq)
    if rows <= 64:
        block_m = max(16, next_pow2(rows))
        num_warps = 4
        # ~16 KiB per K tile for 16-bit inputs: 128 x 64, 64 x 128, 32 x 256.
        block_n = max(16, min(128, (128 * 64) // d))
    else:
        block_m = 128 if d <= 128 else 64
        num_warps = 8 if block_m == 128 else 4
        block_n = 64 if d <= 128 else 32
    if elem_bytes == 4:
        # fp32 tiles are twice the bytes and `tl.dot` runs on CUDA cores: keep registers in check.
        block_m = min(block_m, 64)
        block_n = max(16, block_n // 2)
        num_warps = 4
    num_stages = 4 if d <= 64 else 3 if d <= 128 else 2

    def smem(stages: int, bn: int) -> int:
        return block_m * d * elem_bytes + stages * 2 * bn * d * elem_bytes

    while num_stages > 1 and smem(num_stages, block_n) > SMEM_BUDGET_BYTES:
        num_stages -= 1
    while block_n > 16 and smem(num_stages, block_n) > SMEM_BUDGET_BYTES:
        block_n //= 2
    return TileConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


def cap_stages(cfg: TileConfig, max_keys: int, splits: int) -> TileConfig:
    """No deeper software pipeline than a split has key tiles: extra stages only add prologue loads.

    On an H200 (2026-11-28, B=1, L=4096, 32/8 heads, 32 splits of 2 tiles) the benchmark moved from
    18.1 to 17.5 us with this cap.
    """
    tiles_per_split = cdiv(cdiv(max(1, max_keys), cfg.block_n), max(1, splits))
    stages = max(2, min(cfg.num_stages, tiles_per_split))
    if stages == cfg.num_stages:
        return cfg
    return TileConfig(block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=stages)


# Gather mode of paged K/V: "row" looks up the block table once per key slot (any page size);
# "page" reads the BLOCK_N // page_size entries of a key tile once and repeats each for the slots
# of its page, with the in-page slot a constant mask (page size a compile-time power of two below
# BLOCK_N). Both read the same addresses with the same floating-point code. Compiled for sm_90,
# the unmasked "page" loop (bf16, D=128, BLOCK_N=64, 4 warps, page 16) has 354 vs 797 SASS
# instructions per key tile, no integer division, and the same 16-byte cp.async loads. On an
# H200 (2026-11-28) "page" was 0.94-1.02x the contiguous cache on six decode shapes where "row"
# was 1.17-1.58x (run 5), and 0.80-1.04x on all eleven decode shapes of the benchmark (run 15).
# FLASHDECODE_PAGED_GATHER=row (launch.py) restores the per-slot lookup.
PAGED_GATHER_MODES = ("row", "page")
PAGED_GATHER_DEFAULT = "page"


def is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def gather_page(page_size: int, block_n: int, mode: str | None = None) -> int:
    """The kernel's ``GATHER_PAGE``: ``page_size`` if key tiles read their block-table entries once
    per page, 0 if once per key slot (or once per tile, when the page is a multiple of ``block_n``).

    ``mode`` is ``"row"``, ``"page"``, or ``None``/``""``/``"auto"`` for ``PAGED_GATHER_DEFAULT``.
    The per-page gather applies only to page sizes that are powers of two smaller than ``block_n``;
    other page sizes keep their path whatever ``mode`` says.
    """
    if mode in (None, "", "auto"):
        mode = PAGED_GATHER_DEFAULT
    if mode not in PAGED_GATHER_MODES:
        raise ValueError(f"paged gather mode must be one of {PAGED_GATHER_MODES} or 'auto', got {mode!r}")
    if mode == "page" and is_pow2(page_size) and page_size < block_n:
        return page_size
    return 0


def num_query_tiles(max_seqlen_q: int, group: int, block_m: int) -> int:
    """Number of M tiles per (sequence, KV head): rows are ``position * group + head_in_group``."""
    return max(1, cdiv(max(1, max_seqlen_q) * group, block_m))


def choose_num_splits(
    requested: int,
    batch: int,
    num_kv_heads: int,
    num_m_tiles: int,
    max_keys: int,
    block_n: int,
    num_sms: int,
    max_splits: int = MAX_SPLITS,
) -> int:
    """How many programs share one sequence's keys (split-KV, "flash-decoding").

    ``requested`` is the user's ``num_splits``: 1 means no split, n > 1 is honoured (capped by
    the number of key tiles, as more splits would be empty), 0 asks for the heuristic.
    ``max_keys`` is the largest number of keys a sequence can have (the cache capacity in slots,
    or a known bound on the lengths); the result depends only on shapes and the SM count.

    The heuristic: a grid of at least ``MIN_PROGRAMS_PER_SM`` programs per SM is not split, but
    for decode-sized tiles over caches longer than ``LONG_SPLIT_KEYS`` (load balance of ragged
    batches); a smaller grid is split until it has about ``TARGET_PROGRAMS_PER_SM`` programs per
    SM, each split keeping at least ``MIN_TILES_PER_SPLIT`` key tiles.
    """
    if requested < 0:
        raise ValueError(f"num_splits must be >= 0, got {requested}")
    n_tiles = max(1, cdiv(max(1, max_keys), block_n))
    if requested >= 1:
        return max(1, min(requested, n_tiles, max_splits))
    programs = max(1, batch * num_kv_heads * num_m_tiles)
    num_sms = max(1, num_sms)
    if num_sms == 1:
        return 1  # the CPU interpreter: no parallelism to gain
    if programs >= MIN_PROGRAMS_PER_SM * num_sms:
        if num_m_tiles == 1:
            return max(1, min(max_splits, cdiv(max_keys, LONG_SPLIT_KEYS), n_tiles // MIN_TILES_PER_SPLIT))
        return 1
    wanted = cdiv(TARGET_PROGRAMS_PER_SM * num_sms, programs)
    return max(1, min(max_splits, n_tiles // MIN_TILES_PER_SPLIT, wanted))


def combine_block_h(num_heads: int, head_dim: int) -> int:
    """Heads per program of the combine kernel: about 4K output elements per program."""
    d = padded_head_dim(head_dim)
    return max(1, min(next_pow2(num_heads), 4096 // d))
