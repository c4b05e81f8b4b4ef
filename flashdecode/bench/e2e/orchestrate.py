"""The run: every (model, workload, implementation) row within the budget, and `main`."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from flashdecode.bench.e2e.config import (
    E2EOptions, FULL_WORKLOAD, Interrupted, LATE_IMPLS, MODEL_SHAPES, OURS, TINY_WORKLOAD, resolve_dtype,
    resolve_impls, resolve_models, resolve_workloads,
)
from flashdecode.bench.e2e.models import build_hf_model, build_llm, free_memory, kv_cache_gb_for
from flashdecode.bench.e2e.report import derive, fmt, format_report, write_reports
from flashdecode.bench.e2e.roofline import batch1_bytes_per_step, num_parameters
from flashdecode.bench.e2e.runners import fd_batch1, fd_throughput, hf_batch1, hf_throughput, timed
from flashdecode.bench.e2e.workloads import throughput_requests
from flashdecode.cuda_device import launch_on


def base_row(model: str, workload: str, impl: str) -> dict[str, Any]:
    return {"model": model, "workload": workload, "impl": impl, "group": "ours" if impl in OURS else "peer",
            "status": "not run", "reason": None, "tokens_per_s": None, "total_s": None, "prefill_s": None,
            "e2e_tokens_per_s": None, "decode_tokens_per_s": None, "output_tokens": None, "requested_tokens": None,
            "bytes_per_step": None, "roofline_tokens_per_s": None, "pct_roofline": None,
            "speedup_vs_best_hf": None, "best_hf": None, "note": ""}


def _error_text(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}"[:400]


class _Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def expired(self) -> bool:
        return bool(self.seconds) and self.elapsed() >= self.seconds


def environment(device: torch.device) -> dict[str, Any]:
    try:
        from flashdecode.bench.runner import _version, environment as kernel_env  # noqa: PLC0415

        meta = kernel_env(device)
        meta["versions"]["transformers"] = _version("transformers")
        meta["versions"]["safetensors"] = _version("safetensors")
        return meta
    except Exception as exc:  # never fatal
        return {"date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "device": str(device),
                "card": "?", "versions": {"torch": torch.__version__}, "env_error": _error_text(exc)}


def _cuda_alive(device: torch.device) -> bool:
    try:
        from flashdecode.bench.runner import cuda_alive  # noqa: PLC0415

        return cuda_alive(device)
    except Exception:
        return False


def run(opts: E2EOptions, log: Callable[[str], None] = print, ceilings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every (model, implementation, workload) row; never raises for a failing row."""
    from flashdecode.bench.runner import resolve_device  # noqa: PLC0415

    device = resolve_device(opts.device)
    models = resolve_models(opts.models, opts.tiny, device)
    impls = resolve_impls(opts.impls, device)
    workloads = resolve_workloads(opts.workloads)
    dtype = resolve_dtype(opts.dtype, device)
    wl = TINY_WORKLOAD if (opts.tiny or models == ["tiny"]) else FULL_WORKLOAD
    budget = _Budget(opts.budget_s)
    results: dict[str, Any] = {
        "kind": "e2e",
        "meta": environment(device),
        "options": {**asdict(opts), "out": os.path.basename(os.path.normpath(str(opts.out)))},
        "settings": {"models": models, "impls": impls, "workloads": workloads, "dtype": str(dtype).replace("torch.", ""),
                     "workload": asdict(wl), "shapes": {m: MODEL_SHAPES[m] for m in models},
                     "engine": {"max_model_len": opts.max_model_len, "page_size": 16, "max_num_seqs": 256,
                                "max_num_batched_tokens": 8192, "prefix_caching": True,
                                "weights": "random (transformers init), shared in memory with the transformers model"}},
        "ceilings": ceilings,
        "rows": [],
        "status": "running",
    }
    rows = results["rows"]
    plan = [(m, i, w) for m in models for i in impls for w in workloads]
    for m, i, w in plan:
        rows.append(base_row(m, w, i))
    row_of = {(r["model"], r["impl"], r["workload"]): r for r in rows}

    def save() -> None:
        derive(results)
        if opts.write:
            with contextlib.suppress(Exception):
                write_reports(results, opts.out, final=False)

    log(f"e2e: device {results['meta'].get('card')}, dtype {results['settings']['dtype']}, models {models}, "
        f"impls {impls}, workloads {workloads}, budget {opts.budget_s or 'none'} s")
    if results["ceilings"] is None:
        log("measuring the read bandwidth ceiling ...")
        try:
            from flashdecode.bench.ceiling import measure_ceilings  # noqa: PLC0415

            size = int(opts.ceiling_gb * 1e9) if device.type == "cuda" else (8 << 20)
            results["ceilings"] = measure_ceilings(device, size_bytes=size, log=log).as_dict()
        except Exception as exc:
            results["ceilings"] = {"read_gbs": None, "notes": [f"ceiling failed: {_error_text(exc)}"]}
            log(f"  ceiling failed: {_error_text(exc)}")
    save()
    dead = False
    phases = [[i for i in impls if i not in LATE_IMPLS], [i for i in impls if i in LATE_IMPLS]]
    try:
        for phase, model_name in [(ph, m) for ph in phases if ph for m in models]:
            model_rows = [r for r in rows if r["model"] == model_name and r["impl"] in phase]
            if dead or budget.expired():
                for r in model_rows:
                    r["status"], r["reason"] = "skipped", ("CUDA context lost" if dead else "time budget spent")
                continue
            shape = MODEL_SHAPES[model_name]
            vocab = int(shape["vocab_size"])
            log(f"\n== {model_name}: building random-weight transformers model "
                f"({num_parameters(shape) / 1e9:.2f} B parameters) (t={budget.elapsed():.0f}s)")
            hf = None
            try:
                hf, s = timed(lambda: build_hf_model(shape, device, dtype, opts.seed, opts.init_std), device)
                log(f"   built in {s:.1f} s (transformers attention: {getattr(hf.config, '_attn_implementation', '?')})")
                results["settings"]["hf_attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
            except Exception as exc:
                log(f"   FAILED: {_error_text(exc)}")
                for r in model_rows:
                    r["status"], r["reason"] = "error", f"model build failed: {_error_text(exc)}"
                free_memory(device)
                save()
                continue
            requests = throughput_requests(wl, vocab, opts.seed)
            dbytes = torch.empty((), dtype=dtype).element_size()
            for impl in phase:
                todo = [row_of[(model_name, impl, w)] for w in workloads]
                if dead or budget.expired():
                    for r in todo:
                        r["status"], r["reason"] = "skipped", ("CUDA context lost" if dead else "time budget spent")
                    continue
                dead = _run_impl(impl, todo, hf, requests, shape, wl, vocab, dtype, dbytes, device, opts, budget,
                                 log, save)
            del hf
            free_memory(device)
        skipped = [r for r in rows if r["status"] in ("skipped", "not run")]
        results["status"] = "complete" if not skipped else f"partial ({len(skipped)} rows skipped)"
    except (KeyboardInterrupt, Interrupted):
        results["status"] = "interrupted"
        for r in rows:
            if r["status"] in ("not run", "running"):
                r["status"], r["reason"] = "skipped", "interrupted"
        log("\ninterrupted: writing what was measured")
    results["elapsed_s"] = budget.elapsed()
    derive(results)
    return results


def _run_impl(impl, todo, hf, requests, shape, wl, vocab, dtype, dbytes, device, opts, budget, log, save) -> bool:
    """Run one implementation's rows of one model; returns True when the CUDA context is lost."""
    llm = None
    if impl in OURS:
        try:
            kv_gb, kv_note = (opts.kv_cache_gb, "") if opts.kv_cache_gb else kv_cache_gb_for(requests, shape, dbytes,
                                                                                              device)
            log(f"-- {impl}: building the engine (KV pool {kv_gb:.2f} GiB) (t={budget.elapsed():.0f}s)")
            use_graphs = False if impl == "flashdecode-eager" else None  # None: the engine's default
            llm, s = timed(lambda: build_llm(hf, device, dtype, cuda_graphs=use_graphs,
                                              kv_cache_gb=kv_gb, max_model_len=opts.max_model_len), device)
            log(f"   engine ready in {s:.1f} s: {llm!r}")
            for r in todo:
                r["note"] = kv_note
        except Exception as exc:
            log(f"   FAILED: {_error_text(exc)}")
            for r in todo:
                r["status"], r["reason"] = "error", f"engine build failed: {_error_text(exc)}"
            llm = None
            free_memory(device)
            save()
            return device.type == "cuda" and not _cuda_alive(device)
    try:
        for r in todo:
            if budget.expired():
                r["status"], r["reason"] = "skipped", "time budget spent"
                continue
            log(f"-- {r['model']} / {r['workload']} / {impl} (t={budget.elapsed():.0f}s)")
            r["status"] = "running"
            graphs = getattr(getattr(llm, "runner", None), "graphs", None)
            replays_before = int(graphs.replays) if graphs is not None else 0
            try:
                if r["workload"] == "batch1":
                    if impl in OURS:
                        res = fd_batch1(llm, wl, vocab, opts.seed, opts.repeats, device, log)
                    else:
                        res = hf_batch1(hf, impl[3:], wl, vocab, opts.seed, opts.repeats, device, log)
                    res["tokens_per_s"] = res.get("decode_tokens_per_s")
                    res["bytes_per_step"] = batch1_bytes_per_step(shape, wl.batch1_prompt, wl.batch1_new, dbytes)
                else:
                    if impl == "hf-static-compile":
                        raise _Skip("static cache + compile recompiles for every batch shape; batch 1 only")
                    if impl in OURS:
                        res = fd_throughput(llm, requests, device, log, full_warmup=opts.full_warmup)
                    else:
                        res = hf_throughput(hf, impl[3:], requests, opts.hf_batch, device, log)
                extra = "; ".join(x for x in (r.get("note"), res.pop("note", None), res.pop("note_extra", None)) if x)
                r.update(res)
                r["note"] = extra
                if graphs is not None:  # this row's replays (warm-up included) and the graphs captured so far
                    r["graph_replays"] = int(graphs.replays) - replays_before
                    r["graphs_captured"] = len(graphs.graphs)
                r["status"] = "ok"
                log(f"   {_row_summary(r)}")
            except _Skip as why:
                r["status"], r["reason"] = "n/a", str(why)
                log(f"   not applicable: {why}")
            except Exception as exc:
                r["status"], r["reason"] = "error", _error_text(exc)
                r["traceback"] = traceback.format_exc()[-2000:]
                log(f"   FAILED: {_error_text(exc)}")
                free_memory(device)
                if device.type == "cuda" and not _cuda_alive(device):
                    log("   the CUDA context is lost: the remaining rows are skipped")
                    return True
            save()
    finally:
        del llm
        free_memory(device)
    return False


class _Skip(Exception):
    pass


def _row_summary(r: dict[str, Any]) -> str:
    if r["workload"] == "batch1":
        return (f"decode {fmt(r.get('decode_tokens_per_s'), '.1f')} tok/s, total {fmt(r.get('total_s'), '.3f')} s, "
                f"prefill {fmt((r.get('prefill_s') or 0) * 1e3, '.1f')} ms")
    return f"{fmt(r.get('tokens_per_s'), '.1f')} output tok/s, total {fmt(r.get('total_s'), '.2f')} s"

def options_from_args(args) -> E2EOptions:
    return E2EOptions(device=args.device, models=args.e2e_models or [], impls=args.e2e_impls or [],
                      workloads=args.e2e_workloads or [], out=args.out, budget_s=args.budget, tiny=args.tiny,
                      seed=args.seed, dtype=args.e2e_dtype, hf_batch=args.hf_batch, repeats=args.e2e_repeats,
                      max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb, ceiling_gb=args.ceiling_gb,
                      full_warmup=not args.e2e_no_full_warmup)


def main(opts: E2EOptions, log: Callable[[str], None] = print) -> int:
    """Run, write the reports, print the table last. 0 when every row ran (ok or error), 3 when
    rows were skipped (budget, interruption), 2 for bad options."""
    from flashdecode.bench.runner import resolve_device  # noqa: PLC0415

    try:
        device = resolve_device(opts.device)
        resolve_models(opts.models, opts.tiny, device)
        resolve_impls(opts.impls, device)
        resolve_workloads(opts.workloads)
        resolve_dtype(opts.dtype, device)
    except (ValueError, RuntimeError) as exc:
        log(f"flashdecode bench --e2e: {exc}")
        return 2
    previous = None
    with contextlib.suppress(Exception):  # SIGTERM (timeout) -> still write the reports
        def _term(_sig, _frame):
            raise Interrupted()

        previous = signal.signal(signal.SIGTERM, _term)
    try:
        with launch_on(device):  # streams, events and graphs of every implementation on that GPU
            results = run(opts, log=log)
    finally:
        if previous is not None:
            with contextlib.suppress(Exception):
                signal.signal(signal.SIGTERM, previous)
    if opts.write:
        try:
            for p in write_reports(results, opts.out):
                log(f"wrote {p}")
        except Exception as exc:
            log(f"could not write the reports: {_error_text(exc)}")
    log("")
    log(format_report(results))
    return 0 if results.get("status") == "complete" else 3
