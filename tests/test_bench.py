"""The benchmark harness (flashdecode.bench): CPU smoke tests on tiny shapes, plus one GPU smoke test.

Performance is never asserted here; these tests check that the harness measures, checks and reports
what it claims to: the shape grid, timing fallbacks, the correctness check (it must catch a wrong
implementation), isolation of failing peers, the time budget, and every report writer.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from flashdecode.bench import cli, report, runner, shapes, timing
from flashdecode.bench.peers import (
    PAGE_SIZE,
    Built,
    FlashdecodeContiguous,
    FlashdecodeNoAppend,
    FlashdecodePaged,
    FlashInfer,
    Naive,
    Peer,
    SDPACudnn,
    SDPAFlash,
    compare,
    make_peers,
    make_problems,
    reference_output,
)
from flashdecode.bench.shapes import Shape

CPU = torch.device("cpu")
TINY = Shape("decode", 2, 40, 4, 2, 16)


def _opts(tmp_path, **kw) -> runner.Options:
    base = dict(device="cpu", tiny=True, quick=True, out=str(tmp_path / "out"), flex=False, flashinfer=False)
    base.update(kw)
    return runner.Options(**base)


def _quiet(_msg: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------


def test_full_grid_has_every_shape_of_the_issue():
    grid = shapes.full_grid()
    decode = [s.spec for s in grid if s.kind == "decode"]
    assert decode == ["1,4096,32/8,128", "1,32768,32/8,128", "1,131072,32/8,128", "8,8192,32/8,128",
                      "32,4096,32/8,128", "64,16384,32/8,128", "128,2048,32/8,128", "16,4096,32/32,128",
                      "32,8192,32/1,128", "64,2048,9/3,64", "16,8192,16/8,256"]
    kinds = {s.kind: s for s in grid}
    assert kinds["ragged"].spec == "64,16384,32/8,128"
    assert (kinds["spec"].seqlen_q, kinds["spec"].causal, kinds["spec"].spec) == (4, True, "32,4096,32/8,128")
    assert kinds["append"].spec == "64,4096,32/8,128" and kinds["append"].new_tokens == 1
    assert (kinds["prefill"].seqlen_q, kinds["prefill"].causal, kinds["prefill"].batch) == (4096, True, 4)
    assert [s.seqlen for s in grid if s.kind == "memory"] == [1024, 4096, 16384]
    assert all(s.dtype == "bfloat16" for s in grid)
    assert len({s.name for s in grid}) == len(grid)  # names are unique
    quick = [s for s in grid if s.quick]
    assert 3 <= len(quick) <= 6 and any(s.kind == "memory" for s in quick)


def test_bytes_and_flops():
    s = Shape("decode", 2, 4096, 32, 8, 128)
    assert s.kv_bytes() == 2 * 2 * 4096 * 8 * 128 * 2
    r = Shape("ragged", 64, 16384, 32, 8, 128)
    lens = r.kv_lengths()
    assert len(lens) == 64 and min(lens) >= 1 and max(lens) <= 16384 and lens == r.kv_lengths()  # seeded
    assert r.kv_bytes() == 2 * sum(lens) * 8 * 128 * 2  # bytes actually read, not capacity
    p = Shape("prefill", 1, 64, 4, 2, 16, seqlen_q=64, causal=True)
    assert p.flops() == 4 * 4 * 16 * (64 * 65 // 2)
    sp = Shape("spec", 1, 10, 2, 1, 8, seqlen_q=4, causal=True)  # bottom-right: rows see 7, 8, 9, 10 keys
    assert sp.flops() == 4 * 2 * 8 * (7 + 8 + 9 + 10)


def test_parse_and_select():
    assert shapes.parse_spec("7, 100, 8/2, 64") == Shape("decode", 7, 100, 8, 2, 64)
    with pytest.raises(ValueError):
        shapes.parse_spec("7,100,8,64")
    with pytest.raises(ValueError):
        Shape("decode", 1, 10, 6, 4, 16)  # heads not divisible
    grid = shapes.full_grid()
    assert shapes.select(grid, None) == grid
    assert all(s.quick for s in shapes.select(grid, None, quick=True))
    assert [s.kind for s in shapes.select(grid, ["memory"])] == ["memory"] * 3
    assert [s.spec for s in shapes.select(grid, "32/1")] == ["32,8192,32/1,128"]
    both = shapes.select(grid, ["decode:1,4096;ragged"])
    assert [s.name for s in both] == ["decode:1,4096,32/8,128", "ragged:64,16384,32/8,128"]
    custom = shapes.select(grid, ["3,333,12/4,64"])
    assert custom == [Shape("decode", 3, 333, 12, 4, 64)]
    with pytest.raises(ValueError, match="matches no shape"):
        shapes.select(grid, ["nonsense"])


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def test_copies_needed_rotates_only_what_fits_in_l2():
    l2 = 50 << 20
    assert timing.copies_needed(4 << 30, l2) == 1
    assert timing.copies_needed(2 * l2, l2) == 1
    n = timing.copies_needed(16 << 20, l2)
    assert n * (16 << 20) >= 4 * l2 and n > 1
    assert timing.copies_needed(1, l2) == 64  # capped


def test_summarize_and_cpu_fallback_rotates():
    t = timing.summarize([5.0, 1.0, 3.0], "x")
    assert (t.median_us, t.p10_us, t.p90_us, t.samples) == (3.0, 1.4, 4.6, 3)
    calls = []
    t = timing.measure(lambda s: calls.append(s), ["a", "b", "c"], device="cpu", quick=True)
    assert t.method == "cpu-perf_counter" and t.samples >= 3 and t.median_us >= 0
    assert set(calls) == {"a", "b", "c"}
    with pytest.raises(ValueError):
        timing.measure(lambda s: None, [], device="cpu")


# ------------------------------------------------------------------------------------------------
# inputs, reference, correctness check
# ------------------------------------------------------------------------------------------------


def test_problem_copies_share_metadata_and_paged_pool_matches():
    sh = Shape("ragged", 3, 50, 4, 2, 16)  # 50 is not a multiple of the page size
    ps = make_problems(sh, CPU, copies=2)
    assert ps[0].block_table is ps[1].block_table and ps[0].kv_lens == ps[1].kv_lens
    assert not torch.equal(ps[0].k_cache, ps[1].k_cache)
    kp, vp = ps[0].paged()
    assert kp.shape[1] == PAGE_SIZE and ps[0].paged()[0] is kp  # made once
    for b in range(sh.batch):
        for t in (0, 17, 49):
            page = int(ps[0].block_table[b, t // PAGE_SIZE])
            assert torch.equal(kp[page, t % PAGE_SIZE], ps[0].k_cache[b, t])
            assert torch.equal(vp[page, t % PAGE_SIZE], ps[0].v_cache[b, t])
    assert sorted(ps[0].block_table.flatten().tolist()) == list(range(kp.shape[0]))  # a shuffled pool


def _brute(q, k, v, lens, causal, scale):
    """Loops over (b, h, i): an independent check of the reference."""
    b_, sq, hq, d = q.shape
    grp = hq // k.shape[2]
    out = torch.zeros(b_, sq, hq, d, dtype=torch.float64)
    for b in range(b_):
        n = lens[b]
        for h in range(hq):
            kh, vh = k[b, :n, h // grp].double(), v[b, :n, h // grp].double()
            for i in range(sq):
                s = (kh @ q[b, i, h].double()) * scale
                if causal:
                    s[i + n - sq + 1:] = -math.inf
                out[b, i, h] = torch.softmax(s, 0) @ vh
    return out


@pytest.mark.parametrize("kind", ["decode", "ragged", "spec"])
def test_reference_matches_brute_force(kind):
    sq = 3 if kind == "spec" else 1
    sh = Shape(kind, 3, 20, 6, 2, 8, seqlen_q=sq, causal=kind == "spec", dtype="float32")
    p = make_problems(sh, CPU)[0]
    ref = reference_output(p)
    exp = _brute(p.q, p.k_cache, p.v_cache, p.kv_lens, sh.causal, p.scale)
    assert torch.allclose(ref.double(), exp, atol=1e-5)


def test_reference_of_append_uses_rotated_new_key():
    sh = Shape("append", 2, 12, 4, 2, 8, dtype="float32")
    p = make_problems(sh, CPU)[0]
    ref = reference_output(p)
    # by hand: rotate new k and q at position L-1 (non-interleaved), attend over cache[:L-1] + new
    pos = 11
    ang = pos / (10000.0 ** (torch.arange(0, 8, 2).double() / 8))
    c, s = ang.cos(), ang.sin()

    def rot(x):
        x = x.double()
        return torch.cat([x[..., :4] * c - x[..., 4:] * s, x[..., :4] * s + x[..., 4:] * c], -1)

    k = p.k_cache.double().clone()
    v = p.v_cache.double().clone()
    k[:, pos] = rot(p.k_new[:, 0])
    v[:, pos] = p.v_new[:, 0].double()
    exp = _brute(rot(p.q), k, v, [12, 12], False, p.scale)
    assert torch.allclose(ref.double(), exp, atol=1e-4)


def test_compare_flags_wrong_and_nan():
    ref = torch.randn(2, 1, 4, 8)
    assert compare(ref.to(torch.bfloat16), ref, torch.bfloat16)["correct"]
    assert not compare(ref * 1.2, ref, torch.bfloat16)["correct"]
    bad = ref.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert not compare(bad, ref, torch.bfloat16)["correct"]
    assert not compare(ref[:1], ref, torch.bfloat16)["correct"]  # shape mismatch
    # a bug confined to rows of small magnitude (late rows of a long causal prefill) is still caught
    ref = torch.randn(1, 8, 2, 16)
    ref[:, 4:] *= 0.01
    bad = ref.clone()
    bad[:, 6:] = 0.0
    res = compare(bad, ref, torch.bfloat16)
    assert res["rel_err"] < res["tol"] and res["row_rel_err"] > res["row_tol"] and not res["correct"]


class WrongGQA(Peer):
    """Maps query head h to KV head h % Hkv instead of h // group: a classic bug."""

    name = "wrong-gqa"
    kinds = ("decode",)

    def build(self, problems):
        def fn(p):
            g = p.shape.group
            k = p.k_cache.repeat(1, 1, g, 1).transpose(1, 2).float()
            v = p.v_cache.repeat(1, 1, g, 1).transpose(1, 2).float()
            q = p.q.transpose(1, 2).float()
            w = torch.softmax(q @ k.transpose(-1, -2) * p.scale, -1)
            return (w @ v).transpose(1, 2).to(p.q.dtype)

        return [Built(fn, list(problems), lambda o: o)]


class Broken(Peer):
    name = "broken"
    kinds = ("decode",)

    def build(self, problems):
        raise RuntimeError("kernel exploded\nsecond line")


class BadVariant(Peer):
    """One variant fails, the other works: the better working one is reported."""

    name = "two-variants"
    kinds = ("decode",)

    def build(self, problems):
        good = Naive().build(problems)[0]
        good.variant = "good"

        def boom(_st):
            raise ValueError("unsupported head count")

        return [Built(boom, good.states, good.to_bshd, variant="bad"), good, "cannot: error: not built"]


def test_run_peer_detects_wrong_errors_and_variants():
    sh = Shape("decode", 2, 64, 8, 2, 16)
    probs = make_problems(sh, CPU)
    ref = reference_output(probs[0])
    opts = runner.Options(device="cpu", quick=True)
    wrong = runner.run_peer(WrongGQA(), probs, ref, CPU, opts)
    assert wrong["status"] == "ok" and wrong["correct"] is False and "WRONG" in wrong["reason"]
    ok = runner.run_peer(Naive(), probs, ref, CPU, opts)
    assert ok["status"] == "ok" and ok["correct"] is True and ok["us"] > 0
    broken = runner.run_peer(Broken(), probs, ref, CPU, opts)
    assert broken["status"] == "error" and broken["reason"] == "error: RuntimeError: kernel exploded"
    two = runner.run_peer(BadVariant(), probs, ref, CPU, opts)
    assert two["status"] == "ok" and two["variant"] == "good" and set(two["variants"]) == {"bad", "good", "cannot"}
    assert "unsupported head count" in two["variants"]["bad"]["reason"]


@pytest.mark.parametrize("shape", [s for s in shapes.tiny_grid()], ids=lambda s: s.name)
def test_cpu_peers_are_correct_on_tiny_shapes(shape):
    probs = make_problems(shape, CPU)
    ref = reference_output(probs[0])
    opts = runner.Options(device="cpu", quick=True)
    for peer in make_peers(flex=False, flashinfer=False):
        if not peer.applies(shape):
            continue
        reason = peer.unsupported(shape, CPU)
        if reason:
            assert reason.startswith("n/a: ")
            continue
        row = runner.run_peer(peer, probs, ref, CPU, opts)
        assert row["status"] == "ok", (peer.name, row)
        assert row["correct"] is True, (peer.name, row)


def test_cuda_only_peers_say_why_on_cpu():
    assert SDPACudnn().unsupported(TINY, CPU) == "n/a: needs CUDA"
    assert FlashInfer().unsupported(TINY, CPU) == "n/a: needs CUDA"
    assert SDPAFlash().unsupported(Shape("ragged", 2, 40, 4, 2, 16), CPU).startswith("n/a: ")
    assert FlashdecodeNoAppend().applies(Shape("append", 2, 40, 4, 2, 16)) and not FlashdecodeNoAppend().applies(TINY)
    assert not FlashdecodePaged().applies(Shape("memory", 1, 40, 4, 4, 16, seqlen_q=40, causal=True))
    assert FlashdecodeContiguous().applies(Shape("memory", 1, 40, 4, 4, 16, seqlen_q=40, causal=True))


# ------------------------------------------------------------------------------------------------
# a whole run on CPU, reports
# ------------------------------------------------------------------------------------------------


def test_cpu_run_end_to_end(tmp_path, capsys):
    opts = _opts(tmp_path)
    assert cli.main(["--device", "cpu", "--tiny", "--quick", "--no-flex", "--no-flashinfer", "--no-plot",
                     "--out", opts.out]) == 0
    printed = capsys.readouterr().out
    assert "[1/" in printed and "ceilings:" in printed  # progress while it runs
    tail = printed.strip().splitlines()
    assert tail[-1].startswith("append:") or tail[-1].startswith("ragged:") or tail[-1].startswith("decode:")
    assert "Decode-type shapes" in printed.split("Targets of issue 4")[-1]  # main table after the targets
    data = json.load(open(os.path.join(opts.out, report.JSON_FILE)))
    assert data["status"] == "complete"
    assert {"date", "card", "versions"} <= set(data["meta"])
    assert {"torch", "triton", "flashdecode"} <= set(data["meta"]["versions"])
    assert data["ceilings"]["read_gbs"] > 0
    ours = [r for r in data["rows"] if r["impl"] == "flashdecode"]
    assert ours and all(r["status"] == "ok" and r["correct"] for r in ours)
    assert all("us" in r and "max_abs_err" in r for r in ours)
    md = open(os.path.join(opts.out, report.MD_FILE)).read()
    assert md.startswith("## Kernel benchmark") and "| shape | impl |" in md and "### Targets" in md
    assert os.path.exists(os.path.join(opts.out, report.TABLE_FILE))


def test_wrong_flashdecode_output_fails_the_run(tmp_path, monkeypatch, capsys):
    """Exit status 4 when a flashdecode row's output failed its check; a wrong peer does not fail it."""
    rows = [dict(shape="decode:1,64,4/2,16", impl="flashdecode", correct=True),
            dict(shape="decode:1,64,4/2,16", impl="flex", correct=False)]
    fake = {"status": "complete", "rows": rows}
    monkeypatch.setattr(runner, "run", lambda opts: fake)
    monkeypatch.setattr(runner, "finish", lambda results, opts: None)
    args = ["--device", "cpu", "--tiny", "--no-plot", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    rows.append(dict(shape="decode:1,64,4/2,16", impl="flashdecode-paged", correct=False))
    assert cli.main(args) == 4
    assert "WRONG output" in capsys.readouterr().err and "flashdecode-paged" in cli.wrong_rows(fake)[0]


def test_budget_skips_rows_but_reports(tmp_path):
    opts = _opts(tmp_path, budget_s=1e-9)
    res = runner.run(opts, log=_quiet)
    runner.finish(res, opts, log=_quiet)
    assert res["status"] == "complete"
    assert res["rows"] and all(r["status"] in ("skipped", "n/a") for r in res["rows"])
    assert any(r["reason"] == "skipped: time budget" for r in res["rows"])


class Interrupting(Peer):
    name = "interrupting"
    kinds = shapes.KINDS

    def build(self, problems):
        raise KeyboardInterrupt


def test_interrupt_keeps_partial_results(tmp_path):
    opts = _opts(tmp_path)
    res = runner.run(opts, log=_quiet, peers=[Naive(), Interrupting()])
    runner.finish(res, opts, log=_quiet)
    assert res["status"].startswith("interrupted")
    first = [r for r in res["rows"] if r["impl"] == "naive"][0]
    assert first["status"] == "ok"
    assert any(r["reason"] == "skipped: run stopped before this row" for r in res["rows"])
    assert json.load(open(os.path.join(opts.out, report.JSON_FILE)))["status"].startswith("interrupted")


def _fake_results():
    def row(shape, kind, impl, us, group="peer", correct=True, status="ok", **kw):
        r = {"shape": shape, "kind": kind, "impl": impl, "group": group, "us": us, "status": status,
             "correct": correct, "kv_bytes": 3_000_000, "max_abs_err": 1e-3, "reason": "", "seqlen": 1024}
        r.update(kw)
        return r

    rows = [
        row("decode:1,4096,32/8,128", "decode", "flashdecode", 10.0, group="flashdecode", kv_bytes=16_777_216),
        row("decode:1,4096,32/8,128", "decode", "flashdecode-paged", 10.4, group="flashdecode", kv_bytes=16_777_216),
        row("decode:1,4096,32/8,128", "decode", "sdpa-cudnn", 19.0, kv_bytes=16_777_216),
        row("decode:1,4096,32/8,128", "decode", "flashinfer", 5.0, correct=False, kv_bytes=16_777_216),  # wrong: not best
        row("decode:1,4096,32/8,128", "decode", "flex", None, status="error", correct=None, reason="error: x|y"),
        row("append:64,4096,32/8,128", "append", "flashdecode", 110.0, group="flashdecode"),
        row("append:64,4096,32/8,128", "append", "flashdecode-noappend", 100.0, group="baseline"),
        row("prefill:4,4096,32/8,128", "prefill", "flashdecode", 2000.0, group="flashdecode", kv_bytes=None,
            flops=1e12),
        row("memory:1,1024,32/32,128", "memory", "naive", 400.0, kv_bytes=None, peak_extra_mb=600.0),
        row("memory:1,1024,32/32,128", "memory", "flashdecode", 100.0, group="flashdecode", kv_bytes=None,
            peak_extra_mb=6.0),
    ]
    return {"meta": {"date": "2026-11-28T00:00:00+00:00", "card": "NVIDIA H100 80GB HBM3",
                     "versions": {"torch": "2.11", "triton": "3.6", "flashdecode": "0.1.0"}},
            "ceilings": {"read_gbs": 3000.0, "copy_gbs": 2900.0, "read_bytes": 2_000_000_000},
            "options": {"timer": "auto"}, "rows": rows, "status": "complete"}


def test_derive_and_targets():
    res = report.derive(_fake_results())
    r = {(x["shape"].split(":")[0], x["impl"]): x for x in res["rows"]}
    ours = r[("decode", "flashdecode")]
    assert ours["best_peer"] == "sdpa-cudnn"  # the wrong FlashInfer result does not count
    assert ours["speedup"] == pytest.approx(1.9) and ours["ratio_best_peer"] == pytest.approx(10 / 19)
    assert ours["gbs"] == pytest.approx(16_777_216 / 10e-6 / 1e9)
    assert ours["pct_ceiling"] == pytest.approx(100 * ours["gbs"] / 3000.0)
    assert r[("decode", "flashdecode-paged")]["paged_ratio"] == pytest.approx(1.04)
    assert r[("append", "flashdecode")]["append_ratio"] == pytest.approx(1.10)
    assert r[("prefill", "flashdecode")]["tflops"] == pytest.approx(500.0)
    assert r[("memory", "flashdecode")]["memory_vs_naive"] == pytest.approx(100.0)
    assert r[("memory", "flashdecode")]["speedup_vs_naive"] == pytest.approx(4.0)
    tg = {(t["shape"].split(":")[0], t["target"]): t for t in res["targets"]}
    assert tg[("decode", "no slower than the best peer")]["met"] is True
    assert tg[("decode", "paged within 5% of contiguous")]["met"] is True
    assert tg[("decode", "<= 12 us")]["met"] is True
    assert tg[("append", "append costs <= 10% over decode")]["met"] is True


def test_best_peer_target_is_open_when_a_peer_was_not_run():
    """A peer skipped for time cannot be counted beaten: the target is neither met nor missed
    while flashdecode leads the peers that ran, and missed once one of them is faster."""
    res = _fake_results()
    shape = "decode:1,4096,32/8,128"
    res["rows"].append({"shape": shape, "kind": "decode", "impl": "flex", "group": "peer", "us": None,
                        "status": "skipped", "reason": "skipped: time budget (compiles on first use)",
                        "correct": None, "kv_bytes": 16_777_216})
    res["rows"] = [r for r in res["rows"] if not (r["shape"] == shape and r["impl"] == "flex" and r["status"] == "error")]
    report.derive(res)
    tg = {(t["shape"], t["target"]): t for t in res["targets"]}
    t = tg[(shape, "no slower than the best peer")]
    assert t["met"] is None and "not run: flex" in t["goal"]
    assert t["value"] == pytest.approx(10 / 19)
    assert "sdpa-cudnn 19.0 (1 not run)" in report.format_summary(res)
    assert "not measured 1" in report.format_summary(res)
    ours = next(r for r in res["rows"] if r["shape"] == shape and r["impl"] == "flashdecode")
    ours["us"] = 20.0  # slower than sdpa-cudnn, which ran: missed whatever flex would do
    report.derive(res)
    t = {(t["shape"], t["target"]): t for t in res["targets"]}[(shape, "no slower than the best peer")]
    assert t["met"] is False and "not run: flex" in t["goal"]


def test_peers_that_cannot_run_a_shape_leave_the_target_decided():
    res = _fake_results()
    for r in res["rows"]:
        if r["impl"] == "flex":
            r.update(status="n/a", reason="n/a: no paged cache")
    report.derive(res)
    t = next(t for t in res["targets"] if t["target"] == "no slower than the best peer")
    assert t["met"] is True and t["goal"] == "<= 1.00"


def test_text_and_markdown_reports():
    res = report.derive(_fake_results())
    text = report.format_report(res)
    assert text.index("Memory:") < text.index("Prefill") < text.index("Targets") < text.index("Decode-type shapes")
    last = text.strip().splitlines()[-1]
    assert last.startswith("append:64,4096")
    assert "WRONG" in text and "error: x|y" in text and "NVIDIA H100" in text
    md = report.format_markdown(res)
    main_table = [ln for ln in md.split("\n### ")[0].splitlines() if ln.startswith("|")]
    assert len(main_table) == 2 + 7  # header, rule, the 7 decode-type rows
    ncols = {ln.replace("\\|", "").count("|") for ln in main_table}
    assert len(ncols) == 1  # escaped pipes keep the columns aligned
    assert "error: x\\|y" in md and "H100" in md and "2026-11-28" in md


def test_json_writer_is_strict_json(tmp_path):
    res = report.derive(_fake_results())
    res["rows"][0]["rel_err"] = float("nan")
    path = report.write_json(res, str(tmp_path / "r.json"))
    text = open(path).read()
    assert "NaN" not in text
    assert json.loads(text)["rows"][0]["rel_err"] is None


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    msg = report.plot_bandwidth(report.derive(_fake_results()), str(tmp_path / "p.png"))
    assert msg == "plot skipped: matplotlib not installed"
    assert not (tmp_path / "p.png").exists()


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    msg = report.plot_bandwidth(report.derive(_fake_results()), str(path))
    assert msg == f"plot: {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_runs(tmp_path, capsys):
    a, b = _fake_results(), _fake_results()
    b["rows"] = [dict(r, shape=r["shape"].replace("decode:1,4096", "decode:2,4096")) for r in b["rows"]]
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    out = tmp_path / "merged"
    assert cli.main(["--merge", str(pa), str(pb), "--out", str(out), "--no-plot"]) == 0
    merged = json.load(open(out / report.JSON_FILE))
    assert len(merged["rows"]) == len(a["rows"]) + 5  # the five decode:2,4096 rows are new
    assert len(merged["merged_from"]) == 2
    assert "Decode-type shapes" in capsys.readouterr().out


def test_cli_list_and_bad_args(capsys):
    assert cli.main(["--list", "--device", "cpu", "--shapes", "all"]) == 0
    out = capsys.readouterr().out
    assert "decode:1,131072,32/8,128" in out and "memory:1,16384,32/32,128" in out
    assert cli.main(["--list", "--shapes", "nonsense"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["--peers", "nobody"])


# ------------------------------------------------------------------------------------------------
# GPU smoke test of the harness itself (run by scripts/gpu_check.sh before the benchmark)
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_harness_smoke(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    x = torch.randn(1 << 20, device=dev)
    t = timing.measure(lambda s: s.sum(), [x, x.clone()], device=dev)
    assert t.method == "cuda-graph" and t.median_us > 0 and t.host_us > 0
    t = timing.measure(lambda s: s.sum(), [x], device=dev, timer="events")
    assert t.method == "cuda-events" and t.median_us > 0
    assert timing.call_synchronizes(lambda s: s.sum().item(), [x])
    assert not timing.call_synchronizes(lambda s: s.sum(), [x])
    extra, _ = timing.peak_extra_bytes(lambda: (x.view(1024, 1024) @ x.view(1024, 1024)).sum(), dev)
    assert extra >= 4 << 20  # the 1024x1024 fp32 product
    # FlexAttention and FlashInfer compile on first use (minutes): the benchmark itself covers them.
    opts = runner.Options(device="cuda", tiny=True, quick=True, out=str(tmp_path / "out"), flex=False,
                          flashinfer=False, ceiling_gb=0.25)
    res = runner.run(opts, log=print)
    runner.finish(res, opts, log=print)
    assert res["status"] == "complete"
    assert res["ceilings"]["read_gbs"] and res["ceilings"]["copy_gbs"]
    for r in res["rows"]:
        if r["group"] != "peer":  # ours must run and be right; peers may say why they cannot
            assert r["status"] == "ok" and r["correct"], r


# ------------------------------------------------------------------------------------------------
# The CUDA-only control flow, run on CPU against a fake torch.cuda (catches slips in code that CI
# could otherwise never execute: the real thing runs only on the GPU machine)
# ------------------------------------------------------------------------------------------------


class _FakeCuda:
    def __init__(self, monkeypatch, capture_fails=False, host_slow=False):
        import time as _time

        self.capture_fails = capture_fails
        self.captures = 0
        fake = self

        class Event:
            def __init__(self, enable_timing=False, **_kw):
                self.t = None

            def record(self, stream=None):
                self.t = _time.perf_counter()

            def query(self):
                return host_slow  # False: the head start still holds

            def elapsed_time(self, other):
                return (other.t - self.t) * 1000.0

        class Graph:
            def replay(self):
                pass

        class GraphCtx:
            def __init__(self, g, **_kw):
                pass

            def __enter__(self):
                fake.captures += 1
                if fake.capture_fails:
                    raise RuntimeError("operation not permitted when stream is capturing")

            def __exit__(self, *a):
                return False

        class Stream:
            def wait_stream(self, other):
                pass

        class StreamCtx:
            def __init__(self, s):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return False

        c = torch.cuda
        for name, val in {
            "Event": Event, "CUDAGraph": Graph, "graph": GraphCtx, "Stream": Stream, "stream": StreamCtx,
            "current_stream": lambda *a: Stream(), "synchronize": lambda *a: None, "_sleep": lambda n: None,
            "empty_cache": lambda: None, "memory_allocated": lambda *a: 1000, "max_memory_allocated": lambda *a: 5000,
            "reset_peak_memory_stats": lambda *a: None, "is_current_stream_capturing": lambda: False,
        }.items():
            monkeypatch.setattr(c, name, val, raising=False)
        monkeypatch.setattr(timing, "_CYCLES_PER_US", None)


def test_cuda_timing_paths_with_fake_cuda(monkeypatch):
    fake = _FakeCuda(monkeypatch)
    calls = []
    t = timing.measure(lambda s: calls.append(s), ["a", "b"], device="cuda", quick=True)
    assert t.method == "cuda-graph" and fake.captures == 1 and t.host_us is not None
    assert set(calls) == {"a", "b"}
    t = timing.measure(lambda s: None, ["a"], device="cuda", timer="events", quick=True)
    assert t.method == "cuda-events" and t.samples >= 10 and t.note == ""
    fake.capture_fails = True
    t = timing.measure(lambda s: None, ["a"], device="cuda", quick=True)
    assert t.method == "cuda-events" and fake.captures == 3 and t.note.startswith("no graph (RuntimeError")
    with pytest.raises(RuntimeError):
        timing.measure(lambda s: None, ["a"], device="cuda", timer="graph", quick=True)
    extra, out = timing.peak_extra_bytes(lambda: torch.zeros(100), "cuda")
    assert extra == 5000 - 1000 - 400 and out.shape == (100,)


def test_cuda_timing_flags_host_bound_calls(monkeypatch):
    _FakeCuda(monkeypatch, host_slow=True)
    assert timing.call_synchronizes(lambda s: None, ["a"])  # the marker completed before the call returned
    t = timing.measure(lambda s: None, ["a"], device="cuda", timer="events", quick=True)
    assert "synchronises" in t.note


def test_run_peer_on_fake_cuda(monkeypatch):
    _FakeCuda(monkeypatch)
    monkeypatch.setattr(runner, "cuda_alive", lambda dev: True)
    sh = Shape("memory", 1, 32, 4, 4, 16, seqlen_q=32, causal=True)
    probs = make_problems(sh, CPU)
    ref = reference_output(probs[0])
    row = runner.run_peer(Naive(), probs, ref, torch.device("cuda"), runner.Options(device="cuda", quick=True))
    assert row["status"] == "ok" and row["correct"] and row["timing"]["method"] == "cuda-graph"
    assert row["peak_extra_mb"] is not None


class _FakeFlashInferWrapper:
    """FlashInfer's paged wrappers as documented (NHD pages, indptr / indices / last_page_len), in
    plain PyTorch: checks that the FlashInfer peer hands FlashInfer the right pages."""

    def __init__(self, workspace, layout="NHD", use_tensor_cores=False, **_kw):
        assert layout == "NHD"

    def plan(self, *args, causal=False, sm_scale=None, q_data_type=None, kv_data_type=None, **_kw):
        if len(args) == 7:  # decode: indptr, indices, last_page_len, Hq, Hkv, D, page_size
            indptr, indices, last, hq, hkv, d, page = args
            qo_indptr = None
        else:  # prefill: qo_indptr, indptr, indices, last, Hq, Hkv, D, page_size
            qo_indptr, indptr, indices, last, hq, hkv, d, page = args
        self.__dict__.update(qo=qo_indptr, indptr=indptr, indices=indices, last=last, hq=hq, hkv=hkv, page=page,
                             causal=causal, scale=sm_scale)

    def run(self, q, kv):
        kp, vp = kv
        outs = []
        b_ = self.indptr.numel() - 1
        sq = q.shape[0] // b_
        for b in range(b_):
            pages = self.indices[int(self.indptr[b]):int(self.indptr[b + 1])].long()
            n = (pages.numel() - 1) * self.page + int(self.last[b])
            k = kp[pages].reshape(-1, self.hkv, kp.shape[-1])[:n].float()
            v = vp[pages].reshape(-1, self.hkv, vp.shape[-1])[:n].float()
            k = k.repeat_interleave(self.hq // self.hkv, 1)
            v = v.repeat_interleave(self.hq // self.hkv, 1)
            qb = q[b * sq:(b + 1) * sq].float()
            s = torch.einsum("shd,nhd->hsn", qb, k) * self.scale
            if self.causal:
                i = torch.arange(sq)[:, None]
                s = s.masked_fill(torch.arange(n)[None, :] > i + n - sq, float("-inf"))
            outs.append(torch.einsum("hsn,nhd->shd", torch.softmax(s, -1), v).to(q.dtype))
        return torch.cat(outs)


@pytest.mark.parametrize("kind", ["decode", "ragged", "spec", "prefill"])
def test_flashinfer_peer_plumbing_with_a_fake_flashinfer(kind, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("flashinfer")
    fake.BatchDecodeWithPagedKVCacheWrapper = _FakeFlashInferWrapper
    fake.BatchPrefillWithPagedKVCacheWrapper = _FakeFlashInferWrapper
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    sq = {"spec": 4, "prefill": 40}.get(kind, 1)
    sh = Shape(kind, 3, 40, 6, 2, 16, seqlen_q=sq, causal=kind in ("spec", "prefill"))  # 40: a partial last page
    probs = make_problems(sh, CPU, copies=2)
    ref = reference_output(probs[0])
    builts = FlashInfer().build(probs)
    assert len(builts) == (2 if kind in ("decode", "ragged") else 1)
    for b in builts:
        assert isinstance(b, Built), b
        for st, p in zip(b.states, probs):  # every copy reads its own pool
            out = b.to_bshd(b.fn(st))
            assert compare(out, reference_output(p), torch.bfloat16)["correct"], (b.variant, p is probs[0])
    assert compare(builts[0].to_bshd(builts[0].fn(builts[0].states[0])), ref, torch.bfloat16)["correct"]
