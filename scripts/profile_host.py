"""Host time of one eager call of the op, and where it goes: CUDA only.

The benchmark's main figure is GPU time (CUDA-graph replay); its ``host_us`` is the wall clock of
eager calls in a loop, which is what a Python caller without graphs pays. This script times eager
calls on a few benchmark shapes with the value checks on (the default) and off
(``check_values=False``), each after a warm-up, with the GPU kept ahead of the host by nothing
(`torch.cuda.synchronize` only at the end of the loop), and then profiles the default call with
cProfile to show which functions take the host time.

Usage: python scripts/profile_host.py [--shapes decode:1,4096 9/3] [--calls 200] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flashdecode  # noqa: E402
from flashdecode.bench import peers, shapes  # noqa: E402


def _call(p: peers.Problem, paged: bool, check_values: bool):
    k_cache, v_cache = p.paged() if paged else (p.k_cache, p.v_cache)
    return flashdecode.flash_attn_with_kvcache(
        p.q, k_cache, v_cache, k=p.k_new, v=p.v_new, rotary_cos=p.rotary_cos, rotary_sin=p.rotary_sin,
        cache_seqlens=p.cache_seqlens, block_table=p.block_table if paged else None, softmax_scale=p.scale,
        causal=p.shape.causal, rotary_interleaved=False, check_values=check_values)


def host_us(fn, calls: int) -> float:
    """Wall-clock µs per call of ``calls`` eager calls (after 10 warm-up calls)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["decode:1,4096", "9/3", "append"])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_host.py needs a CUDA device", file=sys.stderr)
        return 2
    rows = []
    for shape in shapes.select(shapes.full_grid(), args.shapes):
        if shape.kind not in ("decode", "append"):
            continue
        p = peers.make_problems(shape, "cuda")[0]
        for paged in (False, True):
            times = [host_us(lambda cv=cv: _call(p, paged, cv), args.calls) for cv in (True, False)]
            rows.append((shape.name, "paged" if paged else "contiguous", *times))
            print(f"{shape.name} {'paged' if paged else 'contiguous'}: {times[0]:.1f} / {times[1]:.1f} us", flush=True)
        if len(rows) <= 2:  # the first shape: where the host time goes
            for cv in (True, False):
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(args.calls):
                    _call(p, False, cv)
                torch.cuda.synchronize()
                prof.disable()
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
                print(f"\n--- cProfile, {shape.name} contiguous, check_values={cv}, {args.calls} calls, by own time")
                print(text.getvalue().split("\n", 7)[-1][:6000], flush=True)
    print("\nEager host time per call, µs (value checks on / off)")
    print(f"{'shape':28s} {'cache':10s} {'checked':>8s} {'unchecked':>9s}")
    for name, cache, on, off in rows:
        print(f"{name:28s} {cache:10s} {on:8.1f} {off:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
