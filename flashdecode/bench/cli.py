"""Command line of the benchmark: ``python -m flashdecode.bench`` and ``flashdecode bench``."""

from __future__ import annotations

import argparse
import json
import os
import sys

EPILOG = """\
shape tokens (--shapes, separated by spaces or ';'): a kind (decode, ragged, spec, append, prefill,
memory), 'quick', 'all', a substring of a shape name (e.g. '32/1' or '1,4096,'), or a new decode
shape 'B,L,Hq/Hkv,D'. Without --shapes: the whole grid (the --quick subset with --quick); on a
machine without CUDA, a tiny CPU grid (smoke test).

implementations (--peers): flashdecode, flashdecode-paged, flashdecode-noappend, sdpa-flash,
sdpa-cudnn, flashinfer, naive, flex.

exit status: 0 complete; 3 stopped early (--budget; the reports cover what ran); 4 a flashdecode row's
output failed its check against the fp32 reference; 2 bad arguments.

outputs in --out: results.json (every figure, card, versions, date), results.md (tables for
BENCHMARKS.md), table.txt (the printed report), bandwidth.png (when matplotlib is installed).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashdecode bench", description="Benchmark flash_attn_with_kvcache against "
                                "its peers: time, bandwidth vs the measured ceiling, correctness, memory.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few shapes and fewer repetitions (about a minute, "
                   "plus first-use compiles of FlexAttention / FlashInfer)")
    p.add_argument("--out", default="bench_results", help="output folder (default: bench_results/)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="TOKEN", help="shape filter (see below)")
    p.add_argument("--peers", nargs="+", default=None, metavar="NAME", help="only these implementations")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles once per shape)")
    p.add_argument("--no-flashinfer", action="store_true", help="skip FlashInfer even when importable")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cuda:N or cpu")
    p.add_argument("--timer", default="auto", choices=["auto", "graph", "events", "do_bench"],
                   help="auto: CUDA graph replay, else events with a head start (default)")
    p.add_argument("--budget", type=float, default=0.0, metavar="SECONDS",
                   help="stop starting new rows after this many seconds (0 = no limit); reports are still written")
    p.add_argument("--ceiling-gb", type=float, default=2.0, help="size of the bandwidth-ceiling buffer in GB "
                   "(default 2)")
    p.add_argument("--no-plot", action="store_true", help="do not draw bandwidth.png")
    p.add_argument("--tiny", action="store_true", help="use the tiny grid (CPU smoke test) even on a GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list the selected shapes and implementations, then exit")
    p.add_argument("--summary", default=None, metavar="JSON", help="print the short summary table of a "
                   "results.json and exit")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge results.json files of several runs (e.g. split across calls) into --out and print "
                        "the report; runs nothing")
    e = p.add_argument_group("end-to-end benchmark (--e2e; see flashdecode/bench/e2e/)")
    e.add_argument("--e2e", action="store_true", help="run the end-to-end generation benchmark (engine vs "
                   "transformers generate()) instead of the kernel benchmark; writes e2e_results.json/.md, "
                   "e2e_table.txt to --out")
    e.add_argument("--e2e-models", nargs="+", default=None, metavar="NAME",
                   help="smollm2-135m, llama3-8b, tiny (default: the first two on CUDA; tiny on CPU or with --tiny)")
    e.add_argument("--e2e-impls", nargs="+", default=None, metavar="NAME",
                   help="flashdecode (CUDA graphs on a GPU), flashdecode-eager, hf-dynamic, hf-static, hf-static-compile "
                        "(default: all but hf-static-compile)")
    e.add_argument("--e2e-workloads", nargs="+", default=None, metavar="NAME", help="batch1, throughput (default both)")
    e.add_argument("--e2e-dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    e.add_argument("--e2e-repeats", type=int, default=2, help="timed batch-1 runs, best kept (default 2)")
    e.add_argument("--hf-batch", type=int, default=64, help="transformers batch size for the throughput workload "
                   "(default 64; halved on out-of-memory)")
    e.add_argument("--max-model-len", type=int, default=2048, help="flashdecode engine context (default 2048)")
    e.add_argument("--e2e-no-full-warmup", action="store_true", help="flashdecode throughput: skip the untimed "
                   "first pass of the whole workload (kernel compiles may then land in the timed run)")
    e.add_argument("--kv-cache-gb", type=float, default=None, help="flashdecode KV pool (default: what the "
                   "throughput workload needs, capped by free memory)")
    return p


def _options(args):
    from flashdecode.bench.runner import Options  # noqa: PLC0415

    return Options(device=args.device, quick=args.quick, out=args.out, shapes=args.shapes or [],
                   peers=args.peers or [], flex=not args.no_flex, flashinfer=not args.no_flashinfer, timer=args.timer,
                   budget_s=args.budget, ceiling_gb=args.ceiling_gb, plot=not args.no_plot, tiny=args.tiny,
                   seed=args.seed)


def merge(paths: list[str], out: str, plot: bool = True) -> dict:
    """Concatenate the rows of several results.json files (the first file's meta and ceilings lead)."""
    merged: dict | None = None
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if merged is None:
            merged = data
            merged.setdefault("merged_from", [])
        else:
            have = {(r["shape"], r["impl"]) for r in merged["rows"]}
            merged["rows"] += [r for r in data.get("rows", []) if (r["shape"], r["impl"]) not in have]
            merged["status"] = f"{merged.get('status')}; {data.get('status')}"
        merged["merged_from"].append({"path": os.path.basename(path), "date": data.get("meta", {}).get("date"),
                                      "card": data.get("meta", {}).get("card"), "ceilings": data.get("ceilings")})
    if merged is None:
        raise ValueError("--merge needs at least one file")
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sys.stdout.reconfigure(line_buffering=True)  # progress shows while it runs, also through pipes
    except Exception:
        pass
    if args.e2e:
        from flashdecode.bench import e2e  # noqa: PLC0415

        return e2e.main(e2e.options_from_args(args))
    from flashdecode.bench import report  # noqa: PLC0415

    if args.summary:
        try:
            with open(args.summary, encoding="utf-8") as f:
                print(report.format_summary(json.load(f)))
        except Exception as exc:
            print(f"no summary: {type(exc).__name__}: {exc}")
            return 2
        return 0
    if args.merge:
        try:
            results = merge(args.merge, args.out)
        except Exception as exc:
            print(f"merge failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        for msg in report.write_all(results, args.out, plot=not args.no_plot):
            print(msg)
        print()
        print(report.format_report(results))
        return 0

    from flashdecode.bench.peers import peer_names  # noqa: PLC0415
    from flashdecode.bench.runner import finish, plan_shapes, resolve_device, run  # noqa: PLC0415
    from flashdecode.cuda_device import launch_on  # noqa: PLC0415

    opts = _options(args)
    unknown = [n for n in opts.peers if n not in peer_names()]
    if unknown:
        parser.error(f"unknown implementation(s) {unknown}; choose from {peer_names()}")
    try:
        device = resolve_device(opts.device)
        shapes = plan_shapes(opts, device)
    except (ValueError, RuntimeError) as exc:
        print(f"flashdecode bench: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for s in shapes:
            what = f"K+V {s.kv_bytes() / 1e6:9.1f} MB" if s.memory_bound else f"{s.flops() / 1e12:7.2f} TFLOP"
            print(f"{s.name:<40} {what}{'  (quick)' if s.quick else ''}")
        print("implementations:", ", ".join(peer_names()))
        return 0
    with launch_on(device):  # timers, graphs and kernels of every peer on the benchmark's GPU
        results = run(opts)
    finish(results, opts)
    wrong = wrong_rows(results)
    if wrong:
        print(f"flashdecode bench: WRONG output (failed the check against the fp32 reference): {', '.join(wrong)}",
              file=sys.stderr)
        return 4
    return 0 if results.get("status") == "complete" else 3


def wrong_rows(results: dict) -> list[str]:
    """``shape impl`` of every flashdecode row whose output failed its check (a peer's wrong
    output is reported in the tables but does not fail the run)."""
    return [f"{r['shape']} {r['impl']}" for r in results.get("rows", [])
            if str(r.get("impl", "")).startswith("flashdecode") and r.get("correct") is False]


if __name__ == "__main__":
    sys.exit(main())
