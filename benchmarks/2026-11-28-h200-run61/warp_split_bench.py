"""Time the warp-split prototype (warp_split_proto.py) against flashdecode on decode shapes (GPU, cold L2, graph
replay). Experiment code of run 61, kept with its output; not part of the package.

Usage from the repository root: python benchmarks/2026-11-28-h200-run61/warp_split_bench.py [out.json]
"""
import itertools, sys, json, math
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flashdecode
from flashdecode.attention.kernels.combine import combine_splits_kernel
from flashdecode.bench import timing
from warp_split_proto import ws_kernel

dev = "cuda"
SHAPES = [  # B, L, Hq, Hkv, D
    (16, 4096, 32, 32, 128), (128, 2048, 32, 8, 128), (32, 4096, 32, 8, 128), (64, 16384, 32, 8, 128),
]


def proto_fn(B, L, Hq, Hkv, D, W, BN_W, stages, splits, warps=4):
    G = Hq // Hkv
    BM = max(16, 1 << (G - 1).bit_length())
    kps = L // splits
    assert kps % (W * BN_W) == 0
    scale = D ** -0.5 * 1.4426950408889634

    def fn(st):
        q, k, v = st["q"], st["k"], st["v"]
        out = torch.empty(B, Hq, D, device=dev, dtype=q.dtype)
        if splits > 1:
            o_p = torch.empty(splits, B, Hq, D, device=dev, dtype=torch.float32)
            l_p = torch.empty(splits, B, Hq, device=dev, dtype=torch.float32)
            lse = torch.empty(Hq, B, device=dev, dtype=torch.float32)
            dst, ldst = o_p, l_p
        else:
            dst, ldst = out, out
        ws_kernel[(Hkv, B, splits)](
            q, k, v, dst, ldst, kps, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            dst.stride(0) if splits > 1 else 0, dst.stride(-3), dst.stride(-2),
            l_p.stride(0) if splits > 1 else 0, l_p.stride(1) if splits > 1 else 0, l_p.stride(2) if splits > 1 else 0,
            GROUP=G, BLOCK_M=BM, D=D, W=W, BN_W=BN_W, SPLIT=splits > 1, USE_PDL=True,
            num_warps=warps, num_stages=stages, launch_pdl=True)
        if splits > 1:
            sp2 = max(2, 1 << (splits - 1).bit_length())
            combine_splits_kernel[(B, Hq)](
                o_p, l_p, out, lse, splits,
                o_p.stride(0), o_p.stride(1), o_p.stride(2), l_p.stride(0), l_p.stride(1), l_p.stride(2),
                out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
                HEAD_DIM=D, HEAD_DIM_P2=D, SPLITS_P2=sp2, SPLIT_CHUNK=min(sp2, max(1, 4096 // D)), USE_PDL=True,
                num_warps=4, launch_pdl=True)
        return out
    return fn


def fd_fn(B, L, Hq, Hkv, D, splits=0):
    def fn(st):
        return flashdecode.flash_attn_with_kvcache(st["q"].unsqueeze(1), st["k"], st["v"], cache_seqlens=st["lens"],
                                                   softmax_scale=D ** -0.5, num_splits=splits)
    return fn


def main():
    l2 = timing.l2_bytes(dev)
    rows = []
    for (B, L, Hq, Hkv, D) in SHAPES:
        kv_bytes = 2 * B * L * Hkv * D * 2
        n = max(2, math.ceil(4 * l2 / kv_bytes))
        torch.manual_seed(0)
        states = []
        for _ in range(n):
            states.append(dict(q=torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16),
                               k=torch.randn(B, L, Hkv, D, device=dev, dtype=torch.bfloat16),
                               v=torch.randn(B, L, Hkv, D, device=dev, dtype=torch.bfloat16),
                               lens=torch.full((B,), L, device=dev, dtype=torch.int32)))
        st = states[0]
        qf, kf, vf = st["q"].float(), st["k"].float(), st["v"].float()
        G = Hq // Hkv
        kf = kf.repeat_interleave(G, dim=2); vf = vf.repeat_interleave(G, dim=2)
        ref = torch.softmax(torch.einsum("bhd,blhd->bhl", qf, kf) * D ** -0.5, -1)
        ref = torch.einsum("bhl,blhd->bhd", ref, vf)
        del kf, vf
        label = f"{B},{L},{Hq}/{Hkv},{D}"
        t = timing.measure_cuda(fd_fn(B, L, Hq, Hkv, D), states, timer="graph", min_time_s=0.05, max_reps=50, quick=True)
        base = t.median_us
        fd_err = (fd_fn(B, L, Hq, Hkv, D)(st).float().squeeze(1) - ref).abs().max().item()
        print(f"{label}: flashdecode {base:.1f} us err={fd_err:.1e}", flush=True)
        rows.append(dict(shape=label, impl="flashdecode", us=base))
        for fs in (1, 2, 4):
            tf = timing.measure_cuda(fd_fn(B, L, Hq, Hkv, D, fs), states, timer="graph", min_time_s=0.05, max_reps=50,
                                     quick=True).median_us
            rows.append(dict(shape=label, impl="flashdecode", splits=fs, us=tf))
            print(f"  flashdecode s={fs}: {tf:.1f} us", flush=True)
        cands = []
        for W, BN_W, stages in itertools.product((4,), (32,), (3, 4)):
            for splits in (1, 2, 4):
                if L % (splits * W * BN_W) or L // splits < 2 * W * BN_W:
                    continue
                progs = B * Hkv * splits
                if progs < 100 and splits < 32 and L // (splits * 2) >= 2 * W * BN_W:
                    continue
                cands.append((W, BN_W, stages, splits))
        best = None
        for W, BN_W, stages, splits in cands:
            fn = proto_fn(B, L, Hq, Hkv, D, W, BN_W, stages, splits)
            try:
                o = fn(st).float()
                err = (o - ref).abs().max().item()
                t = timing.measure_cuda(fn, states, timer="graph", min_time_s=0.05, max_reps=50, quick=True).median_us
            except Exception as e:
                print(f"  W={W} bn={BN_W} st={stages} s={splits}: FAILED {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            ok = err < 2e-2
            rows.append(dict(shape=label, impl="ws", W=W, bn_w=BN_W, stages=stages, splits=splits, us=t, err=err))
            print(f"  W={W} bn={BN_W} st={stages} s={splits}: {t:.1f} us ({base / t:.3f}x) err={err:.1e}{'' if ok else ' WRONG'}", flush=True)
            if ok and (best is None or t < best[0]):
                best = (t, W, BN_W, stages, splits)
        if best:
            print(f"{label}: BEST ws {best[0]:.1f} us vs flashdecode {base:.1f} ({base / best[0]:.3f}x) cfg={best[1:]}", flush=True)
        del states
        torch.cuda.empty_cache()
        if len(sys.argv) > 1:
            Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))


main()
