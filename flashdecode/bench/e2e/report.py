"""Derived figures, targets and reports (pure Python on the results dict)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from typing import Any


from flashdecode.bench.e2e.config import (
    FULL_WORKLOAD, JSON_FILE, MD_FILE, TABLE_FILE, TARGET_8B_ROOFLINE_PCT, TARGET_SMOLLM2_TPS,
    TARGET_THROUGHPUT_SPEEDUP, WORKLOADS,
)
from flashdecode.bench.e2e.roofline import roofline_tokens_per_s


def _ok(r: dict[str, Any]) -> bool:
    return r.get("status") == "ok" and bool(r.get("tokens_per_s"))


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Fill roofline share, best transformers config and speed-up into every row (in place)."""
    read_gbs = (results.get("ceilings") or {}).get("read_gbs")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results.get("rows", []):
        groups.setdefault((r["model"], r["workload"]), []).append(r)
    for rows in groups.values():
        peers = [r for r in rows if r.get("group") == "peer" and _ok(r)]
        best = max(peers, key=lambda r: r["tokens_per_s"]) if peers else None
        ref = next((r for r in rows if r["impl"] == "hf-dynamic" and r.get("first_tokens")), None)
        eager = next((r for r in rows if r["impl"] == "flashdecode-eager" and r.get("first_tokens")), None)
        for r in rows:
            r["best_hf"] = best["impl"] if best else None
            r["speedup_vs_best_hf"] = None
            r["roofline_tokens_per_s"] = roofline_tokens_per_s(r.get("bytes_per_step") or 0, read_gbs)
            r["pct_roofline"] = None
            if not _ok(r):
                continue
            if best is not None:
                r["speedup_vs_best_hf"] = r["tokens_per_s"] / best["tokens_per_s"]
            if r["workload"] == "batch1" and r["roofline_tokens_per_s"]:
                r["pct_roofline"] = 100.0 * r["tokens_per_s"] / r["roofline_tokens_per_s"]
            if ref is not None and r.get("first_tokens") and r is not ref:
                r["greedy_agree_with_hf"] = common_prefix_length(r["first_tokens"], ref["first_tokens"])
            if eager is not None and r["impl"] == "flashdecode" and r.get("first_tokens"):
                # graph replay must equal eager execution: same tokens
                r["greedy_agree_with_eager"] = common_prefix_length(r["first_tokens"], eager["first_tokens"])
    results["targets"] = evaluate_targets(results)
    return results


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _best_ours(results, model: str, workload: str, key: str) -> dict[str, Any] | None:
    rows = [r for r in results.get("rows", []) if r["model"] == model and r["workload"] == workload
            and r.get("group") == "ours" and _ok(r) and r.get(key) is not None]
    return max(rows, key=lambda r: r[key]) if rows else None


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets on the best flashdecode row; met is None when not measured."""
    models = [m for m in dict.fromkeys(r["model"] for r in results.get("rows", [])) if m != "tiny"]
    workload = (results.get("settings") or {}).get("workload")
    if workload is not None and dict(workload) != asdict(FULL_WORKLOAD):
        return []  # a smoke-test workload: the issue's targets do not apply
    out = []

    def add(name, row, key, goal, unit):
        value = row.get(key) if row else None
        out.append({"target": name, "goal": goal, "unit": unit, "value": value, "impl": row["impl"] if row else None,
                    "met": None if value is None else bool(value >= goal)})

    if "llama3-8b" in models:
        add("llama3-8b batch-1 decode, % of roofline", _best_ours(results, "llama3-8b", "batch1", "pct_roofline"),
            "pct_roofline", TARGET_8B_ROOFLINE_PCT, "%")
    if "smollm2-135m" in models:
        add("smollm2-135m batch-1 decode tokens/s", _best_ours(results, "smollm2-135m", "batch1", "tokens_per_s"),
            "tokens_per_s", TARGET_SMOLLM2_TPS, "tok/s")
    for m in models:
        add(f"{m} throughput, x best transformers", _best_ours(results, m, "throughput", "speedup_vs_best_hf"),
            "speedup_vs_best_hf", TARGET_THROUGHPUT_SPEEDUP, "x")
    return out


def fmt(x, spec: str, none: str = "-") -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return none
    return format(x, spec)


def _cell(r: dict[str, Any], width: int = 90) -> str:
    if r.get("status") == "ok":
        bits = []
        if r["workload"] == "batch1":
            bits.append(f"e2e {fmt(r.get('e2e_tokens_per_s'), '.1f')} tok/s, prefill {fmt((r.get('prefill_s') or 0) * 1e3, '.1f')} ms")
        if r.get("hf_batch_size"):
            bits.append(f"batches of {r['hf_batch_size']}")
        st = r.get("engine_stats") or {}
        if st.get("preemptions"):
            bits.append(f"{st['preemptions']} preemptions")
        if r.get("graph_replays") is not None:
            bits.append(f"{r['graph_replays']} graph replays" + (" (decode ran eagerly!)" if not r["graph_replays"] else ""))
        if st.get("ahead_steps"):
            bits.append(f"{st['ahead_steps']} of {st.get('steps', '?')} steps launched ahead")
        if r.get("greedy_agree_with_eager") is not None:
            n, total = r["greedy_agree_with_eager"], len(r.get("first_tokens") or [])
            bits.append(f"== eager for {n}/{total} tok" + ("" if n == total else " (MISMATCH)"))
        if r.get("greedy_agree_with_hf") is not None:
            bits.append(f"agrees with hf for {r['greedy_agree_with_hf']} tok")
        if r.get("note"):
            bits.append(r["note"])
        text = "; ".join(bits)
    else:
        text = f"{r.get('status', '').upper()}: {r.get('reason') or ''}"
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


TABLE_HEADERS = ["model", "workload", "impl", "tok/s", "total s", "% roofline", "vs best HF", "status / note"]


def table_rows(results: dict[str, Any], width: int = 90) -> list[list[str]]:
    out = []
    rows = results.get("rows", [])
    models = list(dict.fromkeys(r["model"] for r in rows))
    order = {w: i for i, w in enumerate(WORKLOADS)}
    for r in sorted(rows, key=lambda r: (models.index(r["model"]), order.get(r["workload"], 9))):
        ok = r.get("status") == "ok"
        out.append([r["model"], r["workload"], r["impl"], fmt(r.get("tokens_per_s") if ok else None, ".1f"),
                    fmt(r.get("total_s") if ok else None, ".2f"), fmt(r.get("pct_roofline"), ".1f"),
                    fmt(r.get("speedup_vs_best_hf"), ".2f"), _cell(r, width)])
    return out


def format_targets(results: dict[str, Any]) -> str:
    lines = []
    for t in results.get("targets") or []:
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"  {t['target']}: {fmt(t['value'], '.2f')} {t['unit']} (goal >= {t['goal']:g} {t['unit']}, "
                     f"{t['impl'] or '-'}): {verdict}")
    return "\n".join(lines) if lines else "  (none apply: tiny model or smoke-test workload)"


def format_header(results: dict[str, Any]) -> str:
    m = results.get("meta", {})
    v = m.get("versions", {})
    c = results.get("ceilings") or {}
    return (f"end-to-end benchmark: {m.get('card', '?')}, {str(m.get('date', '?'))[:16].replace('T', ' ')} UTC, "
            f"torch {v.get('torch')}, transformers {v.get('transformers')}, triton {v.get('triton')}, "
            f"flashdecode {v.get('flashdecode')} ({v.get('flashdecode_commit')}); dtype "
            f"{(results.get('settings') or {}).get('dtype')}; read ceiling {fmt(c.get('read_gbs'), '.1f')} GB/s; "
            f"status: {results.get('status')}")


LEGEND = ("tok/s: batch1 = decode tokens/s after prefill (roofline = read ceiling / (weights + mean K/V) bytes per "
          "step); throughput = requested output tokens / wall time. vs best HF = tok/s / the best transformers "
          "config's on the same row group.")


def format_report(results: dict[str, Any]) -> str:
    from flashdecode.bench.report import render_table  # noqa: PLC0415

    parts = [format_header(results), "", render_table(TABLE_HEADERS, table_rows(results), "lllrrrrl"), "",
             LEGEND, "", "targets (issue 6, stated for H100; best flashdecode row):", format_targets(results)]
    hf = [r for r in results.get("rows", []) if r.get("batching")]
    if hf:
        parts += ["", "transformers throughput batching: " + hf[0]["batching"]]
    return "\n".join(parts)


def format_markdown(results: dict[str, Any]) -> str:
    from flashdecode.bench.report import md_table  # noqa: PLC0415

    m = results.get("meta", {})
    rows = [row[:-1] + [row[-1] or "-"] for row in table_rows(results, width=160)]
    lines = [f"### End-to-end: {m.get('card', '?')}, {str(m.get('date', '?'))[:10]}", "",
             format_header(results), "",
             md_table(TABLE_HEADERS, rows), "", LEGEND, "", "Targets (issue 6):", ""]
    for t in results.get("targets") or []:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        lines.append(f"- {t['target']}: {fmt(t['value'], '.2f')} {t['unit']} (goal >= {t['goal']:g}): {verdict}")
    hf = [r for r in results.get("rows", []) if r.get("batching")]
    if hf:
        lines += ["", f"transformers throughput: {hf[0]['batching']}."]
    return "\n".join(lines) + "\n"


def write_reports(results: dict[str, Any], out_dir: str, final: bool = True) -> list[str]:
    from flashdecode.bench.report import write_json  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    paths = [write_json(results, os.path.join(out_dir, JSON_FILE))]
    for name, text in ((MD_FILE, format_markdown(results)), (TABLE_FILE, format_report(results) + "\n")):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths
