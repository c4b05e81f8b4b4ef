"""Time the Gluon decode prototype (gluon_proto.py) against flashdecode (GPU, cold L2, graph replay).
Experiment code of run 65, kept with its output. Usage from the repository root:
python benchmarks/2026-11-28-h200-run65/gluon_bench.py [out.json]
"""
import itertools, sys, json, math
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flashdecode
from flashdecode.attention.kernels.combine import combine_splits_kernel
from flashdecode.bench import timing
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from gluon_proto import gl_decode_kernel

dev = "cuda"
SHAPES = [  # B, L, Hq, Hkv, D, heuristic splits of flashdecode's contiguous plan
    (64, 2048, 9, 3, 64), (1, 32768, 32, 8, 128), (8, 8192, 32, 8, 128), (1, 4096, 32, 8, 128),
    (32, 8192, 32, 1, 128), (32, 4096, 32, 8, 128), (128, 2048, 32, 8, 128), (16, 4096, 32, 32, 128),
]


def proto_fn(B, L, Hq, Hkv, D, BN, stages, splits):
    G = Hq // Hkv
    BM = max(16, 1 << (G - 1).bit_length())
    kps = L // splits
    scale = D ** -0.5 * 1.4426950408889634
    lay = gl.NVMMASharedLayout.get_default_for([BN, D], gl.bfloat16)
    descs = {}

    def fn(st):
        q, k, v = st["q"], st["k"], st["v"]
        key = id(k)
        if key not in descs:
            k2, v2 = k.view(B * L, Hkv * D), v.view(B * L, Hkv * D)
            descs[key] = (TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [BN, D], lay),
                          TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [BN, D], lay))
        kd, vd = descs[key]
        out = torch.empty(B, Hq, D, device=dev, dtype=q.dtype)
        if splits > 1:
            o_p = torch.empty(splits, B, Hq, D, device=dev, dtype=torch.float32)
            l_p = torch.empty(splits, B, Hq, device=dev, dtype=torch.float32)
            lse = torch.empty(Hq, B, device=dev, dtype=torch.float32)
            dst, ldst, ls = o_p, l_p, l_p.stride()
        else:
            dst, ldst, ls = out, out, (0, 0, 0)
        gl_decode_kernel[(Hkv, B, splits)](
            q, kd, vd, dst, ldst, L, kps, scale, q.stride(0), q.stride(1),
            dst.stride(0) if splits > 1 else 0, dst.stride(-3), dst.stride(-2), *ls,
            GROUP=G, BLOCK_M=BM, D=D, BLOCK_N=BN, STAGES=stages, SPLIT=splits > 1, num_warps=4)
        if splits > 1:
            sp2 = max(2, 1 << (splits - 1).bit_length())
            combine_splits_kernel[(B, Hq)](
                o_p, l_p, out, lse, splits,
                o_p.stride(0), o_p.stride(1), o_p.stride(2), l_p.stride(0), l_p.stride(1), l_p.stride(2),
                out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
                HEAD_DIM=D, HEAD_DIM_P2=D, SPLITS_P2=sp2, SPLIT_CHUNK=min(sp2, max(1, 4096 // D)), USE_PDL=False,
                num_warps=4)
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
        states = [dict(q=torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16),
                       k=torch.randn(B, L, Hkv, D, device=dev, dtype=torch.bfloat16),
                       v=torch.randn(B, L, Hkv, D, device=dev, dtype=torch.bfloat16),
                       lens=torch.full((B,), L, device=dev, dtype=torch.int32)) for _ in range(n)]
        st = states[0]
        G = Hq // Hkv
        kf = st["k"].float().repeat_interleave(G, dim=2)
        vf = st["v"].float().repeat_interleave(G, dim=2)
        ref = torch.softmax(torch.einsum("bhd,blhd->bhl", st["q"].float(), kf) * D ** -0.5, -1)
        ref = torch.einsum("bhl,blhd->bhd", ref, vf)
        del kf, vf
        label = f"{B},{L},{Hq}/{Hkv},{D}"
        base = timing.measure_cuda(fd_fn(B, L, Hq, Hkv, D), states, timer="graph", min_time_s=0.05, max_reps=50,
                                   quick=True).median_us
        fd_err = (fd_fn(B, L, Hq, Hkv, D)(st).float().squeeze(1) - ref).abs().max().item()
        print(f"{label}: flashdecode {base:.1f} us err={fd_err:.1e}", flush=True)
        rows.append(dict(shape=label, impl="flashdecode", us=base))
        bns = (128,) if D <= 64 else (64,)
        best = None
        for BN, stages, splits in itertools.product(bns, (2, 3, 4), (1, 2, 4, 8, 16, 32)):
            if L % (splits * BN) or L // splits < 2 * BN:
                continue
            progs = B * Hkv * splits
            if progs > 3 * 132 * 4 or (progs < 66 and splits < 32):
                continue
            fn = proto_fn(B, L, Hq, Hkv, D, BN, stages, splits)
            try:
                o = fn(st).float()
                err = (o - ref).abs().max().item()
                t = timing.measure_cuda(fn, states, timer="graph", min_time_s=0.05, max_reps=50, quick=True).median_us
            except Exception as e:
                print(f"  bn={BN} st={stages} s={splits}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            ok = err < 2e-2
            rows.append(dict(shape=label, impl="gluon", bn=BN, stages=stages, splits=splits, us=t, err=err))
            print(f"  bn={BN} st={stages} s={splits}: {t:.1f} us ({base / t:.3f}x) err={err:.1e}"
                  f"{'' if ok else ' WRONG'}", flush=True)
            if ok and (best is None or t < best[0]):
                best = (t, BN, stages, splits)
        if best:
            print(f"{label}: BEST gluon {best[0]:.1f} us vs flashdecode {base:.1f} ({base / best[0]:.3f}x) "
                  f"cfg={best[1:]}", flush=True)
        del states
        torch.cuda.empty_cache()
        if len(sys.argv) > 1:
            Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))


main()
