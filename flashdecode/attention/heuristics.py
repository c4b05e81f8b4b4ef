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
# Decode is bound by memory latency as much as bandwidth: a grid of one program per SM cannot keep
# enough loads in flight. A split sweep on an H200 (2026-11-28, bf16, cold L2, run 17,
# scripts/sweep_splits.py) put the optimum of every grid below 2 programs per SM at the largest
# split count that stays within TARGET_PROGRAMS_PER_SM programs per SM: B=8 L=8192 32/8 heads 75.6 us
# at 4 splits (256 programs) against 79.7 at 5 (320); MQA B=32 L=8192 52.2 us at 8 splits against 61.2
# at 9 (288); B=16 L=8192 16/8 heads D=256 at 2 splits (256) against 3 (384, 1.25x slower). Past the
# target a grid is one uneven wave of up to RESIDENT_PROGRAMS_PER_SM programs per SM, and it was slow.
# Since run 51 this fills the paged cache's grids; contiguous decode grids fill the SMs once
# (CONTIGUOUS_PROGRAMS_PER_SM).
TARGET_PROGRAMS_PER_SM = 2
# Upper end, in programs per SM, of the grids split into several waves (see `choose_num_splits`).
# The name says what it was meant to be, the programs of the decode kernel one SM holds at once,
# but the value is a measured threshold: compiled by Triton 3.6 for sm_90 (bf16, D=128, 64-key
# tiles, 3 stages, 4 warps), the decode kernel had 152 registers per thread (105 since the 32-bit
# key offsets) and has 70 KiB of shared memory, so an SM holds 3 of its programs, not 4. A grid of more than
# TARGET_PROGRAMS_PER_SM and at most 4 programs per SM runs as one to 1.3 waves, uneven, and every
# program streams for the whole kernel: 512 programs of 4096 keys took 293-295 us, 1.12-1.13x the
# time of the same work split 3-4 ways (1536-2048 programs, several waves that balance themselves),
# and B=64 L=16384 took 1018 us at 2 splits, 969 at 4 (run 17). Such grids are split into about
# BALANCED_WAVES waves. Past 4 per SM, 1024 programs of 2048 keys (2.6 waves of 3) were no faster
# at 2 splits (263.9 against 264.4 us).
RESIDENT_PROGRAMS_PER_SM = 4
# A contiguous cache's small decode grid fills the SMs once, not TARGET_PROGRAMS_PER_SM times: its
# key tiles need no block-table read before their loads, and with the kernel as of run 51 (TMA
# path, late row sum) one program per SM was as fast or faster. On an H200 (2026-11-28, decode, same
# run, two rounds; run 51) B=1 L=32768 took 37.1 us at 16 splits (128 programs) against 37.8 at
# 32, B=8 L=8192 66.8 at 2 splits against 67.3 at 4, B=1 L=4096 10.3 against 10.4; D=256
# (16,8192, 16/8 heads) 247.6 at 1 split against 246.0 at 2 (but see LONE_PROGRAM_STAGES). The
# paged cache (page 16) lost up to 8% there (8,8192 68.6 -> 72.3 us, MQA 45.1 -> 49.7): it keeps
# the target. Run 50, another machine, agreed (1,32768 36.3 against 37.2 us).
CONTIGUOUS_PROGRAMS_PER_SM = 1
# Pipeline depth of a program that has its SM to itself (a contiguous decode grid of at most one
# program per SM, above) and a split of at least LONE_PROGRAM_MIN_TILES key tiles: the shared
# memory of a second program goes to more loads in flight. Run 51 (contiguous, one program per
# SM, 3 -> 4 stages): MQA 43.0 -> 42.0 us, D=256 247.6 -> 241.5, B=1 L=131072 126.7 -> 125.2,
# B=1 L=32768 37.1 -> 37.0, B=8 L=8192 66.8 -> 66.6; but B=1 L=4096, 4 tiles per split,
# 10.3 -> 10.8 (the prologue loads are then the whole loop).
LONE_PROGRAM_STAGES = 4
LONE_PROGRAM_MIN_TILES = 8
# The attention kernel with the fused append and rotary holds 247 registers per thread (Triton 3.6,
# sm_90, contiguous cache; 230 with Triton 3.9): 2 programs per SM, so 512 programs are two even
# waves, and 1 split was its fastest (258.9 us against 280.7 at 4, run 17). (Its paged variant
# compiles to 168 registers and 16 bytes of spill: 3 per SM.) Register and shared-memory figures:
# `python -m flashdecode.attention.kernels.aot_check` with the GPU machine's Triton version.
FUSED_APPEND_RESIDENT_PROGRAMS_PER_SM = 2
# A paged decode split of fewer than SHORT_SPLIT_TILES key tiles gets key tiles half as long (not
# below SHORT_SPLIT_MIN_BLOCK_N keys), which gives its pipeline tiles to overlap while it waits for
# block-table entries. On an H200 (2026-11-28, page 16, 32/8 heads, D=128): run 53's sweep of
# B=1 L=4096 (32 splits of 2 tiles of 64 keys, which `cap_stages` leaves at 2 stages) found 32-key
# tiles at 3 stages fastest, 10.7 us against 11.1; run 54's A/B (best of 3 rounds) took the paged
# cache from 11.1 to 10.7 us at B=1 L=4096, 9.0 -> 8.5 at B=1 L=2048, 10.6 -> 10.4 at B=2 L=2048,
# 8.1 -> 7.8 at B=1 L=1024, 10.6 -> 10.4 at B=4 L=1024 and 7.6 -> 7.3 at B=1 L=512. The contiguous
# cache (TMA loads, no table) did not gain: 8.5 -> 8.4 at B=1 L=2048, 7.6 -> 7.7 at L=1024,
# 7.0 -> 7.2 at L=512; the launcher keeps its tiles. Compiled by Triton 3.6 for sm_90 (`aot_check`
# decode-short-split-gather16), the 32-key paged tile at 3 stages has 37 KiB of shared memory and
# 138 registers (64-key tiles: 70 KiB, 193) and 195 SASS instructions per key tile (280).
SHORT_SPLIT_TILES = 3
SHORT_SPLIT_MIN_BLOCK_N = 32
BALANCED_WAVES = 3
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


def choose_tiles(head_dim: int, elem_bytes: int, rows_per_seq: int,
                 smem_budget: int = SMEM_BUDGET_BYTES) -> TileConfig:
    """Tile sizes for one (query-row tile, KV head) program.

    ``rows_per_seq`` is ``max_seqlen_q * group`` (query positions times query heads per KV head):
    the M extent of the packed query tile. Decode (few rows) uses the smallest M that `tl.dot`
    accepts and a wide key tile, since it is bound by reading K/V; prefill uses large M tiles.
    ``smem_budget`` caps the shared memory of `tile_smem_bytes` (the launcher passes less than
    ``SMEM_BUDGET_BYTES`` for GPUs that give a program less: 99 KiB on consumer Ampere and Ada).
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
    if rows <= 64:
        # 3 stages for every head dim: on an H200 (run 17) D=64 took 36.6 us at 3 stages against 39.1
        # at 4 (B=64 L=2048 9/3 heads), and D=256 253.2 us at 3 against 285.7 at 2 (B=16 L=8192 16/8).
        num_stages = 3
    else:
        num_stages = 4 if d <= 64 else 3 if d <= 128 else 2

    def smem(stages: int, bn: int) -> int:
        return tile_smem_bytes(TileConfig(block_m, bn, num_warps, stages), d, elem_bytes)

    while num_stages > 1 and smem(num_stages, block_n) > smem_budget:
        num_stages -= 1
    while block_n > 16 and smem(num_stages, block_n) > smem_budget:
        block_n //= 2
    return TileConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


def tile_smem_bytes(cfg: TileConfig, padded_dim: int, elem_bytes: int) -> int:
    """Shared memory of the query tile and ``num_stages`` K and V tiles (the estimate
    `choose_tiles` keeps within ``SMEM_BUDGET_BYTES``)."""
    return (cfg.block_m + cfg.num_stages * 2 * cfg.block_n) * padded_dim * elem_bytes


def tiles_per_split(max_keys: int, block_n: int, splits: int) -> int:
    """Key tiles of the longest split when ``max_keys`` keys are dealt to ``splits`` splits in
    tiles of ``block_n`` (as the kernel deals them)."""
    return cdiv(cdiv(max(1, max_keys), block_n), max(1, splits))


def cap_stages(cfg: TileConfig, max_keys: int, splits: int) -> TileConfig:
    """No deeper software pipeline than a split has key tiles: extra stages only add prologue loads.

    On an H200 (2026-11-28, B=1, L=4096, 32/8 heads, 32 splits of 2 tiles) the benchmark moved from
    18.1 to 17.5 us with this cap.
    """
    tiles = tiles_per_split(max_keys, cfg.block_n, splits)
    stages = max(2, min(cfg.num_stages, tiles))
    if stages == cfg.num_stages:
        return cfg
    return TileConfig(block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=stages)


def halve_short_split_tiles(cfg: TileConfig, max_keys: int, splits: int) -> TileConfig:
    """Half-size key tiles (not below ``SHORT_SPLIT_MIN_BLOCK_N``) for a split of fewer than
    ``SHORT_SPLIT_TILES`` key tiles, so that its software pipeline has tiles to overlap; ``cfg``
    otherwise. The launcher asks for paged decode tiles only (where it was measured), before
    `cap_stages`."""
    tiles = tiles_per_split(max_keys, cfg.block_n, splits)
    if tiles >= SHORT_SPLIT_TILES or cfg.block_n // 2 < SHORT_SPLIT_MIN_BLOCK_N:
        return cfg
    return TileConfig(block_m=cfg.block_m, block_n=cfg.block_n // 2, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)


def deepen_lone_programs(cfg: TileConfig, programs: int, num_sms: int, max_keys: int, splits: int,
                         head_dim: int, elem_bytes: int, smem_budget: int = SMEM_BUDGET_BYTES) -> TileConfig:
    """``LONE_PROGRAM_STAGES`` pipeline stages where every program has an SM to itself
    (``programs`` <= ``num_sms``), its split holds at least ``LONE_PROGRAM_MIN_TILES`` key tiles
    and the stages fit ``smem_budget``; ``cfg`` otherwise. The launcher asks for contiguous
    decode grids only, where it was measured."""
    tiles = tiles_per_split(max_keys, cfg.block_n, splits)
    if programs > num_sms or tiles < LONE_PROGRAM_MIN_TILES or cfg.num_stages >= LONE_PROGRAM_STAGES:
        return cfg
    deeper = TileConfig(block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps,
                        num_stages=LONE_PROGRAM_STAGES)
    if tile_smem_bytes(deeper, padded_head_dim(head_dim), elem_bytes) > smem_budget:
        return cfg
    return deeper


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
    resident_per_sm: int = RESIDENT_PROGRAMS_PER_SM,
    fill_per_sm: int = TARGET_PROGRAMS_PER_SM,
) -> int:
    """How many programs share one sequence's keys (split-KV, "flash-decoding").

    ``requested`` is the user's ``num_splits``: 1 means no split, n > 1 is honoured (capped by
    the number of key tiles), 0 asks for the heuristic, whose count never leaves a split without
    key tiles (`non_empty_splits`).
    ``max_keys`` is the largest number of keys a sequence can have (the cache capacity in slots,
    or a known bound on the lengths); the result depends only on shapes and the SM count.
    ``resident_per_sm`` is how many programs of the kernel one SM holds at once; ``fill_per_sm``
    how many programs per SM a small grid is split into (``CONTIGUOUS_PROGRAMS_PER_SM`` for a
    contiguous cache's decode grid).

    The heuristic, with P the programs of an unsplit grid and S the SMs (each split keeps at least
    ``MIN_TILES_PER_SPLIT`` key tiles):

    * P < TARGET * S: the most splits that keep the grid within ``fill_per_sm`` programs per SM
      (at least 1);
    * decode tiles, TARGET * S <= P <= resident * S (one uneven wave): about ``BALANCED_WAVES`` waves;
    * otherwise decode tiles split caches longer than ``LONG_SPLIT_KEYS`` (ragged batches), and
      prefill tiles are not split.
    """
    if requested < 0:
        raise ValueError(f"num_splits must be >= 0, got {requested}")
    n_tiles = max(1, cdiv(max(1, max_keys), block_n))
    if requested >= 1:
        # Honoured as asked (tests use it to give the kernel splits that end up empty).
        return max(1, min(requested, n_tiles, max_splits))
    programs = max(1, batch * num_kv_heads * num_m_tiles)
    num_sms = max(1, num_sms)
    if num_sms == 1:
        return 1  # the CPU interpreter: no parallelism to gain
    most = max(1, min(max_splits, n_tiles // MIN_TILES_PER_SPLIT))
    if programs < TARGET_PROGRAMS_PER_SM * num_sms:
        splits = max(1, (fill_per_sm * num_sms) // programs)
    elif num_m_tiles > 1:
        splits = 1
    elif programs <= resident_per_sm * num_sms:
        splits = cdiv(BALANCED_WAVES * resident_per_sm * num_sms, programs)
    else:
        splits = cdiv(max_keys, LONG_SPLIT_KEYS)
    return non_empty_splits(min(most, splits), n_tiles)


def non_empty_splits(splits: int, n_tiles: int) -> int:
    """The splits that get work when ``n_tiles`` key tiles are dealt ``cdiv(n_tiles, splits)`` to
    a split (as the kernel deals them): 33 splits of 512 tiles leave the 33rd empty, so 32.

    The longest split, and so the kernel's time, stays the same; the grid loses programs that
    only write an empty partial result and the combine reads one partial fewer. On an H200
    (2026-11-28, B=1 L=32768 32/8 heads) 32 splits took 44.6 µs against 45.7 at 33 in run 17,
    and 37.9 against 38.5 in run 28 (same call, best of 2 rounds).
    """
    splits = max(1, min(splits, n_tiles))
    return cdiv(n_tiles, cdiv(n_tiles, splits))


def combine_block_h(num_heads: int, head_dim: int) -> int:
    """Heads per program of the combine kernel: about 4K output elements per program."""
    d = padded_head_dim(head_dim)
    return max(1, min(next_pow2(num_heads), 4096 // d))
