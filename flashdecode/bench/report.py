"""Reports of one benchmark run: derived figures, text tables, JSON, Markdown and a PNG plot.

Input is the run's result dict (see runner.py): ``meta`` (card, versions, date), ``ceilings``,
``rows`` (one per shape x implementation) and ``options``. Everything here is pure Python on that
dict, so it is tested on CPU with made-up rows.

Figures per row: ``us`` (median µs per call), ``gbs`` (K+V bytes actually read / time, 1e9 B/s),
``pct_ceiling`` (gbs / measured read ceiling), ``tflops`` (prefill), ``speedup`` (best peer's time /
this time: > 1 is faster than every peer), ``ratio_best_peer`` (this time / best peer's, the issue's
"<= 1.00"), ``paged_ratio`` (flashdecode paged / contiguous) and ``append_ratio`` (flashdecode with
append / the same decode without).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

MEMORY_BOUND = ("decode", "ragged", "spec", "append")
IMPL_ORDER = ("flashdecode", "flashdecode-paged", "flashdecode-noappend", "sdpa-flash", "sdpa-cudnn", "flashinfer",
              "naive", "flex")
OURS = "flashdecode"
PAGED = "flashdecode-paged"
NOAPPEND = "flashdecode-noappend"

PLOT_FILE = "bandwidth.png"
JSON_FILE = "results.json"
MD_FILE = "results.md"
TABLE_FILE = "table.txt"


# ------------------------------------------------------------------------------------------------
# Derived figures
# ------------------------------------------------------------------------------------------------


def _ok(row: dict[str, Any]) -> bool:
    return row.get("status") == "ok" and row.get("us") is not None and row.get("correct") is not False


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Fill gbs / pct_ceiling / tflops / speedup / ratios into every row (in place); returns results."""
    ceiling = (results.get("ceilings") or {}).get("read_gbs")
    rows = results.get("rows", [])
    by_shape: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_shape.setdefault(r["shape"], []).append(r)
    for shape_rows in by_shape.values():
        peers = [r for r in shape_rows if r.get("group") == "peer" and _ok(r)]
        best = min(peers, key=lambda r: r["us"]) if peers else None
        # Peers that would have run but were not timed (time budget, a stopped run): the best peer
        # is then the best of those that ran, which may not be the best there is.
        not_run = sorted(r["impl"] for r in shape_rows if r.get("group") == "peer" and r.get("status") == "skipped")
        times = {r["impl"]: r["us"] for r in shape_rows if _ok(r)}
        for r in shape_rows:
            us = r.get("us")
            for key in ("gbs", "pct_ceiling", "tflops", "speedup", "ratio_best_peer", "paged_ratio", "append_ratio",
                        "speedup_vs_naive", "memory_vs_naive"):
                r[key] = None
            r["best_peer"] = best["impl"] if best else None
            r["best_peer_us"] = best["us"] if best else None
            r["peers_not_run"] = not_run
            if us is None or us <= 0 or r.get("status") != "ok":
                continue
            if r.get("kv_bytes"):
                r["gbs"] = r["kv_bytes"] / (us * 1e-6) / 1e9
                if ceiling:
                    r["pct_ceiling"] = 100.0 * r["gbs"] / ceiling
            if r.get("flops"):
                r["tflops"] = r["flops"] / (us * 1e-6) / 1e12
            if best is not None:
                r["speedup"] = best["us"] / us
                r["ratio_best_peer"] = us / best["us"]
            if r["impl"] == PAGED and OURS in times:
                r["paged_ratio"] = us / times[OURS]
            if r["impl"] == OURS and NOAPPEND in times:
                r["append_ratio"] = us / times[NOAPPEND]
            if r.get("kind") == "memory":
                naive = next((x for x in shape_rows if x["impl"] == "naive" and x.get("status") == "ok"), None)
                if naive is not None and naive.get("us"):
                    r["speedup_vs_naive"] = naive["us"] / us
                    if naive.get("peak_extra_mb") is not None and r.get("peak_extra_mb"):
                        r["memory_vs_naive"] = naive["peak_extra_mb"] / r["peak_extra_mb"]
    results["targets"] = evaluate_targets(results)
    return results


def _row(results, shape_name: str, impl: str = OURS) -> dict[str, Any] | None:
    for r in results.get("rows", []):
        if r["shape"] == shape_name and r["impl"] == impl:
            return r
    return None


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its figure and met = True / False / None (not measured)."""
    out: list[dict[str, Any]] = []

    def add(what: str, shape: str, value, goal: str, met):
        out.append({"target": what, "shape": shape, "value": value, "goal": goal, "met": met})

    def ok_val(r, key):
        return r.get(key) if r and r.get("status") == "ok" and r.get("correct") is not False else None

    shape_names = []
    for r in results.get("rows", []):
        if r["shape"] not in shape_names:
            shape_names.append(r["shape"])
    kinds = {r["shape"]: r.get("kind") for r in results.get("rows", [])}
    for name in shape_names:
        kind = kinds.get(name)
        ours = _row(results, name)
        if kind == "decode":
            v = ok_val(ours, "ratio_best_peer")
            not_run = (ours or {}).get("peers_not_run") or []
            met = None if v is None else v <= 1.0
            goal = "<= 1.00"
            if not_run:
                goal += f" (not run: {', '.join(not_run)})"
                if met:
                    met = None  # ahead of the peers that ran; one that did not might be faster
            add("no slower than the best peer", name, v, goal, met)
            pr = ok_val(_row(results, name, PAGED), "paged_ratio")
            add("paged within 5% of contiguous", name, pr, "<= 1.05", None if pr is None else pr <= 1.05)
        if kind in ("decode", "spec") and ours and (ours.get("kv_bytes") or 0) >= 256e6:
            v = ok_val(ours, "pct_ceiling")
            add(">= 90% of read ceiling (>= 256 MB K+V)", name, v, ">= 90%", None if v is None else v >= 90.0)
        spec = name.split(":", 1)[-1]
        if kind == "decode" and spec == "1,32768,32/8,128":
            v = ok_val(ours, "pct_ceiling")
            add(">= 80% of read ceiling", name, v, ">= 80%", None if v is None else v >= 80.0)
        for s, lim in (("1,4096,32/8,128", 12.0), ("32,8192,32/1,128", 55.0), ("64,2048,9/3,64", 40.0)):
            if kind == "decode" and spec == s:
                v = ok_val(ours, "us")
                add(f"<= {lim:g} us", name, v, f"<= {lim:g} us", None if v is None else v <= lim)
        if kind == "ragged":
            v = ok_val(ours, "pct_ceiling")
            add(">= 85% of read ceiling (bytes read)", name, v, ">= 85%", None if v is None else v >= 85.0)
        if kind == "append":
            v = ok_val(ours, "append_ratio")
            add("append costs <= 10% over decode", name, v, "<= 1.10", None if v is None else v <= 1.10)
    return out


# ------------------------------------------------------------------------------------------------
# Text tables
# ------------------------------------------------------------------------------------------------


def _f(x, fmt: str, none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, fmt)


def _err_cell(r) -> str:
    if r.get("max_abs_err") is None:
        return "-"
    flag = " WRONG" if r.get("correct") is False else ""
    return f"{r['max_abs_err']:.1e}{flag}"


def _status_cell(r, width: int = 70) -> str:
    if r.get("status") == "ok":
        bits = [b for b in (r.get("variant"), r.get("note")) if b]
        text = "; ".join(bits)
    else:
        text = r.get("reason") or r.get("status") or ""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def render_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    align = align or ("l" * len(headers))

    def fmt(row):
        cells = [c.ljust(widths[i]) if align[i] == "l" else c.rjust(widths[i]) for i, c in enumerate(row)]
        return "  ".join(cells).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), sep] + [fmt(r) for r in rows])


MAIN_HEADERS = ["shape", "impl", "us", "GB/s", "%ceil", "speedup", "paged/contig", "max err", "status / note"]


def main_table_rows(results) -> list[list[str]]:
    rows = []
    for r in results.get("rows", []):
        if r.get("kind") not in MEMORY_BOUND:
            continue
        ratio = r.get("paged_ratio")
        if r["impl"] == OURS and r.get("append_ratio") is not None:
            ratio_cell = f"append x{r['append_ratio']:.2f}"
        else:
            ratio_cell = _f(ratio, ".3f")
        rows.append([
            r["shape"], r["impl"], _f(r.get("us"), ".1f"), _f(r.get("gbs"), ".0f"), _f(r.get("pct_ceiling"), ".1f"),
            _f(r.get("speedup"), ".2f"), ratio_cell, _err_cell(r), _status_cell(r),
        ])
    return rows


def format_main_table(results) -> str:
    c = results.get("ceilings") or {}
    head = (f"Decode-type shapes: median GPU us per call; GB/s of K+V actually read; %ceil of the measured read "
            f"ceiling ({_f(c.get('read_gbs'), '.0f')} GB/s); speedup = best peer's time / this time")
    return head + "\n" + render_table(MAIN_HEADERS, main_table_rows(results), "llrrrrrll")


def prefill_rows(results) -> list[list[str]]:
    rows = []
    for r in results.get("rows", []):
        if r.get("kind") != "prefill":
            continue
        rows.append([r["shape"], r["impl"], _f(r.get("us"), ".1f"), _f(r.get("tflops"), ".1f"),
                     _f(r.get("speedup"), ".2f"), _err_cell(r), _status_cell(r)])
    return rows


PREFILL_HEADERS = ["shape", "impl", "us", "TFLOP/s", "speedup", "max err", "status / note"]
MEMORY_HEADERS = ["L", "impl", "time ms", "x faster than naive", "peak extra MB", "x less memory", "max err",
                  "status / note"]


def memory_rows(results) -> list[list[str]]:
    rows = []
    for r in results.get("rows", []):
        if r.get("kind") != "memory":
            continue
        us = r.get("us")
        rows.append([str(r.get("seqlen")), r["impl"], _f(None if us is None else us / 1000.0, ".3f"),
                     _f(r.get("speedup_vs_naive"), ".1f"), _f(r.get("peak_extra_mb"), ".1f"),
                     _f(r.get("memory_vs_naive"), ".1f"), _err_cell(r), _status_cell(r)])
    return rows


def format_targets(results) -> str:
    lines = []
    for t in results.get("targets", []):
        mark = {True: "MET ", False: "MISS", None: "n/a "}[t["met"]]
        v = t["value"]
        vs = "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append([mark, t["shape"], t["target"], vs, t["goal"]])
    if not lines:
        return "Targets: none measured"
    return "Targets of issue 4 (flashdecode contiguous unless stated)\n" + render_table(
        ["", "shape", "target", "value", "goal"], lines, "lllrl")


def format_header(results) -> str:
    m = results.get("meta", {})
    c = results.get("ceilings") or {}
    v = m.get("versions", {})
    return (f"flashdecode bench  {m.get('date', '?')}  card: {m.get('card', '?')}  "
            f"torch {v.get('torch', '?')}  triton {v.get('triton', '?')}  flashdecode {v.get('flashdecode', '?')}"
            f" ({v.get('flashdecode_commit', '?')})\n"
            f"read ceiling {_f(c.get('read_gbs'), '.1f')} GB/s, copy {_f(c.get('copy_gbs'), '.1f')} GB/s")


def format_report(results) -> str:
    """Everything printed at the end of a run; the main table comes last."""
    parts = [format_header(results)]
    mem = memory_rows(results)
    if mem:
        parts.append("Memory: causal prefill, B=1, 32 heads, D=128; peak GPU memory beyond inputs and output\n"
                     + render_table(MEMORY_HEADERS, mem, "rlrrrrll"))
    pre = prefill_rows(results)
    if pre:
        parts.append("Prefill (causal): TFLOP/s of the visible (query, key) pairs\n"
                     + render_table(PREFILL_HEADERS, pre, "llrrrll"))
    parts.append(format_targets(results))
    parts.append(format_main_table(results))
    return "\n\n".join(parts)


def format_summary(results) -> str:
    """A short table, one line per shape: flashdecode's figure, the best peer, the ratios, the targets."""
    derive(results)
    lines = []
    names: list[str] = []
    for r in results.get("rows", []):
        if r["shape"] not in names:
            names.append(r["shape"])
    for name in names:
        ours = _row(results, name) or {}
        paged = _row(results, name, PAGED) or {}
        kind = ours.get("kind") or name.split(":")[0]
        if ours.get("status") == "ok":
            if kind in MEMORY_BOUND:
                fig = f"{_f(ours.get('gbs'), '.0f')} GB/s {_f(ours.get('pct_ceiling'), '.0f')}%"
            elif kind == "memory" and ours.get("peak_extra_mb") is not None:
                fig = f"peak +{ours['peak_extra_mb']:.0f} MB"
            else:
                fig = f"{_f(ours.get('tflops'), '.1f')} TFLOP/s"
            check = "ok" if ours.get("correct") else ("WRONG" if ours.get("correct") is False else "?")
        else:
            fig, check = (ours.get("reason") or ours.get("status") or "-")[:40], "-"
        best = f"{ours['best_peer']} {ours['best_peer_us']:.1f}" if ours.get("best_peer") else "-"
        if ours.get("peers_not_run"):
            best += f" ({len(ours['peers_not_run'])} not run)"
        ratio = ours.get("append_ratio") if kind == "append" else paged.get("paged_ratio")
        lines.append([name, _f(ours.get("us"), ".1f"), fig, best, _f(ours.get("speedup"), ".2f"),
                      ("append x" if kind == "append" and ratio is not None else "") + _f(ratio, ".3f"), check])
    tg = results.get("targets", [])
    met = sum(1 for t in tg if t["met"] is True)
    missed = sum(1 for t in tg if t["met"] is False)
    c = results.get("ceilings") or {}
    head = (f"SUMMARY {results.get('meta', {}).get('card', '?')}: read ceiling {_f(c.get('read_gbs'), '.0f')} GB/s; "
            f"targets met {met}, missed {missed}, not measured {len(tg) - met - missed}; run {results.get('status')}")
    return head + "\n" + render_table(
        ["shape", "flashdecode us", "figure", "best peer (us)", "speedup", "paged/contig", "check"], lines, "lrrlrrl")


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _date(meta) -> str:
    d = str(meta.get("date", "?"))
    return d[:16].replace("T", " ") + " UTC" if len(d) >= 16 else d


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    headers = ["µs" if h == "us" else h for h in headers]
    out = ["| " + " | ".join(_md_escape(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def format_markdown(results) -> str:
    m = results.get("meta", {})
    c = results.get("ceilings") or {}
    v = m.get("versions", {})
    lines = [
        f"## Kernel benchmark — {m.get('card', '?')}, {_date(m)}",
        "",
        f"torch {v.get('torch', '?')}, triton {v.get('triton', '?')}, flashdecode {v.get('flashdecode', '?')} "
        f"({v.get('flashdecode_commit', '?')}), FlashInfer {v.get('flashinfer') or 'not installed'}. "
        f"Measured read ceiling {_f(c.get('read_gbs'), '.0f')} GB/s (sum of a "
        f"{_f((c.get('read_bytes') or 0) / 1e9, '.1f')} GB bf16 tensor), copy {_f(c.get('copy_gbs'), '.0f')} GB/s "
        f"(read + write). Median GPU time per call ({(results.get('options') or {}).get('timer', 'auto')} timer: "
        "CUDA-graph replay where the call can be captured, else CUDA events), inputs rotated so L2 is cold; "
        "GB/s counts the K+V bytes actually read; speedup = best peer's time / this time.",
        "",
        md_table(MAIN_HEADERS, main_table_rows(results)),
    ]
    pre = prefill_rows(results)
    if pre:
        lines += ["", "### Prefill (causal)", "", md_table(PREFILL_HEADERS, pre)]
    mem = memory_rows(results)
    if mem:
        lines += ["", "### Memory: standard vs flash attention (causal prefill, B=1, 32 heads, D=128)", "",
                  md_table(MEMORY_HEADERS, mem)]
    tg = results.get("targets", [])
    if tg:
        rows = []
        for t in tg:
            val = t["value"]
            rows.append([t["shape"], t["target"], "-" if val is None else (f"{val:.2f}" if isinstance(val, float) else
                                                                           str(val)),
                         t["goal"], {True: "met", False: "missed", None: "not measured"}[t["met"]]])
        lines += ["", "### Targets", "", md_table(["shape", "target", "value", "goal", "result"], rows)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# JSON and plot
# ------------------------------------------------------------------------------------------------


def _jsonable(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_json(results, path: str) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(results), f, indent=1, sort_keys=False)
    os.replace(tmp, path)  # a run killed mid-write still leaves the previous complete file
    return path


def plot_bandwidth(results, path: str) -> str:
    """Grouped bars: achieved GB/s per memory-bound shape and implementation, the ceilings drawn.

    Returns a one-line status ("plot: PATH" or "plot skipped: ...").
    """
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except Exception:
        return "plot skipped: matplotlib not installed"
    rows = [r for r in results.get("rows", []) if r.get("kind") in MEMORY_BOUND and r.get("gbs")]
    if not rows:
        return "plot skipped: no bandwidth figures"
    shapes: list[str] = []
    impls: list[str] = []
    for r in rows:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
        if r["impl"] not in impls:
            impls.append(r["impl"])
    impls.sort(key=lambda n: (IMPL_ORDER.index(n) if n in IMPL_ORDER else len(IMPL_ORDER), n))
    val = {(r["shape"], r["impl"]): r for r in rows}
    colors = {impl: plt.get_cmap("tab10")(j % 10) for j, impl in enumerate(impls)}
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(shapes) + 3), 5.5))
    seen: set[str] = set()
    for i, s in enumerate(shapes):
        present = [impl for impl in impls if (s, impl) in val]  # bars of one shape side by side, no gaps
        width = 0.8 / max(len(present), 1)
        for j, impl in enumerate(present):
            r = val[(s, impl)]
            bar = ax.bar(i - 0.4 + width * (j + 0.5), r["gbs"], width, color=colors[impl],
                         label=None if impl in seen else impl)[0]
            seen.add(impl)
            if r.get("correct") is False:
                bar.set_hatch("xx")
                bar.set_edgecolor("black")
    c = results.get("ceilings") or {}
    if c.get("read_gbs"):
        ax.axhline(c["read_gbs"], color="black", linestyle="--", linewidth=1.2,
                   label=f"read ceiling {c['read_gbs']:.0f} GB/s")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([s.replace(":", "\n", 1) for s in shapes], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("achieved GB/s (K+V bytes read / median time)")
    m = results.get("meta", {})
    ax.set_title(f"Decode attention bandwidth — {m.get('card', '?')} — {str(m.get('date', '?'))[:10]} "
                 "(hatched: wrong result)",
                 fontsize=10)
    top = max([c.get("read_gbs") or 0.0] + [r["gbs"] for r in rows])
    ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda k: (labels[k].startswith("read ceiling"),
                                                      impls.index(labels[k]) if labels[k] in impls else 0))
    ax.legend([handles[k] for k in order], [labels[k] for k in order], fontsize=8, ncol=5, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def write_all(results, out_dir: str, plot: bool = True) -> list[str]:
    """Derive, then write JSON, Markdown, the text report and the plot. Returns status lines."""
    os.makedirs(out_dir, exist_ok=True)
    derive(results)
    msgs = []
    try:
        msgs.append(f"json: {write_json(results, os.path.join(out_dir, JSON_FILE))}")
    except Exception as exc:
        msgs.append(f"json failed: {type(exc).__name__}: {exc}")
    try:
        p = os.path.join(out_dir, MD_FILE)
        with open(p, "w", encoding="utf-8") as f:
            f.write(format_markdown(results))
        msgs.append(f"markdown: {p}")
    except Exception as exc:
        msgs.append(f"markdown failed: {type(exc).__name__}: {exc}")
    try:
        p = os.path.join(out_dir, TABLE_FILE)
        with open(p, "w", encoding="utf-8") as f:
            f.write(format_report(results) + "\n")
        msgs.append(f"table: {p}")
    except Exception as exc:
        msgs.append(f"table failed: {type(exc).__name__}: {exc}")
    if plot:
        try:
            msgs.append(plot_bandwidth(results, os.path.join(out_dir, PLOT_FILE)))
        except Exception as exc:
            msgs.append(f"plot failed: {type(exc).__name__}: {exc}")
    else:
        msgs.append("plot skipped: --no-plot")
    return msgs
