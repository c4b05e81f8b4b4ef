"""One benchmark run: ceilings, then every shape x implementation, with progress and partial results.

Robustness rules (the GPU run happens far away, once):
* every implementation is isolated: an exception while building, checking or timing it becomes
  its row's "error: ..." and the run goes on; out-of-memory frees the cache and goes on;
* after an error the CUDA context is probed; if it is gone (illegal address, device assert) the
  remaining rows are marked "skipped" and the reports are still written;
* `budget_s` bounds the run: past it, rows are "skipped: time budget" (FlexAttention and FlashInfer,
  which compile on first use, are skipped first, when less than a minute is left);
* SIGTERM and Ctrl-C stop the run cleanly: reports are written with what was measured;
* results.json is rewritten after each shape, so even a killed run leaves its figures.
"""

from __future__ import annotations

import gc
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import torch

from flashdecode.bench import report
from flashdecode.bench.ceiling import measure_ceilings
from flashdecode.bench.peers import Built, Peer, _err, compare, make_peers, make_problems, reference_output
from flashdecode.bench.shapes import Shape, full_grid, select, tiny_grid
from flashdecode.bench.timing import copies_needed, l2_bytes, measure, peak_extra_bytes

SLOW_TO_BUILD = ("flex", "flashinfer")


@dataclass
class Options:
    device: str = "auto"
    quick: bool = False
    out: str = "bench_results"
    shapes: list[str] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    flex: bool = True
    flashinfer: bool = True
    timer: str = "auto"
    budget_s: float = 0.0  # 0 = no limit
    ceiling_gb: float = 2.0
    plot: bool = True
    tiny: bool = False
    seed: int = 0


class Interrupted(BaseException):
    """SIGTERM: a BaseException, so that no `except Exception` around a peer swallows it."""


class ContextLost(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _version(mod: str, dist: str | None = None) -> str | None:
    try:
        from importlib import metadata  # noqa: PLC0415

        return metadata.version(dist or mod)
    except Exception:
        pass
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:
        return None


def _git_commit() -> str | None:
    """The checkout's commit (+"-dirty"); FLASHDECODE_COMMIT where the copy has no .git (the GPU machine)."""
    if os.environ.get("FLASHDECODE_COMMIT"):
        return os.environ["FLASHDECODE_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=5)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "card": "cpu",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "env": {k: os.environ.get(k) for k in ("FLASHDECODE_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")},
    }
    try:
        import flashdecode  # noqa: PLC0415

        fd_version = getattr(flashdecode, "__version__", "?")
    except Exception as exc:
        fd_version = f"not importable ({type(exc).__name__}: {exc})"[:200]
    meta["versions"] = {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "flashdecode": fd_version,
        "flashdecode_commit": _git_commit(),
        "flashinfer": _version("flashinfer", "flashinfer-python"),
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        try:
            props = torch.cuda.get_device_properties(device)
            meta["card"] = torch.cuda.get_device_name(device)
            meta["sm_count"] = props.multi_processor_count
            meta["l2_bytes"] = l2_bytes(device)
            meta["memory_gb"] = round(props.total_memory / 1e9, 1)
            meta["capability"] = f"{props.major}.{props.minor}"
            meta["versions"]["cudnn"] = torch.backends.cudnn.version()
        except Exception as exc:
            meta["card"] = f"cuda (properties failed: {exc})"
    else:
        meta["card"] = f"cpu ({platform.processor() or platform.machine()})"
    return meta


def cuda_alive(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        x = torch.ones(4, device=device)
        return float((x + 1).sum().item()) == 8.0
    except Exception:
        return False


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------------
# One shape
# ------------------------------------------------------------------------------------------------


def base_row(shape: Shape, peer_name: str, group: str) -> dict[str, Any]:
    return {
        "shape": shape.name, "kind": shape.kind, "spec": shape.spec, "batch": shape.batch, "seqlen": shape.seqlen,
        "heads_q": shape.heads_q, "heads_kv": shape.heads_kv, "head_dim": shape.head_dim,
        "seqlen_q": shape.seqlen_q, "causal": shape.causal, "dtype": shape.dtype,
        "impl": peer_name, "group": group, "status": "", "reason": "", "us": None,
        "kv_bytes": shape.kv_bytes() if shape.memory_bound else None,
        "flops": shape.flops() if shape.kind in ("prefill", "memory") else None,
    }


def _run_variant(b: Built, shape: Shape, ref: torch.Tensor | None, device: torch.device, opts: Options) -> dict:
    v: dict[str, Any] = {"status": "error"}
    try:
        t1 = time.perf_counter()
        out = b.fn(b.states[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        v["first_call_s"] = round(time.perf_counter() - t1, 3)
        expected = b.expected() if b.expected is not None else ref
        if expected is not None:
            v.update(compare(b.to_bshd(out), expected, shape.torch_dtype))
        else:
            v.update(correct=None, check="no reference")
        del out, expected
        if shape.kind == "memory" and device.type == "cuda":
            extra, out = peak_extra_bytes(lambda: b.fn(b.states[0]), device)
            v["peak_extra_mb"] = extra / 2 ** 20
            del out
        t = measure(b.fn, b.states, device=device, timer=opts.timer, quick=opts.quick)
        v.update(status="ok", us=t.median_us, timing=t.as_dict())
        if t.note:
            v["timing_note"] = t.note
    except torch.cuda.OutOfMemoryError as exc:
        v.update(status="error", reason="error: out of memory: " + " ".join(str(exc).split())[:160])
    except Exception as exc:
        v.update(status="error", reason=_err(exc))
    finally:
        if b.cleanup is not None:
            try:
                b.cleanup()
            except Exception:
                pass
    return v


def run_peer(peer: Peer, problems, ref, device: torch.device, opts: Options) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        builts = peer.build(problems)
    except torch.cuda.OutOfMemoryError as exc:
        return {"status": "error", "reason": "error: out of memory while building: " + str(exc).splitlines()[0][:160]}
    except Exception as exc:
        return {"status": "error", "reason": _err(exc)}
    variants: dict[str, dict] = {}
    for i, b in enumerate(builts):
        if isinstance(b, str):
            label, _, msg = b.partition(": ")
            variants[label or f"variant{i}"] = {"status": "error", "reason": msg or b}
            continue
        variants[b.variant or "default"] = dict(_run_variant(b, problems[0].shape, ref, device, opts), note=b.note)
        if not cuda_alive(device):
            raise ContextLost(f"{peer.name}: {variants[b.variant or 'default'].get('reason', '')}")
    del builts
    ok = [(k, v) for k, v in variants.items() if v.get("status") == "ok"]
    good = [(k, v) for k, v in ok if v.get("correct") is not False]
    pool = good or ok
    row: dict[str, Any] = {"elapsed_s": round(time.perf_counter() - t0, 2)}
    if not pool:
        reasons = "; ".join(f"{k}: {v.get('reason', '?')}" if k != "default" else str(v.get("reason", "?"))
                            for k, v in variants.items())
        row.update(status="error", reason=reasons or "error: nothing built")
        if len(variants) > 1:
            row["variants"] = variants
        return row
    label, best = min(pool, key=lambda kv: kv[1]["us"])
    for key in ("status", "us", "max_abs_err", "rel_err", "row_rel_err", "tol", "row_tol", "correct", "check",
                "first_call_s", "timing", "peak_extra_mb", "timing_note"):
        if key in best:
            row[key] = best[key]
    notes = [best.get("note") or ""]
    if len(variants) > 1:
        row["variants"] = variants
        others = ", ".join(f"{k} {v['us']:.1f} us" if v.get("status") == "ok" else f"{k} {v.get('reason', 'error')}"
                           for k, v in variants.items() if k != label)
        notes.append(f"better of variants (other: {others})")
    if label != "default":
        row["variant"] = label
    if best.get("timing_note"):
        notes.append(best["timing_note"])
    row["note"] = "; ".join(n for n in notes if n)
    if row.get("correct") is False:
        g = lambda x: "nan" if x is None else f"{x:.3g}"  # noqa: E731
        row["reason"] = (f"WRONG: rel err {g(row.get('rel_err'))} (tol {row.get('tol')}), worst row "
                         f"{g(row.get('row_rel_err'))} (tol {row.get('row_tol')}) {row.get('check', '')}").strip()
    return row


def _log_row(row: dict[str, Any], log: Callable[[str], None]) -> None:
    name = f"    {row['impl']:<22}"
    if row.get("status") != "ok":
        log(f"{name}{row.get('reason') or row.get('status')}")
        return
    bits = [f"{row['us']:10.1f} us"]
    if row.get("kv_bytes"):
        gbs = row["kv_bytes"] / (row["us"] * 1e-6) / 1e9
        bits.append(f"{gbs:7.0f} GB/s")
        if row.get("_ceiling"):
            bits.append(f"{100 * gbs / row['_ceiling']:5.1f}%")
    if row.get("flops"):
        bits.append(f"{row['flops'] / (row['us'] * 1e-6) / 1e12:7.1f} TFLOP/s")
    if row.get("peak_extra_mb") is not None:
        bits.append(f"peak +{row['peak_extra_mb']:.1f} MB")
    if row.get("max_abs_err") is not None:
        bits.append(f"err {row['max_abs_err']:.1e} {'ok' if row.get('correct') else 'WRONG'}")
    method = (row.get("timing") or {}).get("method", "")
    extra = f"[{method}, first call {row.get('first_call_s', 0):.1f}s]"
    if row.get("variant"):
        extra += f" ({row['variant']})"
    log(f"{name}{'  '.join(bits)}  {extra}")


def run_shape(index: int, total: int, shape: Shape, peers: list[Peer], device: torch.device, opts: Options,
              results: dict[str, Any], deadline: float | None, log: Callable[[str], None], label: str = "") -> None:
    ceiling = (results.get("ceilings") or {}).get("read_gbs")
    set_bytes = 2 * shape.batch * shape.seqlen * shape.heads_kv * shape.head_dim * shape.elem_bytes + \
        shape.batch * shape.seqlen_q * shape.heads_q * shape.head_dim * shape.elem_bytes
    copies = copies_needed(set_bytes, l2_bytes(device)) if device.type == "cuda" else 1
    desc = f"K+V {shape.kv_bytes() / 1e6:.1f} MB" if shape.memory_bound else f"{shape.flops() / 1e12:.2f} TFLOP"
    log(f"{label}[{index}/{total}] {shape.name}  ({desc}, {copies} input cop{'y' if copies == 1 else 'ies'}, "
        f"elapsed {time.monotonic() - results['_t0']:.0f}s)")
    rows_before = len(results["rows"])
    problems = ref = None
    try:
        problems = make_problems(shape, device, copies, seed=opts.seed)
    except Exception as exc:
        reason = "error: inputs: " + (_err(exc)[7:] if not isinstance(exc, torch.cuda.OutOfMemoryError) else
                                      "out of memory")
        for p in peers:
            if not p.applies(shape):
                continue
            row = base_row(shape, p.name, p.group)
            row.update(status="error", reason=reason, copies=copies)
            results["rows"].append(row)
            _log_row(row, log)
        _free(device)
        return
    ref_note = ""
    try:
        ref = reference_output(problems[0])
    except Exception as exc:
        ref_note = f"no fp32 reference ({_err(exc)})"
        log(f"    reference failed: {ref_note}")
        _free(device)
    current = ""
    try:
        for peer in peers:
            if not peer.applies(shape):
                continue
            current = peer.name
            row = base_row(shape, peer.name, peer.group)
            row["copies"] = copies
            reason = peer.unsupported(shape, device)
            remaining = None if deadline is None else deadline - time.monotonic()
            if reason:
                row.update(status="n/a", reason=reason)
            elif remaining is not None and remaining <= 0:
                row.update(status="skipped", reason="skipped: time budget")
            elif remaining is not None and remaining < 90 and peer.name in SLOW_TO_BUILD:
                row.update(status="skipped", reason="skipped: time budget (compiles on first use)")
            else:
                if peer.name in SLOW_TO_BUILD:
                    log(f"    {peer.name:<22}building (a first use compiles; may take a while)...")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row.update(run_peer(peer, problems, ref, device, opts))
                if ref_note and row.get("status") == "ok":
                    row["note"] = "; ".join(x for x in (row.get("note"), ref_note) if x)
            row["_ceiling"] = ceiling
            _log_row(row, log)
            row.pop("_ceiling", None)
            results["rows"].append(row)
            if row.get("status") == "error":
                _free(device)
    except ContextLost as exc:
        done = {r["impl"] for r in results["rows"][rows_before:]}
        for peer in peers:
            if peer.applies(shape) and peer.name not in done:
                row = base_row(shape, peer.name, peer.group)
                if peer.name == current:
                    row.update(status="error", reason=f"error (CUDA context lost): {exc}")
                else:
                    row.update(status="skipped", reason="skipped: CUDA context lost")
                results["rows"].append(row)
                _log_row(row, log)
        raise
    finally:
        if problems is not None:
            for p in problems:
                p.release()
        del problems, ref
        _free(device)


# ------------------------------------------------------------------------------------------------
# The whole run
# ------------------------------------------------------------------------------------------------


def plan_shapes(opts: Options, device: torch.device) -> list[Shape]:
    grid = tiny_grid() if (opts.tiny or (device.type == "cpu" and not opts.shapes)) else full_grid()
    if opts.tiny and opts.shapes:
        grid = tiny_grid()
    return select(grid, opts.shapes, quick=opts.quick)


def run(opts: Options, log: Callable[[str], None] = print, peers: list[Peer] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the results dict (reports are written by `finish`).

    `peers` replaces the implementations chosen by the options (tests inject their own).
    """
    t0 = time.monotonic()
    device = resolve_device(opts.device)
    shapes = plan_shapes(opts, device)
    if peers is None:
        peers = make_peers(opts.peers or None, flex=opts.flex, flashinfer=opts.flashinfer)
    results: dict[str, Any] = {"meta": environment(device), "options": {**asdict(opts), "out": os.path.basename(os.path.normpath(str(opts.out)))}, "ceilings": None, "rows": [],
                               "status": "running", "_t0": t0}
    m = results["meta"]
    log(f"flashdecode bench on {m['card']} ({device}); torch {m['versions']['torch']}, triton "
        f"{m['versions']['triton']}, flashdecode {m['versions']['flashdecode']}, flashinfer "
        f"{m['versions']['flashinfer'] or 'not installed'}")
    if device.type == "cpu" and not opts.shapes:
        log("no CUDA device: running the tiny CPU grid (smoke test; figures are not GPU figures)")
    budget = f"; budget {opts.budget_s:.0f}s" if opts.budget_s else ""
    log(f"{len(shapes)} shapes x {len(peers)} implementations ({', '.join(p.name for p in peers)}); "
        f"timer {opts.timer}{budget}")
    deadline = t0 + opts.budget_s if opts.budget_s and opts.budget_s > 0 else None

    def on_term(signum, _frame):
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the reports short
        except Exception:
            pass
        raise Interrupted(f"signal {signum}")

    old = None
    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except Exception:
        pass
    os.makedirs(opts.out, exist_ok=True)
    json_path = os.path.join(opts.out, report.JSON_FILE)
    try:
        log("ceilings:")
        ceil_bytes = int(opts.ceiling_gb * 1e9) if device.type == "cuda" else None
        results["ceilings"] = measure_ceilings(device, size_bytes=ceil_bytes, quick=opts.quick, log=log).as_dict()
        # Phase 1: every shape with the implementations that start at once; phase 2: the ones that
        # compile on first use (FlexAttention, FlashInfer), so a tight budget still gets the core table.
        fast = [p for p in peers if p.name not in SLOW_TO_BUILD]
        slow = [p for p in peers if p.name in SLOW_TO_BUILD]
        phases = [(fast, "")] + ([(slow, f"phase 2 ({', '.join(p.name for p in slow)}) ")] if slow and fast else []) \
            if fast else [(slow, "")]
        for phase_peers, label in phases:
            todo = [s for s in shapes if any(p.applies(s) for p in phase_peers)]
            if label and todo:
                log(f"{label.strip()}: {len(todo)} shapes")
            for i, shape in enumerate(todo, 1):
                run_shape(i, len(todo), shape, phase_peers, device, opts, results, deadline, log, label)
                _write_partial(results, json_path)
        results["status"] = "complete"
    except (Interrupted, KeyboardInterrupt) as exc:
        results["status"] = f"interrupted ({exc or 'Ctrl-C'}): partial results"
        log(f"interrupted: {exc or 'Ctrl-C'}; writing what was measured")
    except ContextLost as exc:
        results["status"] = f"stopped: CUDA context lost after an error ({exc})"
        log(results["status"])
    except Exception as exc:  # a bug in the harness itself: keep what was measured
        import traceback  # noqa: PLC0415

        traceback.print_exc()
        results["status"] = f"harness error: {type(exc).__name__}: {exc}"
        log(results["status"])
    finally:
        if old is not None:
            try:
                signal.signal(signal.SIGTERM, old)
            except Exception:
                pass
    done = {(r["shape"], r["impl"]) for r in results["rows"]}
    for shape in shapes:
        for p in peers:
            if p.applies(shape) and (shape.name, p.name) not in done:
                row = base_row(shape, p.name, p.group)
                row.update(status="skipped", reason="skipped: run stopped before this row")
                results["rows"].append(row)
    order = {s.name: i for i, s in enumerate(shapes)}
    impl_order = {p.name: i for i, p in enumerate(peers)}
    results["rows"].sort(key=lambda r: (order.get(r["shape"], len(order)), impl_order.get(r["impl"], len(impl_order))))
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    results.pop("_t0", None)
    return results


def _write_partial(results: dict[str, Any], path: str) -> None:
    try:
        snapshot = {k: v for k, v in results.items() if not k.startswith("_")}
        report.write_json(report.derive(snapshot), path)
    except Exception:
        pass


def finish(results: dict[str, Any], opts: Options, log: Callable[[str], None] = print) -> None:
    """Write every report, then print the report with the main table last."""
    for msg in report.write_all(results, opts.out, plot=opts.plot):
        log(msg)
    ours = [r for r in results["rows"] if r.get("group") != "peer"]
    wrong = [r for r in ours if r.get("correct") is False]
    errors = [r for r in ours if r.get("status") == "error"]
    log(f"run {results.get('status')} in {results.get('elapsed_s', 0):.0f}s; flashdecode rows: "
        f"{sum(1 for r in ours if r.get('status') == 'ok')} ok, {len(wrong)} WRONG, {len(errors)} errors")
    log("")
    log(report.format_report(results))
