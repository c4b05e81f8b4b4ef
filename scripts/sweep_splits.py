"""Split-count and tile sweep on the kernel benchmark's decode shapes, cold L2, cuDNN in the same run.

For each shape (the benchmark's decode grid and its append step, or those ``--shapes`` selects):

1. the heuristic's tile config at every split count of ``--splits`` (the heuristic's own count
   added), to see where the wave count and the combine cost put the optimum;
2. tile variants (block_n x num_warps x num_stages) at the two best split counts of step 1;
3. SDPA with the cuDNN backend, the best peer of run 15, on the same inputs.

Inputs come from the benchmark (`flashdecode.bench.peers.make_problems`), copied until a rotation
spans several L2 sizes, and are timed with the benchmark's graph timer, so figures compare with
`flashdecode bench`. The compiled attention kernels' registers and shared memory are printed with
the programs per SM they allow. GPU only.

Usage: python scripts/sweep_splits.py [--shapes decode append] [--paged] [--budget 300] [--out sweep.json]
       [--block-m 16 32] [--block-n 64 128] [--warps 4] [--stages 2 3 4] [--top-splits 1]

The launcher's knobs apply as in the benchmark, e.g. ``FLASHDECODE_TMA=0`` sweeps the pointer
loads. Every row runs the tiles it names, also the heuristic's split count: the launcher's
adjustments per plan (`heuristics.halve_short_split_tiles`, `heuristics.deepen_lone_programs`)
are off while the sweep times. Each row's output is checked against the benchmark's fp32
reference first; a row that fails is printed WRONG and stored with ``correct: false``, and the
script then exits 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashdecode.attention import heuristics  # noqa: E402
from flashdecode.attention.kernels import launch  # noqa: E402
from flashdecode.attention.kernels.attention import attention_split_kernel  # noqa: E402
from flashdecode.bench import peers, shapes, timing  # noqa: E402

SPLITS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024


def time_us(fn, states) -> float:
    t = timing.measure_cuda(fn, states, timer="graph", min_time_s=0.05, max_reps=50, quick=True)
    return t.median_us


def kernel_resources() -> list[dict]:
    """Registers, spills and shared memory of every compiled attention kernel (best effort: the
    cache layout is Triton's)."""
    rows = []
    try:
        caches = attention_split_kernel.device_caches
    except AttributeError:
        return rows
    for entry in caches.values():
        kernel_cache = entry[0] if isinstance(entry, tuple) else entry
        for kern in kernel_cache.values():
            md = getattr(kern, "metadata", None)
            warps = getattr(md, "num_warps", 4)
            regs = getattr(kern, "n_regs", 0)
            shared = getattr(md, "shared", 0)
            per_sm_regs = REGS_PER_SM // max(1, ((regs + 7) // 8 * 8) * 32 * warps) if regs else None
            per_sm_smem = SMEM_PER_SM // max(1, shared + 1024)
            rows.append(dict(regs=regs, spills=getattr(kern, "n_spills", None), shared=shared, warps=warps,
                             stages=getattr(md, "num_stages", None),
                             per_sm=min(per_sm_smem, per_sm_regs) if per_sm_regs is not None else per_sm_smem))
    return rows


def cudnn_us(built_states) -> float | None:
    peer = peers.SDPACudnn()
    try:
        built = peer.build(built_states)[0]
        if isinstance(built, str):
            return None
        return time_us(built.fn, built.states)
    except Exception as exc:  # a peer that cannot run says so, the sweep goes on
        print(f"  sdpa-cudnn: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
        return None


def sweep(shape: shapes.Shape, paged: bool, splits_list, deadline: float, sms: int, l2: int,
          variants: argparse.Namespace) -> list[dict]:
    copies = timing.copies_needed(shape.kv_bytes(), l2)
    problems = peers.make_problems(shape, "cuda", copies=copies)
    impls = [peers.FlashdecodePaged() if paged else peers.FlashdecodeContiguous()]
    if shape.kind == "append" and not paged:
        impls.append(peers.FlashdecodeNoAppend())
    rows = []
    base = heuristics.choose_tiles(shape.head_dim, shape.elem_bytes, shape.seqlen_q * shape.group)
    n_tiles = heuristics.cdiv(shape.seqlen, base.block_n)
    original, deepen = heuristics.choose_tiles, heuristics.deepen_lone_programs
    halve = heuristics.halve_short_split_tiles
    for impl in impls:
        fused_append = shape.kind == "append" and impl.name != "flashdecode-noappend"
        h_splits = heuristics.choose_num_splits(
            0, shape.batch, shape.heads_kv, 1, shape.seqlen, base.block_n, sms,
            resident_per_sm=heuristics.FUSED_APPEND_RESIDENT_PROGRAMS_PER_SM if fused_append
            else heuristics.RESIDENT_PROGRAMS_PER_SM,
            fill_per_sm=heuristics.TARGET_PROGRAMS_PER_SM if paged else heuristics.CONTIGUOUS_PROGRAMS_PER_SM,
        )
        built = impl.build(problems)[0]
        label = f"{shape.name} {impl.name}"
        expected = built.expected() if built.expected is not None else peers.reference_output(problems[0])

        def run(cfg: heuristics.TileConfig, splits: int) -> tuple[float, bool] | None:
            """Median µs and whether the output matched the fp32 reference (None if it did not run)."""
            # The launcher runs `cfg` as it is: no per-plan adjustment on top.
            heuristics.choose_tiles = lambda *a, _cfg=cfg, **k: _cfg
            heuristics.deepen_lone_programs = lambda cfg, *a, **k: cfg
            heuristics.halve_short_split_tiles = lambda cfg, *a, **k: cfg
            fn = built.fn

            def call(p, _s=splits):
                return launch_with_splits(fn, p, _s)
            try:
                out = call(built.states[0])
                torch.cuda.synchronize()
                correct = peers.compare(built.to_bshd(out), expected, shape.torch_dtype)["correct"]
                del out
                if not correct:
                    print(f"  {cfg} s={splits}: WRONG output (against the fp32 reference)", flush=True)
                return time_us(call, built.states), bool(correct)
            except Exception as exc:  # out of shared memory, etc.
                print(f"  {cfg} s={splits}: {type(exc).__name__}", flush=True)
                return None
            finally:
                heuristics.choose_tiles = original
                heuristics.deepen_lone_programs = deepen
                heuristics.halve_short_split_tiles = halve

        by_split = {}
        for s in sorted({*(x for x in splits_list if x <= n_tiles), h_splits}):
            if time.time() > deadline:
                break
            got = run(base, s)
            if got is not None:
                us, correct = got
                by_split[s] = us
                rows.append(dict(shape=shape.name, impl=impl.name, block_m=base.block_m, block_n=base.block_n,
                                 warps=base.num_warps, stages=base.num_stages, splits=s, us=us,
                                 heuristic=s == h_splits, correct=correct))
        if not by_split:
            continue
        line = " ".join(f"s{s}:{us:.1f}" for s, us in sorted(by_split.items()))
        print(f"{label}: splits sweep (bn={base.block_n} w={base.num_warps} st={base.num_stages}), us: {line}",
              flush=True)
        best_splits = sorted(by_split, key=by_split.get)[:variants.top_splits]
        block_ns = variants.block_n or ((16, 32, 64) if shape.head_dim > 128 else (32, 64, 128))
        block_ms = variants.block_m or (base.block_m,)
        for bm, bn, warps, stages, s in itertools.product(block_ms, block_ns, variants.warps, variants.stages,
                                                          best_splits):
            if time.time() > deadline:
                break
            if (bm, bn, warps, stages) == (base.block_m, base.block_n, base.num_warps, base.num_stages):
                continue
            cfg = heuristics.TileConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
            got = run(cfg, min(s, heuristics.cdiv(shape.seqlen, bn)))
            if got is not None:
                rows.append(dict(shape=shape.name, impl=impl.name, block_m=bm, block_n=bn, warps=warps, stages=stages,
                                 splits=s, us=got[0], heuristic=False, correct=got[1]))
        mine = [r for r in rows if r["impl"] == impl.name and r["correct"]]
        h = by_split.get(h_splits)
        best = (f"best {(b := min(mine, key=lambda r: r['us']))['us']:.1f} us "
                f"(bm={b['block_m']} bn={b['block_n']} w={b['warps']} st={b['stages']} s={b['splits']})"
                if mine else "no correct row")
        print(f"{label}: heuristic s={h_splits} {h if h is None else round(h, 1)} us | {best}", flush=True)
    if shape.kind == "decode" and not paged:
        c = cudnn_us(problems)
        if c is not None:
            rows.append(dict(shape=shape.name, impl="sdpa-cudnn", us=c))
            print(f"{shape.name} sdpa-cudnn: {c:.1f} us", flush=True)
    for r in kernel_resources():
        print(f"  kernel: {r}", flush=True)
    return rows


def launch_with_splits(fn, p, splits: int):
    """Calls the benchmark's flashdecode callable with ``num_splits`` forced (via the launcher)."""
    original = heuristics.choose_num_splits

    def forced(requested, *a, **k):
        return original(splits if requested == 0 else requested, *a, **k)
    heuristics.choose_num_splits = forced
    try:
        return fn(p)
    finally:
        heuristics.choose_num_splits = original


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["decode", "append"])
    ap.add_argument("--splits", type=int, nargs="*", default=list(SPLITS))
    ap.add_argument("--paged", action="store_true", help="also sweep the paged (page 16) cache")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole sweep")
    ap.add_argument("--out", default=None)
    ap.add_argument("--block-n", type=int, nargs="*", default=None,
                    help="key tile sizes of the variants (default 32 64 128; 16 32 64 for D > 128)")
    ap.add_argument("--block-m", type=int, nargs="*", default=None,
                    help="query-row tile sizes of the variants (default: the heuristic's); a tile smaller than a "
                         "KV head's query rows splits them over several programs that read the same keys")
    ap.add_argument("--warps", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--top-splits", type=int, default=2, help="tile variants run at this many best split counts")
    args = ap.parse_args()
    selected = [s for s in shapes.select(shapes.full_grid(), args.shapes) if s.kind in ("decode", "append")]
    sms = launch.num_sms(torch.device("cuda"))
    l2 = timing.l2_bytes("cuda")
    start = time.time()
    rows = []
    layouts = (False, True) if args.paged else (False,)
    jobs = [(s, p) for s in selected for p in layouts]
    for i, (shape, paged) in enumerate(jobs):
        left = args.budget - (time.time() - start)
        if left <= 0:
            print("budget spent; stopping", flush=True)
            break
        deadline = time.time() + left / (len(jobs) - i)
        rows.extend(sweep(shape, paged, args.splits, deadline, sms, l2, args))
        torch.cuda.empty_cache()
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    wrong = [r for r in rows if r.get("correct") is False]
    if wrong:
        print(f"{len(wrong)} rows gave WRONG output: see the lines marked WRONG above", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
