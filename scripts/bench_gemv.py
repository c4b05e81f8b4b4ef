"""Single-row projections on the GPU: the GEMV kernel against PyTorch's F.linear (cuBLAS).

Shapes are the batch-1 decode projections of SmolLM2-135M and Llama-3-8B (bf16). Each time is
`triton.testing.do_bench`'s median with L2 flushed between runs (in a real step every weight
comes from memory). Prints µs, GB/s of weight read and the speed-up, and the per-step totals.

Usage: python scripts/bench_gemv.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashdecode.models.layers import linear  # noqa: E402

# (name, N, K, count per decode step)
SHAPES = {
    "smollm2-135m": [("qkv", 960, 576, 30), ("o", 576, 576, 30), ("gate_up", 3072, 576, 30),
                     ("down", 576, 1536, 30), ("lm_head", 49152, 576, 1)],
    "llama3-8b": [("qkv", 6144, 4096, 32), ("o", 4096, 4096, 32), ("gate_up", 28672, 4096, 32),
                  ("down", 4096, 14336, 32), ("lm_head", 128256, 4096, 1)],
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ["FLASHDECODE_GEMV"] = "on"
    dev = torch.device("cuda")
    rows, totals = [], {}
    for model, shapes in SHAPES.items():
        t_gemv = t_torch = 0.0
        for name, n, k, count in shapes:
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
            x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
            torch.testing.assert_close(linear(x, w).float(), F.linear(x, w).float(), atol=2e-2, rtol=2e-2)
            ours = triton.testing.do_bench(lambda: linear(x, w), warmup=25, rep=100, return_mode="median")
            ref = triton.testing.do_bench(lambda: F.linear(x, w), warmup=25, rep=100, return_mode="median")
            gb = n * k * 2 / 1e9
            rows.append(dict(model=model, proj=name, n=n, k=k, gemv_us=ours * 1e3, torch_us=ref * 1e3,
                             gemv_gbs=gb / (ours * 1e-3), torch_gbs=gb / (ref * 1e-3), speedup=ref / ours))
            print(f"{model:13s} {name:8s} {n:6d}x{k:<6d} gemv {ours * 1e3:8.2f} us ({gb / (ours * 1e-3):6.0f} GB/s)"
                  f"  F.linear {ref * 1e3:8.2f} us ({gb / (ref * 1e-3):6.0f} GB/s)  x{ref / ours:.2f}", flush=True)
            t_gemv += count * ours * 1e3
            t_torch += count * ref * 1e3
        totals[model] = dict(gemv_us_per_step=t_gemv, torch_us_per_step=t_torch)
        print(f"{model}: projections per decode step: gemv {t_gemv:.0f} us, F.linear {t_torch:.0f} us", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(card=torch.cuda.get_device_name(0), rows=rows, totals=totals),
                                             indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
