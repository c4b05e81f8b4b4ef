"""Sweep the attention kernel's tile sizes and split counts on decode shapes (GPU only).

For each shape, contiguous and paged (page 16, shuffled pool), times every (block_n, num_warps,
num_stages, splits) variant by CUDA-graph replay and prints the best next to the heuristic's pick.
Outputs are not checked (`scripts/sweep_splits.py` checks each row against the fp32 reference).
Caveat: the inputs are not rotated, so shapes whose K/V fit in L2 (about 50 MB) read warm here and
look faster than in the benchmark, which keeps L2 cold. `scripts/sweep_splits.py` sweeps split
counts and tiles with the benchmark's cold-L2 inputs; the split heuristic now comes from it.

With ``--paged-variants`` every paged shape is timed under both gather modes of the paged K/V
(``FLASHDECODE_PAGED_GATHER=row``: one block-table lookup per key slot; ``page``: one per page,
see heuristics.gather_page), and a summary gives each mode's time at the heuristic's config and
its best, next to the contiguous cache. ``--heuristic-only`` times only the heuristic's config (a
quick A/B of the modes). ``--engine-variants`` times the op as the engine's decode step calls it
(paged 16, 2048-slot table, 640 keys, one new key appended with rotary, causal) for split counts
1-8 and the heuristic's, with the append fused into the attention kernel or not
(``FLASHDECODE_FUSED_APPEND``); add ``--engine-only`` to skip the tile sweep.

Usage: python scripts/tune_decode.py [--quick] [--paged-variants] [--heuristic-only]
       [--engine-variants [--engine-only]] [--out sweep.json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashdecode import flash_attn_with_kvcache  # noqa: E402
from flashdecode.attention import heuristics  # noqa: E402
from flashdecode.attention.kernels import launch  # noqa: E402

SHAPES = [  # B, L, Hq, Hk, D
    (1, 4096, 32, 8, 128),
    (1, 32768, 32, 8, 128),
    (8, 8192, 32, 8, 128),
    (32, 8192, 32, 1, 128),
    (64, 2048, 9, 3, 64),
    (16, 8192, 16, 8, 256),
    # the engine's batch-1 decode (512-token prompt + 256 new: the table holds 1024 slots)
    (1, 1024, 9, 3, 64),
    (1, 1024, 32, 8, 128),
]


def make_inputs(b, l, hq, hk, d, paged, page=16):
    dev = "cuda"
    q = torch.randn(b, 1, hq, d, device=dev, dtype=torch.bfloat16)
    seqlens = torch.full((b,), l, dtype=torch.int32, device=dev)
    if not paged:
        k = torch.randn(b, l, hk, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        return dict(q=q, k_cache=k, v_cache=v, cache_seqlens=seqlens)
    pages_per_seq = l // page
    n = b * pages_per_seq
    k = torch.randn(n, page, hk, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = torch.randperm(n, device=dev).to(torch.int32).reshape(b, pages_per_seq)
    return dict(q=q, k_cache=k, v_cache=v, cache_seqlens=seqlens, block_table=table)


@contextlib.contextmanager
def env_set(name: str, value: str | None):
    """``os.environ[name] = value`` (None: unset) inside the block, restored after it."""
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def time_graph(fn, calls=10, reps=15) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(a.elapsed_time(e) * 1e3 / calls)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; stops starting shapes after this")
    ap.add_argument("--paged-variants", action="store_true",
                    help="time paged shapes under both FLASHDECODE_PAGED_GATHER modes (row, page)")
    ap.add_argument("--heuristic-only", action="store_true", help="time only the heuristic's tile config and splits")
    ap.add_argument("--engine-variants", action="store_true",
                    help="time the engine's decode call for split counts x fused append")
    ap.add_argument("--engine-only", action="store_true", help="only the --engine-variants table")
    args = ap.parse_args()
    if args.engine_only:
        rows = engine_variants()
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
        return 0
    original = heuristics.choose_tiles
    sms = launch.num_sms(torch.device("cuda"))
    results = []
    summary = {}  # (shape, layout) -> (heuristic us, best us)
    env_before = os.environ.get(launch.PAGED_GATHER_ENV)
    start = time.time()
    for (b, l, hq, hk, d), paged in itertools.product(SHAPES, (False, True)):
        if time.time() - start > args.budget:
            print("budget spent; stopping", flush=True)
            break
        inputs = make_inputs(b, l, hq, hk, d, paged)
        modes = ("row", "page") if paged and args.paged_variants else (env_before,)
        for mode in modes:
            with env_set(launch.PAGED_GATHER_ENV, mode):
                layout = "contig" if not paged else f"paged16-{mode or heuristics.PAGED_GATHER_DEFAULT}"
                summary[((b, l, hq, hk, d), layout)] = sweep_shape(args, inputs, (b, l, hq, hk, d), paged, layout,
                                                                   original, sms, results)
        del inputs
        torch.cuda.empty_cache()
    if args.paged_variants:
        print("\nheuristic config (best of the sweep), us; ratio = paged / contiguous at the heuristic config")
        for shape in SHAPES:
            c = summary.get((shape, "contig"))
            r, g = summary.get((shape, "paged16-row")), summary.get((shape, "paged16-page"))
            if not (c and r and g):
                continue
            print(f"{','.join(map(str, shape))}: contig {c[0]:7.1f} ({c[1]:.1f}) | row {r[0]:7.1f} ({r[1]:.1f}) "
                  f"ratio {r[0] / c[0]:.2f} | page {g[0]:7.1f} ({g[1]:.1f}) ratio {g[0] / c[0]:.2f} | "
                  f"page/row {g[0] / r[0]:.3f}", flush=True)
    if args.engine_variants:
        results.extend(engine_variants())
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


ENGINE_SHAPES = [(1, 9, 3, 64), (32, 9, 3, 64), (1, 32, 8, 128)]  # B, Hq, Hk, D of the e2e models


def engine_inputs(b, hq, hk, d, keys=640, capacity=2048, page=16):
    """One decode step as the engine calls the op: a shuffled page pool, rotary tables, one new key."""
    dev, dt = "cuda", torch.bfloat16
    pages_per_seq = capacity // page
    n = b * pages_per_seq + 1
    k_cache = torch.randn(n, page, hk, d, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(n - 1, device=dev).to(torch.int32).reshape(b, pages_per_seq)
    angles = torch.arange(capacity, device=dev)[:, None] * (1e-4 ** (torch.arange(d // 2, device=dev) / (d // 2)))
    return dict(q=torch.randn(b, 1, hq, d, device=dev, dtype=dt), k_cache=k_cache, v_cache=v_cache,
                k=torch.randn(b, 1, hk, d, device=dev, dtype=dt), v=torch.randn(b, 1, hk, d, device=dev, dtype=dt),
                rotary_cos=angles.cos().to(dt), rotary_sin=angles.sin().to(dt),
                cache_seqlens=torch.full((b,), keys, dtype=torch.int32, device=dev), block_table=table,
                causal=True, rotary_interleaved=False)


def engine_variants() -> list[dict]:
    """The engine's decode call: split counts x fused append, us per call."""
    print("\nengine decode call (paged 16, 2048-slot table, 640 keys + 1 appended, rotary), us", flush=True)
    rows = []
    for b, hq, hk, d in ENGINE_SHAPES:
        inputs = engine_inputs(b, hq, hk, d)
        line = []
        for splits in (0, 1, 2, 4, 8):
            for fa in ("0", "1"):
                with env_set(launch.FUSED_APPEND_ENV, fa):
                    us = time_graph(lambda: flash_attn_with_kvcache(**inputs, num_splits=splits))
                rows.append(dict(engine_shape=[b, hq, hk, d], splits=splits, fused_append=fa == "1", us=us))
                line.append(f"s{splits or 'H'}/append-{'fused' if fa == '1' else 'kernel'} {us:5.1f}")
        print(f"B={b} {hq}/{hk} D={d}: " + " | ".join(line), flush=True)
        inputs = None
        torch.cuda.empty_cache()
    return rows


def sweep_shape(args, inputs, shape, paged, layout, original, sms, results) -> tuple[float, float]:
    """Times the variants of one shape under the current environment; returns (heuristic us, best us)."""
    b, l, hq, hk, d = shape
    kv_bytes = 2 * b * l * hk * d * 2
    base = original(d, 2, hq // hk)
    fill = heuristics.TARGET_PROGRAMS_PER_SM if paged else heuristics.CONTIGUOUS_PROGRAMS_PER_SM
    base_splits = heuristics.choose_num_splits(0, b, hk, 1, l, base.block_n, sms, fill_per_sm=fill)
    block_ns = [16, 32, 64] if d > 128 else [32, 64, 128]
    variants = []
    for bn, warps, stages in itertools.product(block_ns, (4, 8), (2, 3, 4)):
        n_tiles = heuristics.cdiv(l, bn)
        wanted = heuristics.choose_num_splits(0, b, hk, 1, l, bn, sms, fill_per_sm=fill)
        for splits in sorted({wanted, max(1, wanted // 2), min(n_tiles, wanted * 2)}):
            variants.append((bn, warps, stages, splits))
    if args.quick:
        variants = variants[::3]
    if args.heuristic_only:
        variants = []

    def record(bn, warps, stages, splits, us):
        row = dict(shape=[b, l, hq, hk, d], paged=paged, layout=layout, block_n=bn, warps=warps, stages=stages,
                   splits=splits, us=us, gbps=kv_bytes / us / 1e3)
        results.append(row)
        return row

    best = None
    base_us = None
    for bn, warps, stages, splits in variants:
        cfg = heuristics.TileConfig(block_m=base.block_m, block_n=bn, num_warps=warps, num_stages=stages)
        heuristics.choose_tiles = lambda *a, _cfg=cfg, **k: _cfg
        # cfg as is: no per-plan adjustment by the launcher
        deepen, heuristics.deepen_lone_programs = heuristics.deepen_lone_programs, lambda cfg, *a, **k: cfg
        halve, heuristics.halve_short_split_tiles = heuristics.halve_short_split_tiles, lambda cfg, *a, **k: cfg
        try:
            us = time_graph(lambda: flash_attn_with_kvcache(**inputs, num_splits=splits))
        except Exception as exc:  # out of shared memory, etc.
            print(f"  bn={bn} w={warps} st={stages} s={splits}: error {type(exc).__name__}", flush=True)
            continue
        finally:
            heuristics.choose_tiles = original
            heuristics.deepen_lone_programs = deepen
            heuristics.halve_short_split_tiles = halve
        row = record(bn, warps, stages, splits, us)
        if (bn, warps, stages, splits) == (base.block_n, base.num_warps, base.num_stages, base_splits):
            base_us = us
        if best is None or us < best["us"]:
            best = row
    if base_us is None:
        heuristics.choose_tiles = original
        base_us = time_graph(lambda: flash_attn_with_kvcache(**inputs))
        row = record(base.block_n, base.num_warps, base.num_stages, base_splits, base_us)
        if best is None or base_us < best["us"]:
            best = row
    print(f"{b},{l},{hq}/{hk},{d} {layout:13s}: heuristic {base_us:7.1f} us "
          f"(bn={base.block_n} w={base.num_warps} st={base.num_stages} s={base_splits}) | best {best['us']:7.1f} us "
          f"({best['gbps']:.0f} GB/s) bn={best['block_n']} w={best['warps']} st={best['stages']} s={best['splits']}",
          flush=True)
    return base_us, best["us"]


if __name__ == "__main__":
    raise SystemExit(main())
