"""Batch-1 projections: the fused GEMV kernel against the unfused layers + cuBLAS (GPU only).

For each projection of the SmolLM2-135M and Llama-3-8B shapes, times by CUDA-graph replay:
``torch``: the unfused path (norm or activation kernel, then ``F.linear``, i.e. cuBLAS) and
``fused``: `gemv_kernel` with the norm/activation inside, at `layers.gemv_config`'s tile and at
every tile of a small sweep. Weights rotate among copies totalling more than the L2 cache, so each
call reads its weight from memory as it does in a real decode step. Prints a table and, last, the
best tile per shape next to the heuristic's.

Usage: python scripts/bench_gemv.py [--budget SECONDS] [--models llama3-8b] [--wide] [--out gemv.json]

``--wide`` sweeps more tiles (up to 32 rows, 4096 columns, 16 warps); the budget is shared evenly
among the shapes, so every shape gets a sweep.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashdecode.bench.timing import measure_graph  # noqa: E402
from flashdecode.models import layers  # noqa: E402

# model, projection, N, K, prologue
SHAPES = [
    ("smollm2-135m", "qkv", 960, 576, "add-norm"),
    ("smollm2-135m", "o", 576, 576, "none"),
    ("smollm2-135m", "gate_up", 3072, 576, "add-norm"),
    ("smollm2-135m", "down", 576, 1536, "silu-mul"),
    ("smollm2-135m", "lm_head", 49152, 576, "add-norm"),
    ("llama3-8b", "qkv", 6144, 4096, "add-norm"),
    ("llama3-8b", "o", 4096, 4096, "none"),
    ("llama3-8b", "gate_up", 28672, 4096, "add-norm"),
    ("llama3-8b", "down", 4096, 14336, "silu-mul"),
    ("llama3-8b", "lm_head", 128256, 4096, "add-norm"),
]
ROTATE_BYTES = 256 * 2**20  # more than any L2


def time_us(fn, weights) -> float:
    """Median us per call of ``fn(w)``, rotating among ``weights``, by CUDA-graph replay."""
    est_us = 3.0 + weights[0].numel() * weights[0].element_size() / 3e6  # ~3 TB/s, for the batch size
    return measure_graph(fn, weights, est_us=est_us, min_time_s=0.05, host_us=0.0).median_us


def projection(prologue, x, residual, norm_w, fused: bool):
    """``w -> one batch-1 projection with weight w``, fused (the GEMV) or unfused (kernel + cuBLAS)."""
    if prologue == "none":
        return lambda w: layers.linear(x, w) if fused else F.linear(x, w)
    if prologue == "silu-mul":
        return lambda w: layers.silu_mul_linear(x, w) if fused else F.linear(layers.silu_and_mul(x), w)
    if fused:
        return lambda w: layers.norm_linear(x, residual, norm_w, 1e-5, w)
    return lambda w: F.linear(layers.rms_norm(x, norm_w, 1e-5, residual)[0], w)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=180.0, help="seconds; stops the tile sweep after this")
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "llama3-8b"])
    ap.add_argument("--wide", action="store_true", help="a wider tile sweep")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = [s for s in SHAPES if s[0] in args.models]
    if args.wide:
        grid = [(bn, bk, w) for bn, bk, w in itertools.product((4, 8, 16, 32), (1024, 2048, 4096), (4, 8, 16))
                if bn * bk <= 65536 and bn * bk >= 8 * 32 * w]  # a tile fits the registers; 8 values a thread
    else:
        grid = list(itertools.product((2, 4, 8, 16), (512, 1024, 2048), (4, 8)))
    dev, dt = "cuda", torch.bfloat16
    start = time.time()
    heuristic = layers.gemv_config
    rows, best_lines = [], []
    for index, (model, proj, n, k, prologue) in enumerate(shapes):
        shape_deadline = start + args.budget * (index + 1) / len(shapes)
        g = torch.Generator(device=dev).manual_seed(n + k)
        copies = max(2, -(-ROTATE_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, device=dev, dtype=dt, generator=g) / k**0.5 for _ in range(copies)]
        x = torch.randn(1, 2 * k if prologue == "silu-mul" else k, device=dev, dtype=dt, generator=g)
        residual = torch.randn(1, k, device=dev, dtype=dt, generator=g)
        norm_w = torch.rand(k, device=dev, dtype=dt, generator=g) + 0.5
        torch_us = time_us(projection(prologue, x, residual, norm_w, fused=False), weights)
        fused_us = time_us(projection(prologue, x, residual, norm_w, fused=True), weights)
        base = heuristic(n, k)
        row = dict(model=model, proj=proj, n=n, k=k, prologue=prologue, torch_us=torch_us, fused_us=fused_us,
                   heuristic=[base.block_n, base.block_k, base.num_warps], gbs=n * k * 2 / fused_us / 1e3, sweep=[])
        best = (fused_us, base)
        for bn, bk, warps in grid:
            if time.time() > shape_deadline or bk > max(512, triton.next_power_of_2(k)):
                continue
            cfg = layers.GemvConfig(bn, bk, warps)
            layers.gemv_config = lambda *_a, _c=cfg: _c
            try:
                us = time_us(projection(prologue, x, residual, norm_w, fused=True), weights)
            except Exception as exc:  # noqa: BLE001  (too many registers, ...)
                print(f"  {proj} bn={bn} bk={bk} w={warps}: {type(exc).__name__}", flush=True)
                continue
            finally:
                layers.gemv_config = heuristic
            row["sweep"].append([bn, bk, warps, us])
            if us < best[0]:
                best = (us, cfg)
        rows.append(row)
        print(f"{model:13s} {proj:8s} {n:6d}x{k:<6d} {prologue:8s} torch {torch_us:7.1f} us | fused {fused_us:7.1f} us "
              f"({row['gbs']:5.0f} GB/s) x{torch_us / fused_us:4.2f} | best {best[0]:7.1f} us "
              f"bn={best[1].block_n} bk={best[1].block_k} w={best[1].num_warps}", flush=True)
        best_lines.append(f"{model} {proj}: heuristic {fused_us:.1f} us {row['heuristic']} | best {best[0]:.1f} us "
                          f"[{best[1].block_n}, {best[1].block_k}, {best[1].num_warps}] | torch {torch_us:.1f} us")
        del weights
        torch.cuda.empty_cache()
    for model in args.models:
        mine = [r for r in rows if r["model"] == model]
        layer_projs = [r for r in mine if r["proj"] != "lm_head"]
        print(f"{model}: per layer torch {sum(r['torch_us'] for r in layer_projs):.1f} us vs fused "
              f"{sum(r['fused_us'] for r in layer_projs):.1f} us")
    print("\n".join(best_lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"card": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
