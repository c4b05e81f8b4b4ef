"""Unit tests of the launch heuristics (pure Python: no GPU, no Triton)."""

from __future__ import annotations

import pytest

from flashdecode.attention import heuristics as hz

H100_SMS = 132


@pytest.mark.parametrize("d, want", [(1, 16), (8, 16), (16, 16), (64, 64), (80, 128), (96, 128), (128, 128), (200, 256), (256, 256)])
def test_padded_head_dim(d, want):
    assert hz.padded_head_dim(d) == want


def test_padded_head_dim_rejects_zero():
    with pytest.raises(ValueError):
        hz.padded_head_dim(0)


@pytest.mark.parametrize("d", [16, 32, 64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("elem_bytes", [2, 4])
@pytest.mark.parametrize("rows", [1, 4, 16, 17, 32, 64, 65, 4096 * 8])
def test_tiles_are_valid_and_fit_shared_memory(d, elem_bytes, rows):
    cfg = hz.choose_tiles(d, elem_bytes, rows)
    for v in (cfg.block_m, cfg.block_n):
        assert v >= 16 and v & (v - 1) == 0  # tl.dot needs powers of two >= 16
    assert cfg.num_warps in (4, 8) and 1 <= cfg.num_stages <= 4
    dp = hz.padded_head_dim(d)
    smem = cfg.block_m * dp * elem_bytes + cfg.num_stages * 2 * cfg.block_n * dp * elem_bytes
    assert smem <= hz.SMEM_BUDGET_BYTES
    if rows <= 64:
        assert cfg.block_m == max(16, hz.next_pow2(rows)) or elem_bytes == 4
        assert cfg.block_m >= min(rows, 64) or elem_bytes == 4


def test_decode_tiles_pack_the_group_into_one_mma_tile():
    # 32/8 heads, Sq=1: 4 rows, padded to the smallest tl.dot M; K tiles ~16 KiB.
    cfg = hz.choose_tiles(128, 2, 4)
    assert (cfg.block_m, cfg.block_n) == (16, 64)
    # MQA 32/1: 32 rows in one tile.
    assert hz.choose_tiles(128, 2, 32).block_m == 32
    # Prefill: large M tiles.
    assert hz.choose_tiles(128, 2, 4096 * 4).block_m == 128


@pytest.mark.parametrize("sq, group, bm, want", [(1, 4, 16, 1), (4, 4, 16, 1), (5, 4, 16, 2), (4096, 4, 128, 128), (0, 4, 16, 1)])
def test_num_query_tiles(sq, group, bm, want):
    assert hz.num_query_tiles(sq, group, bm) == want


def test_explicit_split_count_is_honoured():
    assert hz.choose_num_splits(1, 1, 8, 1, 131072, 64, H100_SMS) == 1
    assert hz.choose_num_splits(7, 1, 8, 1, 131072, 64, H100_SMS) == 7
    assert hz.choose_num_splits(7, 512, 8, 1, 131072, 64, H100_SMS) == 7  # even on a full grid
    # More splits than key tiles would only add empty programs.
    assert hz.choose_num_splits(50, 1, 8, 1, 128, 64, H100_SMS) == 2
    # Otherwise as asked, even when the last split gets no tile (33 splits of 512 tiles).
    assert hz.choose_num_splits(33, 1, 8, 1, 32768, 64, H100_SMS) == 33
    assert hz.choose_num_splits(10**6, 1, 8, 1, 10**9, 64, H100_SMS) == hz.MAX_SPLITS


def test_negative_split_count_is_rejected():
    with pytest.raises(ValueError, match="num_splits"):
        hz.choose_num_splits(-1, 1, 8, 1, 4096, 64, H100_SMS)


def test_no_split_when_the_grid_fills_the_gpu():
    assert hz.choose_num_splits(0, 32, 8, 1, 4096, 64, H100_SMS) == 1  # 256 programs
    assert hz.choose_num_splits(0, 64, 3, 1, 2048, 128, H100_SMS) == 1  # 192 programs: 2 would be 384
    assert hz.choose_num_splits(0, 128, 8, 1, 2048, 64, H100_SMS) == 1  # 1024 programs: two waves
    assert hz.choose_num_splits(0, 4, 8, 128, 4096, 64, H100_SMS) == 1  # prefill


@pytest.mark.parametrize("batch, hk, keys, block_n, want", [
    (8, 8, 8192, 64, 4),  # 64 programs -> 256 (5 splits, 320 programs, was slower)
    (32, 1, 8192, 64, 8),  # MQA: 32 -> 256
    (16, 8, 8192, 32, 2),  # D=256: 128 -> 256 (3 splits, 384 programs, was 1.25x slower)
    (1, 8, 32768, 64, 32),  # B=1: 8 -> 264 programs would leave the 33rd split of 512 tiles empty
    (1, 8, 131072, 64, 33),  # B=1: 2048 tiles, 63 per split, the last one 32
])
def test_small_grids_split_up_to_the_target_programs_per_sm(batch, hk, keys, block_n, want):
    assert hz.choose_num_splits(0, batch, hk, 1, keys, block_n, H100_SMS) == want


@pytest.mark.parametrize("batch, hk, keys, block_n, want", [
    (1, 8, 32768, 64, 16),  # 8 programs -> 128
    (8, 8, 8192, 64, 2),  # 64 -> 128
    (32, 1, 8192, 64, 4),  # MQA: 32 -> 128
    (1, 8, 131072, 64, 16),
    (16, 8, 8192, 32, 1),  # D=256: 128 programs already
    (1, 8, 4096, 64, 16),  # 64 tiles, 4 per split
    (64, 3, 2048, 128, 1),  # 192 programs: past one per SM, short of two
    (1, 1, 4096, 64, 32),  # MIN_TILES_PER_SPLIT caps it (64 tiles)
])
def test_contiguous_small_grids_fill_the_sms_once(batch, hk, keys, block_n, want):
    got = hz.choose_num_splits(0, batch, hk, 1, keys, block_n, H100_SMS, fill_per_sm=hz.CONTIGUOUS_PROGRAMS_PER_SM)
    assert got == want
    assert batch * hk * got <= max(H100_SMS, batch * hk)


def test_a_smaller_shared_memory_budget_gives_fewer_stages():
    # Consumer Ampere/Ada give a program 99 KiB (101376 bytes): a 3-stage prefill tile (128 KiB) would not launch.
    small = 101376
    prefill, decode = hz.choose_tiles(128, 2, 4096 * 4), hz.choose_tiles(128, 2, 4)
    assert hz.tile_smem_bytes(prefill, 128, 2) > small and prefill.num_stages == 3
    for rows in (4, 32, 4096 * 4):
        for d in (64, 128, 256):
            cfg = hz.choose_tiles(d, 2, rows, smem_budget=small)
            assert hz.tile_smem_bytes(cfg, d, 2) <= small and cfg.num_stages >= 2
    assert hz.choose_tiles(128, 2, 4096 * 4, smem_budget=small) == hz.TileConfig(128, 64, 8, 2)
    assert hz.choose_tiles(128, 2, 4, smem_budget=small) == hz.TileConfig(16, 64, 4, 2)
    assert hz.choose_tiles(128, 2, 4, smem_budget=hz.SMEM_BUDGET_BYTES) == decode
    lone = hz.TileConfig(16, 64, 4, 2)
    assert hz.deepen_lone_programs(lone, 8, H100_SMS, 1 << 16, 8, 128, 2, smem_budget=small) == lone


def test_lone_programs_get_a_deeper_pipeline():
    cfg = hz.TileConfig(block_m=16, block_n=64, num_warps=4, num_stages=3)
    deeper = hz.deepen_lone_programs(cfg, 128, H100_SMS, 32768, 16, 128, 2)  # 32 tiles per split
    assert deeper == hz.TileConfig(block_m=16, block_n=64, num_warps=4, num_stages=hz.LONE_PROGRAM_STAGES)
    assert hz.deepen_lone_programs(cfg, 133, H100_SMS, 32768, 16, 128, 2) == cfg  # two programs on some SM
    assert hz.deepen_lone_programs(cfg, 128, H100_SMS, 4096, 16, 128, 2) == cfg  # 4 tiles per split
    assert hz.deepen_lone_programs(cfg, 128, H100_SMS, 512 * 64 - 1, 64, 128, 2) == deeper  # 8 tiles per split
    assert hz.deepen_lone_programs(cfg, 128, H100_SMS, 448 * 64, 64, 128, 2) == cfg  # 7
    # 4 stages of fp32 128-key tiles at D=128 would need 512 KiB: kept at 3.
    wide = hz.TileConfig(block_m=16, block_n=128, num_warps=4, num_stages=3)
    assert hz.deepen_lone_programs(wide, 1, H100_SMS, 1 << 20, 1, 128, 4) == wide
    assert hz.tile_smem_bytes(deeper, 128, 2) == (16 + 4 * 2 * 64) * 128 * 2 <= hz.SMEM_BUDGET_BYTES


def test_one_uneven_wave_is_split_into_several():
    # 512 programs (16 x 32 heads, or 64 x 8) fit the SMs at 4 per SM in one uneven wave: split into ~3 waves.
    assert hz.choose_num_splits(0, 16, 32, 1, 4096, 64, H100_SMS) == 4
    assert hz.choose_num_splits(0, 64, 8, 1, 4096, 64, H100_SMS) == 4
    assert hz.choose_num_splits(0, 64, 8, 1, 16384, 64, H100_SMS) == 4
    # The fused-append kernel holds 2 programs per SM: 512 programs are two even waves.
    two = hz.FUSED_APPEND_RESIDENT_PROGRAMS_PER_SM
    assert hz.choose_num_splits(0, 64, 8, 1, 4096, 64, H100_SMS, resident_per_sm=two) == 1
    # Not for prefill tiles.
    assert hz.choose_num_splits(0, 16, 8, 4, 4096, 64, H100_SMS) == 1


def test_long_caches_split_even_on_a_full_grid():
    # A ragged batch of capacity 16K past one wave: the longest sequences must not run alone at the end.
    assert hz.choose_num_splits(0, 128, 8, 1, 16384, 64, H100_SMS) == 2
    assert hz.choose_num_splits(0, 128, 8, 1, 8192, 64, H100_SMS) == 1
    # Not for prefill tiles: there the query rows already give enough programs.
    assert hz.choose_num_splits(0, 64, 8, 4, 16384, 64, H100_SMS) == 1


@pytest.mark.parametrize("splits, tiles, want", [(1, 1, 1), (5, 3, 3), (33, 512, 32), (33, 2048, 33), (7, 20, 7),
                                                 (6, 20, 5), (128, 129, 65), (3, 1, 1)])
def test_non_empty_splits(splits, tiles, want):
    got = hz.non_empty_splits(splits, tiles)
    assert got == want
    per = hz.cdiv(tiles, got)
    assert (got - 1) * per < tiles <= got * per  # the last split has work, none is left over
    assert per == hz.cdiv(tiles, min(splits, tiles))  # the longest split is as before


def test_no_split_for_tiny_caches():
    assert hz.choose_num_splits(0, 1, 8, 1, 64, 64, H100_SMS) == 1
    assert hz.choose_num_splits(0, 1, 8, 1, 100, 64, H100_SMS) == 1  # two tiles: too few to split


@pytest.mark.parametrize("batch, hk, keys", [(1, 8, 4096), (1, 8, 32768), (1, 8, 131072), (8, 8, 8192), (2, 1, 8192), (1, 1, 2048), (3, 3, 2048)])
def test_split_heuristic_fills_the_gpu(batch, hk, keys):
    block_n = 64
    s = hz.choose_num_splits(0, batch, hk, 1, keys, block_n, H100_SMS)
    programs = batch * hk * s
    tiles = hz.cdiv(keys, block_n)
    assert 1 < s <= hz.MAX_SPLITS
    assert hz.cdiv(tiles, s) >= hz.MIN_TILES_PER_SPLIT
    target = hz.TARGET_PROGRAMS_PER_SM * H100_SMS
    # Never past the target programs per SM...
    assert programs <= target
    # ...every split gets key tiles...
    assert (s - 1) * hz.cdiv(tiles, s) < tiles
    # ...and one more split would pass the target, or not shorten the longest split, or the key
    # tiles ran out first.
    assert (programs + batch * hk > target or hz.cdiv(tiles, s + 1) == hz.cdiv(tiles, s)
            or s == tiles // hz.MIN_TILES_PER_SPLIT)


def test_split_heuristic_is_a_function_of_shapes_only():
    # Same shapes, same answer: the grid never depends on the lengths inside the tensors.
    a = [hz.choose_num_splits(0, 1, 8, 1, 4096, 64, H100_SMS) for _ in range(3)]
    assert len(set(a)) == 1
    # The interpreter/CPU path reports one SM: no split unless asked.
    assert hz.choose_num_splits(0, 1, 1, 1, 4096, 64, 1) == 1


def test_combine_block_h():
    assert hz.combine_block_h(32, 128) == 32
    assert hz.combine_block_h(9, 64) == 16
    assert hz.combine_block_h(64, 256) == 16
    assert hz.combine_block_h(1, 80) == 1


def test_pipeline_depth_is_capped_by_the_tiles_of_a_split():
    cfg = hz.TileConfig(block_m=16, block_n=64, num_warps=4, num_stages=3)
    assert hz.cap_stages(cfg, 4096, 32).num_stages == 2  # 2 tiles per split
    assert hz.cap_stages(cfg, 4096, 1).num_stages == 3
    assert hz.cap_stages(cfg, 64, 1).num_stages == 2  # never below 2
    assert hz.cap_stages(cfg, 4096, 32).block_n == 64


def test_short_splits_take_half_size_key_tiles():
    cfg = hz.TileConfig(block_m=16, block_n=64, num_warps=4, num_stages=3)
    half = hz.TileConfig(block_m=16, block_n=32, num_warps=4, num_stages=3)
    assert hz.halve_short_split_tiles(cfg, 4096, 32) == half  # 2 tiles of 64 per split
    assert hz.halve_short_split_tiles(cfg, 4096, 22) == cfg  # 3 tiles dealt to a split (the last gets 1)
    assert hz.halve_short_split_tiles(cfg, 4096 + 1, 32) == cfg  # 65 tiles: 3 per split
    assert hz.halve_short_split_tiles(cfg, 64 * 3, 1) == cfg  # 3
    assert hz.halve_short_split_tiles(cfg, 64 * 2, 1) == half  # 2
    assert hz.halve_short_split_tiles(cfg, 1, 1) == half  # one short tile
    narrow = hz.TileConfig(block_m=16, block_n=32, num_warps=4, num_stages=3)  # D=256
    assert hz.halve_short_split_tiles(narrow, 64, 1) == narrow  # not below SHORT_SPLIT_MIN_BLOCK_N


@pytest.mark.parametrize("page, block_n, want", [
    (1, 64, 1), (2, 64, 2), (4, 128, 4), (16, 64, 16), (16, 32, 16), (32, 64, 32),
    (16, 16, 0),  # a page per tile: read once per tile already (TILE_IN_PAGE)
    (64, 64, 0), (256, 64, 0), (3, 64, 0), (48, 64, 0), (24, 128, 0),  # not a power of two below the tile
])
def test_gather_page_applies_to_powers_of_two_below_the_key_tile(page, block_n, want):
    assert hz.gather_page(page, block_n, "page") == want
    assert hz.gather_page(page, block_n, "row") == 0
    default = want if hz.PAGED_GATHER_DEFAULT == "page" else 0
    assert hz.gather_page(page, block_n) == hz.gather_page(page, block_n, "auto") == hz.gather_page(page, block_n, "") == default


def test_gather_page_default_and_bad_mode():
    assert hz.PAGED_GATHER_DEFAULT in hz.PAGED_GATHER_MODES
    with pytest.raises(ValueError, match="paged gather mode"):
        hz.gather_page(16, 64, "tile")
