"""Per-kernel GPU time of one decode call, flashdecode against SDPA-cuDNN, on the benchmark's shapes.

The benchmark gives the time of a whole call (CUDA-graph replay). This script splits it: under
`torch.profiler`, eager calls rotate among cold-L2 copies of the benchmark's inputs, and the
device time of every kernel is averaged per call, by kernel name. Then, for each implementation,
it prints the graph time of the call (the benchmark's timer) next to the sum of its kernels; the
difference is what the call spends between and around kernels (launch gaps, waits).

Attention PDL is turned off for the profiled calls (`FLASHDECODE_ATTENTION_PDL=0`): with it the
combine kernel starts early and waits, and its measured duration would include that wait. The
graph time is taken with the default settings.

Two extra shapes measure the fixed cost: B=1 and B=8 over 128 keys, where reading K/V takes
almost no time. GPU only.

`--one-call` instead runs each implementation's call once per shape between
``cudaProfilerStart``/``cudaProfilerStop`` (after a warm-up outside them), for Nsight Compute's
hardware counters: `bash scripts/ncu_decode.sh` (see there).

Usage: python scripts/profile_decode.py [--shapes decode 1,128,32/8,128] [--calls 60] [--out profile.json]
       python scripts/profile_decode.py --one-call --shapes 9/3 32/1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashdecode.attention.kernels import launch  # noqa: E402
from flashdecode.bench import peers, shapes, timing  # noqa: E402

FIXED_COST_SHAPES = ("1,128,32/8,128", "8,128,32/8,128")


def device_us(event) -> float:
    """Self device time of a profiler event average, in µs (the attribute was renamed in torch 2.x).
    Only self time: a host op's total would count its kernels a second time."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value:
            return float(value)
    return 0.0


def kernels_per_call(fn, states, calls: int) -> dict[str, float]:
    """Mean device µs per call of each kernel `fn` launches (eager, rotating among `states`)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    n = len(states)
    for st in states:  # compile and warm up outside the profile
        fn(st)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(states[i % n])
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = collections.defaultdict(float)
    for ev in prof.key_averages():
        us = device_us(ev)
        if us > 0:
            per_kernel[ev.key[:60]] += us / calls
    return dict(per_kernel)


PEERS = (peers.FlashdecodeContiguous, peers.FlashdecodePaged, peers.SDPACudnn)


def one_call_each(shape: shapes.Shape) -> None:
    """Warm every implementation up, then run one call of each inside the profiler range."""
    problems = peers.make_problems(shape, "cuda", copies=1)
    calls = []
    for peer_type in PEERS:
        built = peer_type().build(problems)[0]
        if isinstance(built, str):
            print(f"{shape.name} {peer_type.name}: {built}", flush=True)
            continue
        built.fn(built.states[0])  # compile outside the range
        calls.append((peer_type.name, built))
    torch.cuda.synchronize()
    for name, built in calls:
        torch.cuda.cudart().cudaProfilerStart()
        built.fn(built.states[0])
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        print(f"{shape.name} {name}: profiled one call", flush=True)
    for p in problems:
        p.release()


def profile_shape(shape: shapes.Shape, calls: int, l2: int) -> dict:
    copies = timing.copies_needed(shape.kv_bytes(), l2)
    problems = peers.make_problems(shape, "cuda", copies=copies)
    result = {"shape": shape.name, "copies": copies, "impls": {}}
    for peer in (peer_type() for peer_type in PEERS):
        try:
            built = peer.build(problems)[0]
            if isinstance(built, str):
                raise RuntimeError(built)
            graph_us = timing.measure_cuda(built.fn, built.states, timer="graph", min_time_s=0.1).median_us
            with mock.patch.dict(os.environ, {launch.ATTENTION_PDL_ENV: "0"}):
                kernels = kernels_per_call(built.fn, built.states, calls)
        except Exception as exc:  # a peer that cannot run says so; the script goes on
            print(f"{shape.name} {peer.name}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
            continue
        total = sum(kernels.values())
        result["impls"][peer.name] = {"graph_us": graph_us, "kernel_sum_us": total, "kernels": kernels}
        parts = " + ".join(f"{name} {us:.1f}" for name, us in sorted(kernels.items(), key=lambda kv: -kv[1]))
        print(f"{shape.name:28s} {peer.name:18s} graph {graph_us:7.1f} us | kernels {total:7.1f} us = {parts}",
              flush=True)
    for p in problems:
        p.release()
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["decode", *FIXED_COST_SHAPES])
    ap.add_argument("--calls", type=int, default=60, help="profiled eager calls per implementation and shape")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one-call", action="store_true", help="one call per implementation, for ncu (see above)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_decode.py needs a CUDA device", file=sys.stderr)
        return 2
    selected = [s for s in shapes.select(shapes.full_grid(), args.shapes) if s.kind == "decode"]
    if args.one_call:
        for shape in selected:
            one_call_each(shape)
        return 0
    l2 = timing.l2_bytes("cuda")
    results = []
    for shape in selected:
        results.append(profile_shape(shape, args.calls, l2))
        torch.cuda.empty_cache()
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
