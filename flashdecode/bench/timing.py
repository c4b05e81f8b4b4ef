"""Timing: median time per call, cold L2, without launch overhead where the card allows.

On CUDA (``timer="auto"``, the default) each implementation is timed three ways:

* ``host_us`` — eager calls in a loop, wall clock per call (what a Python caller pays per call,
  launch and host-side checks included; a throughput figure);
* the reported figure — a CUDA graph of many calls replayed; per call = replay time / calls,
  median over replays. This is the GPU time of the kernels alone, the same for every peer;
* if the graph cannot be captured: CUDA events around each eager call while the GPU is held busy
  by a sleep kernel, so that the host enqueues ahead and the events see GPU time only
  (``method="cuda-events"``; a call that synchronises the host cannot be hidden and is flagged).

``timer="events"`` skips the graph; ``timer="do_bench"`` uses ``triton.testing.do_bench``.

Every method rotates among the given input sets (``states``): the caller makes several copies of
the inputs when one set would fit in L2 (`copies_needed`), so each call reads cold data.

On CPU: ``time.perf_counter`` around each call (smoke tests only).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

L2_FALLBACK_BYTES = 50 * 1024 * 1024


@dataclass
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    mean_us: float
    samples: int
    method: str
    host_us: float | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def l2_bytes(device: torch.device | str | None = None) -> int:
    """The card's L2 size (50 MB on H100, 60 MB on H200); the fallback when unknown."""
    try:
        dev = torch.device(device) if device is not None else torch.device("cuda")
        if dev.type == "cuda" and torch.cuda.is_available():
            size = int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 0)
            if size > 0:
                return size
    except Exception:
        pass
    return L2_FALLBACK_BYTES


def copies_needed(set_bytes: int, l2: int = L2_FALLBACK_BYTES, max_copies: int = 64) -> int:
    """How many input copies to rotate among so each call reads data that is not in L2.

    One set of at least twice the L2 streams through it (no reuse between calls); smaller sets are
    copied until the rotation spans four times the L2.
    """
    if set_bytes <= 0:
        return 1
    if set_bytes >= 2 * l2:
        return 1
    return max(1, min(max_copies, math.ceil(4 * l2 / set_bytes)))


def summarize(samples_us: Sequence[float], method: str, host_us: float | None = None, note: str = "") -> Timing:
    xs = sorted(float(x) for x in samples_us)
    if not xs:
        raise ValueError("no timing samples")

    def q(p: float) -> float:
        if len(xs) == 1:
            return xs[0]
        pos = p * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return Timing(
        median_us=statistics.median(xs),
        p10_us=q(0.1),
        p90_us=q(0.9),
        mean_us=statistics.fmean(xs),
        samples=len(xs),
        method=method,
        host_us=host_us,
        note=note,
    )


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------


def measure_cpu(fn: Callable[[Any], Any], states: Sequence[Any], *, min_time_s: float = 0.05, max_reps: int = 50,
                min_reps: int = 3, warmup: int = 1) -> Timing:
    n = len(states)
    for i in range(max(warmup, 0)):
        fn(states[i % n])
    samples: list[float] = []
    start = time.perf_counter()
    i = 0
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn(states[i % n])
        samples.append((time.perf_counter() - t0) * 1e6)
        i += 1
    t = summarize(samples, "cpu-perf_counter")
    t.host_us = t.median_us
    return t


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------

_CYCLES_PER_US: float | None = None


def _sleep_cycles_per_us() -> float:
    """Calibrate torch.cuda._sleep (spin cycles) against CUDA events, once per process."""
    global _CYCLES_PER_US
    if _CYCLES_PER_US is None:
        try:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1_000_000)  # let clocks ramp up first
            e0.record()
            torch.cuda._sleep(2_000_000)
            e1.record()
            torch.cuda.synchronize()
            us = e0.elapsed_time(e1) * 1000.0
            _CYCLES_PER_US = max(100.0, 2_000_000 / max(us, 1e-3))
        except Exception:
            _CYCLES_PER_US = 2000.0  # ~2 GHz
    return _CYCLES_PER_US


def _head_start(us: float) -> None:
    """Keep the GPU busy for about `us` microseconds so the host can enqueue ahead of it."""
    us = min(max(us, 20.0), 200_000.0)
    try:
        torch.cuda._sleep(int(us * _sleep_cycles_per_us()))
    except Exception:
        pass


def _host_time(fn, states, n_calls: int) -> float:
    """Eager wall time per call (µs) over `n_calls` calls, the queue drained before and after."""
    n = len(states)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n_calls):
        fn(states[i % n])
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / n_calls


def call_synchronizes(fn, states) -> bool:
    """True when one call waits for the GPU (a host sync inside, e.g. a value check with .item())."""
    try:
        torch.cuda.synchronize()
        _head_start(30_000)  # 30 ms of GPU work queued ahead of the call
        marker = torch.cuda.Event()
        marker.record()
        fn(states[0])
        done = marker.query()  # the sleep already finished: the call must have waited for it
        torch.cuda.synchronize()
        return bool(done)
    except Exception:
        torch.cuda.synchronize()
        return False


def _gpu_estimate_us(fn, states, calls: int = 5) -> float:
    n = len(states)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _head_start(2000)
    e0.record()
    for i in range(calls):
        fn(states[i % n])
    e1.record()
    torch.cuda.synchronize()
    return max(e0.elapsed_time(e1) * 1000.0 / calls, 0.5)


def measure_events(fn, states, *, reps: int, host_us: float, syncs: bool = False) -> Timing:
    """CUDA events around each eager call, the GPU kept busy by a head-start sleep."""
    n = len(states)
    samples: list[float] = []
    factor, retries, hidden_batches, batches = 2.0, 0, 0, 0
    i = 0
    batch = 64
    while len(samples) < reps:
        m = min(batch, reps - len(samples))
        evs = [torch.cuda.Event(enable_timing=True) for _ in range(m + 1)]
        _head_start(0 if syncs else m * host_us * factor + 200.0)
        marker = torch.cuda.Event()
        marker.record()
        evs[0].record()
        for j in range(m):
            fn(states[i % n])
            i += 1
            evs[j + 1].record()
        held = not marker.query()
        torch.cuda.synchronize()
        if not held and not syncs and retries < 3:
            retries += 1
            factor *= 4.0  # the host was slower than the head start: retry this batch with more
            continue
        batches += 1
        hidden_batches += int(held)
        samples += [evs[j].elapsed_time(evs[j + 1]) * 1000.0 for j in range(m)]
    note = ""
    if syncs:
        note = "call synchronises the host: event times include launch gaps"
    elif hidden_batches < batches:
        note = f"host-bound in {batches - hidden_batches}/{batches} batches: event times may include launch gaps"
    return summarize(samples, "cuda-events", host_us=host_us, note=note)


def _calls_per_graph(est_us: float, n: int, target_replay_us: float, max_calls: int) -> int:
    """A multiple of the `n` input sets, about `target_replay_us` of work, at most `max_calls` (or `n`)."""
    calls = n * max(1, math.ceil(target_replay_us / max(est_us * n, 1e-3)))
    return max(n, min(calls, max(max_calls, n)))


def _capture(fn, states, calls: int) -> "torch.cuda.CUDAGraph":
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(states[i % len(states)])
    torch.cuda.synchronize()
    return graph


def _replay_us(graph) -> float:
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    graph.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1000.0


def measure_graph(fn, states, *, est_us: float, min_time_s: float, host_us: float,
                  max_calls: int = 256, target_replay_us: float = 3000.0) -> Timing:
    """Capture many calls (rotating among `states`) into one CUDA graph; time its replays.

    The number of calls per graph follows `est_us`. That estimate comes from eager calls, which
    are host-bound for an op that synchronises the host (a value check): then the first graph
    replay gives the real time per call, and the graph is captured again with as many calls as
    that time asks for, so that every implementation shares the graph's launch gap among a
    similar number of calls.
    """
    n = len(states)
    calls = _calls_per_graph(est_us, n, target_replay_us, max_calls)
    # Warm-up on a side stream, as PyTorch recommends before capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for st in states:
            fn(st)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = _capture(fn, states, calls)
    try:
        graph.replay()
        torch.cuda.synchronize()
        graph_est = _replay_us(graph) / calls
        better = _calls_per_graph(graph_est, n, target_replay_us, max_calls)
        if better >= 2 * calls:
            graph = None  # free the first graph before capturing the second
            graph = _capture(fn, states, better)
            graph.replay()
            torch.cuda.synchronize()
            calls = better
        replay_us = max(graph_est * calls, 1.0)
        replays = int(min(200, max(7, min_time_s * 1e6 / replay_us)))
        evs = [torch.cuda.Event(enable_timing=True) for _ in range(replays + 1)]
        _head_start(replays * 30.0 + 200.0)
        evs[0].record()
        for r in range(replays):
            graph.replay()
            evs[r + 1].record()
        torch.cuda.synchronize()
        samples = [evs[r].elapsed_time(evs[r + 1]) * 1000.0 / calls for r in range(replays)]
    finally:
        del graph
    t = summarize(samples, "cuda-graph", host_us=host_us)
    t.note = f"{calls} calls/graph"
    return t


def _recover() -> None:
    """After a failed capture: drain the queue and drop the graph's memory."""
    try:
        torch.cuda.synchronize()
    except Exception:
        pass
    try:
        torch.cuda.empty_cache()
    except Exception:
        pass


def measure_do_bench(fn, states, *, host_us: float, quick: bool) -> Timing:
    import triton.testing  # noqa: PLC0415

    n = len(states)
    counter = [0]

    def call():
        fn(states[counter[0] % n])
        counter[0] += 1

    res = triton.testing.do_bench(call, warmup=10 if quick else 25, rep=40 if quick else 100,
                                  quantiles=[0.5, 0.1, 0.9], return_mode="median")
    med, p10, p90 = (float(x) * 1000.0 for x in res)
    return Timing(med, p10, p90, med, -1, "triton-do_bench", host_us=host_us)


def measure_cuda(fn: Callable[[Any], Any], states: Sequence[Any], *, timer: str = "auto", min_time_s: float = 0.3,
                 max_reps: int = 500, min_reps: int = 10, quick: bool = False) -> Timing:
    n = len(states)
    for st in states:  # warm-up: every copy once, then a few more
        fn(st)
    for i in range(3):
        fn(states[i % n])
    torch.cuda.synchronize()
    est = _gpu_estimate_us(fn, states)
    host_calls = int(min(max(3, 0.05e6 / max(est, 1.0)), 200))
    host_us = _host_time(fn, states, host_calls)
    notes: list[str] = []
    if timer == "do_bench":
        return measure_do_bench(fn, states, host_us=host_us, quick=quick)
    if timer in ("auto", "graph"):
        for attempt in (1, 2):  # a second try: a lazy first-use initialisation may break the first capture
            try:
                return measure_graph(fn, states, est_us=est, min_time_s=min_time_s, host_us=host_us)
            except Exception as exc:  # capture not possible for this implementation: eager events instead
                _recover()
                if attempt == 2:
                    msg = str(exc).strip().splitlines()[0][:80] if str(exc).strip() else ""
                    notes.append(f"no graph ({type(exc).__name__}: {msg})")
                    if timer == "graph":
                        raise
                    break
                try:
                    for st in states:
                        fn(st)
                    torch.cuda.synchronize()
                except Exception:
                    _recover()
    syncs = call_synchronizes(fn, states)
    reps = int(min(max_reps, max(min_reps, min_time_s * 1e6 / max(est, 1.0))))
    t = measure_events(fn, states, reps=reps, host_us=host_us, syncs=syncs)
    if notes:
        t.note = "; ".join(notes + ([t.note] if t.note else []))
    return t


def measure(fn: Callable[[Any], Any], states: Sequence[Any], *, device: torch.device | str, timer: str = "auto",
            quick: bool = False) -> Timing:
    """Median time of `fn(state)` rotating over `states` (see the module docstring)."""
    if not states:
        raise ValueError("measure needs at least one input set")
    dev = torch.device(device)
    if dev.type == "cuda":
        return measure_cuda(fn, states, timer=timer, min_time_s=0.1 if quick else 0.3, max_reps=200 if quick else 500,
                            quick=quick)
    return measure_cpu(fn, states, min_time_s=0.02 if quick else 0.05)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device | str) -> tuple[int, Any]:
    """Peak GPU memory one call allocates beyond what exists before it and the output it returns.

    Returns (bytes, output). CUDA only (the caching allocator's statistics).
    """
    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    out_bytes = _tensor_bytes(out)
    return max(0, peak - base - out_bytes), out


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes() if obj.numel() else 0
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x) for x in obj)
    return 0
