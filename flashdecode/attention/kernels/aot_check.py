"""Compile the kernels for a GPU target without a GPU: ``python -m flashdecode.attention.kernels.aot_check``.

The interpreter runs the kernels' Python semantics but not Triton's compiler, so a construct the
compiler rejects (or a loop it cannot pipeline) would only show on the GPU. This compiles the main
variants for sm_90 with the integer specialisations a real launch gets (pointers and strides
divisible by 16, unit last-dim strides) and prints, per variant, the shared memory and the number
of asynchronous copies (0 would mean the K/V loads are not pipelined), how many of the PTX cp.async
copy 16 bytes, the registers and stack bytes (spills) per thread, and ``key_loop``: the SASS
instructions of the shortest loop with tensor-core instructions (HMMA, HGMMA), which for the attention
kernel is its unmasked key loop. Run it with ``TRITON_INTERPRET`` unset; name variants to compile
only those. Exit status 1 if any variant fails to compile. The Gluon kernel's variants (``gluon-*``)
compile only with the Triton versions it is written for (``GLUON_TRITON_VERSIONS``) and are
reported as skipped with any other; they load K/V by TMA, so their ``async_copies`` is 0.

The installed Triton compiles. The GPU machine's version can differ (Triton 3.6 there in
2026-11): `pip install triton==3.6.0` into a separate environment without torch, and run there
with stand-ins for the package ``__init__`` modules that import torch::

    python -c "import sys, types, runpy
    for n in ('flashdecode', 'flashdecode.attention', 'flashdecode.models'):
        m = types.ModuleType(n); m.__path__ = [n.replace('.', '/')]; sys.modules[n] = m
    sys.argv[1:] = ['decode-split-single-page']
    runpy.run_module('flashdecode.attention.kernels.aot_check', run_name='__main__')"
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

ATTENTION_VARIANTS: dict[str, dict[str, Any]] = {
    "decode-split-page16": dict(TILE_IN_PAGE=False),
    "decode-split-gather16": dict(TILE_IN_PAGE=False, GATHER_PAGE=16),
    "decode-split-in-page": dict(),
    "decode-split-single-page": dict(SINGLE_PAGE=True),
    "decode-offsets-64": dict(SINGLE_PAGE=True, OFFSETS_32=False),
    "decode-fused-append": dict(APPEND=True, ROTARY_DIM=128, ROTARY_INTERLEAVED=False),
    "decode-fused-append-page16": dict(APPEND=True, TILE_IN_PAGE=False, GATHER_PAGE=16, ROTARY_DIM=128),
    "decode-all-features": dict(SPLIT=False, HAS_WINDOW_LEFT=True, HAS_SOFTCAP=True, HAS_ALIBI=True, ROTARY_DIM=64,
                                ROTARY_INTERLEAVED=False),
    "decode-features-gather4": dict(SPLIT=False, TILE_IN_PAGE=False, GATHER_PAGE=4, HAS_WINDOW_LEFT=True,
                                    HAS_SOFTCAP=True, HAS_ALIBI=True, ROTARY_DIM=64, ROTARY_INTERLEAVED=False),
    "decode-d80": dict(HEAD_DIM=80, TILE_IN_PAGE=False, ROTARY_DIM=80),
    # Triton passes an integer argument equal to 1 as a constant (a Python int in the kernel, with
    # no `.to`): a contiguous cache of one sequence has num_pages == max_pages == 1, MQA one KV head.
    "decode-batch-1": dict(SINGLE_PAGE=True, num_pages=1, max_pages=1, total_q=1),
    "prefill-batch-1": dict(BLOCK_M=128, BLOCK_N=64, SPLIT=False, num_warps=8, SINGLE_PAGE=True, num_pages=1,
                            max_pages=1),
    "decode-mqa": dict(BLOCK_M=32, GROUP=32, num_kv_heads=1),
    # FLASHDECODE_LATE_ROW_SUM=1 (launch.late_row_sum): decode tiles only.
    "decode-late-sum": dict(SINGLE_PAGE=True, LATE_SUM=True),
    "decode-late-sum-gather16": dict(TILE_IN_PAGE=False, GATHER_PAGE=16, LATE_SUM=True),
    "decode-late-sum-d64-append": dict(HEAD_DIM=64, HEAD_DIM_P2=64, BLOCK_N=128, GROUP=3, SPLIT=False, LATE_SUM=True,
                                       APPEND=True, ROTARY_DIM=64, ROTARY_INTERLEAVED=False),
    "decode-late-sum-mqa-batch-1": dict(BLOCK_M=32, GROUP=32, num_kv_heads=1, SINGLE_PAGE=True, num_pages=1,
                                        max_pages=1, total_q=1, LATE_SUM=True),
    # launch.aligned_table: the table's width a multiple of a tile's pages (page 16).
    "decode-aligned-table": dict(TILE_IN_PAGE=False, GATHER_PAGE=16, LATE_SUM=True, TABLE_ALIGNED=True),
    "decode-aligned-table-d64": dict(HEAD_DIM=64, HEAD_DIM_P2=64, BLOCK_N=128, GROUP=3, SPLIT=False, TILE_IN_PAGE=False,
                                     GATHER_PAGE=16, LATE_SUM=True, TABLE_ALIGNED=True),
    # launch.kv_descriptors (FLASHDECODE_TMA=1): K/V tiles of a contiguous cache through TMA.
    "decode-tma": dict(SINGLE_PAGE=True, LATE_SUM=True, TMA_KV=True),
    "decode-late-sum-in-page": dict(LATE_SUM=True),  # pages of whole tiles, pointer loads
    "decode-tma-in-page": dict(LATE_SUM=True, TMA_KV=True),
    "decode-tma-d64": dict(HEAD_DIM=64, HEAD_DIM_P2=64, BLOCK_N=128, GROUP=3, SPLIT=False, SINGLE_PAGE=True,
                           LATE_SUM=True, TMA_KV=True),
    "decode-tma-mqa-batch-1": dict(BLOCK_M=32, GROUP=32, num_kv_heads=1, SINGLE_PAGE=True, num_pages=1, max_pages=1,
                                   total_q=1, LATE_SUM=True, TMA_KV=True),
    "decode-tma-fused-append": dict(SINGLE_PAGE=True, LATE_SUM=True, TMA_KV=True, APPEND=True, ROTARY_DIM=128,
                                    ROTARY_INTERLEAVED=False),
    "decode-tma-d256": dict(HEAD_DIM=256, HEAD_DIM_P2=256, BLOCK_N=32, SINGLE_PAGE=True, TMA_KV=True),
    # heuristics.deepen_lone_programs: one program per SM, 4 stages.
    "decode-tma-lone-mqa": dict(BLOCK_M=32, GROUP=32, num_kv_heads=1, SINGLE_PAGE=True, LATE_SUM=True, TMA_KV=True,
                                num_stages=4),
    "decode-tma-lone-d256": dict(HEAD_DIM=256, HEAD_DIM_P2=256, BLOCK_N=32, SPLIT=False, SINGLE_PAGE=True,
                                 LATE_SUM=True, TMA_KV=True, num_stages=4),
    # heuristics.halve_short_split_tiles: paged splits of fewer than 3 tiles take 32-key tiles.
    "decode-short-split-gather16": dict(BLOCK_N=32, TILE_IN_PAGE=False, GATHER_PAGE=16, LATE_SUM=True,
                                        TABLE_ALIGNED=True),
    # Pages of 16 slots read as 16-key tiles, one page per tile: pointer loads, and through TMA.
    "decode-page16-bn16": dict(BLOCK_N=16, LATE_SUM=True),
    "decode-tma-page16-bn16": dict(BLOCK_N=16, LATE_SUM=True, TMA_KV=True),
    "decode-d256-fp16": dict(dtype="fp16", HEAD_DIM=256, HEAD_DIM_P2=256, BLOCK_N=32, num_stages=3),
    "decode-d256-fused-append": dict(HEAD_DIM=256, HEAD_DIM_P2=256, BLOCK_N=32, num_stages=3, APPEND=True,
                                     ROTARY_DIM=256, ROTARY_INTERLEAVED=False),
    "decode-mqa-fused-append": dict(BLOCK_M=32, GROUP=32, APPEND=True, ROTARY_DIM=128, ROTARY_INTERLEAVED=False),
    "decode-fp32": dict(dtype="fp32", DOT_FP32=True, BLOCK_N=32),
    "decode-pdl": dict(APPEND=True, ROTARY_DIM=128, ROTARY_INTERLEAVED=False, USE_PDL=True),
    "prefill": dict(BLOCK_M=128, BLOCK_N=64, SPLIT=False, num_warps=8),
}


def _compile(kernel: Any, ptr_types: dict[str, str], consts: dict[str, Any], float_args: tuple[str, ...] = (),
             num_warps: int = 4, num_stages: int = 1, arch: int = 90, gluon: bool = False,
             maxnreg: int | None = None) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as source_cls
    else:
        source_cls = ASTSource

    params = list(inspect.signature(kernel.fn).parameters)
    consts = {k: v for k, v in consts.items() if k in params}
    sig, attrs = {}, {}
    for i, name in enumerate(params):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = ptr_types.get(name, "fp32" if name in float_args else "i32")
        if sig[name].startswith("tensordesc"):
            continue  # a TMA descriptor: no divisibility hint
        if name in ptr_types or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = source_cls(fn=kernel, signature=sig, constexprs={(params.index(k),): v for k, v in consts.items()},
                     attrs=attrs)
    options: dict[str, Any] = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _resources(ck: Any) -> str:
    """``regs=N stack=B`` (spilled or stacked bytes per thread) from the cubin, via triton's cuobjdump."""
    import re
    import subprocess
    import tempfile

    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(ck.asm["cubin"])
            f.flush()
            res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        regs, stack = re.search(r"REG:(\d+)", res).group(1), re.search(r"STACK:(\d+)", res).group(1)
    except Exception:  # no cuobjdump in this triton: leave the figures out
        return ""
    return f" regs={regs} stack={stack}"


def _key_loop(ck: Any) -> str:
    """`` key_loop=N``: instructions of the shortest SASS loop with tensor-core instructions (empty
    if there is none, or no nvdisasm beside this Triton's cuobjdump)."""
    import re
    import subprocess
    import tempfile

    try:
        from triton import knobs

        tool = os.path.join(os.path.dirname(knobs.nvidia.cuobjdump.path), "nvdisasm")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(ck.asm["cubin"])
            f.flush()
            sass = subprocess.run([tool, "-c", f.name], capture_output=True, text=True, timeout=60).stdout
    except Exception:
        return ""
    labels: dict[str, int] = {}
    ops: list[tuple[str, str]] = []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        instr = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", line)
        if instr:
            ops.append((instr.group(1), instr.group(2)))
    sizes = []
    for i, (op, rest) in enumerate(ops):
        target = re.search(r"(\.L_x_\d+)", rest) if op.startswith("BRA") else None
        if target and labels.get(target.group(1), i + 1) <= i:  # a backward branch closes a loop
            body = ops[labels[target.group(1)]:i + 1]
            if any(o.startswith(("HMMA", "HGMMA")) for o, _ in body):
                sizes.append(len(body))
    return f" key_loop={min(sizes)}" if sizes else ""


def _summary(ck: Any) -> str:
    """Shared memory, asynchronous copies in the TTGIR (0: K/V not pipelined), 16-byte cp.async in
    the PTX out of all cp.async (vectorisation), and registers/stack per thread when available."""
    import re

    ir = ck.asm.get("ttgir", "")
    ptx = ck.asm.get("ptx", "")
    cp_all = len(re.findall(r"cp\.async\.c[ag]\.shared\.global", ptx))
    cp16 = len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*, 0x10", ptx))
    return (f"shared={ck.metadata.shared} async_copies={ir.count('async_copy_global_to_local')} "
            f"cp16={cp16}/{cp_all}{_resources(ck)}{_key_loop(ck)}")


def attention_variant(**kw: Any) -> Any:
    from flashdecode.attention.kernels.attention import attention_split_kernel

    dt = kw.pop("dtype", "bf16")
    num_warps, num_stages = kw.pop("num_warps", 4), kw.pop("num_stages", 3)
    consts: dict[str, Any] = dict(
        GROUP=4, HEAD_DIM=128, HEAD_DIM_P2=128, BLOCK_M=16, BLOCK_N=64, SPLIT=True, TILE_IN_PAGE=True, GATHER_PAGE=0,
        SINGLE_PAGE=False, TABLE_ALIGNED=False, OFFSETS_32=True,
        HAS_WINDOW_LEFT=False, HAS_WINDOW_RIGHT=True, HAS_SOFTCAP=False, HAS_ALIBI=False, ROTARY_DIM=0,
        ROTARY_INTERLEAVED=True, ROTARY_PER_POSITION=True, DOT_FP32=False, LATE_SUM=False, APPEND=False,
        APPEND_ROWS=16, USE_PDL=False, TMA_KV=False,
        stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1,
    )
    consts.update(kw)
    if consts["HEAD_DIM"] > consts["HEAD_DIM_P2"]:
        consts["HEAD_DIM_P2"] = 256
    ptrs = {n: f"*{dt}" for n in ("Q", "K_CACHE", "V_CACHE", "COS", "SIN", "K_NEW", "V_NEW", "K_DESC", "V_DESC")}
    if consts.get("TMA_KV"):
        desc = f"tensordesc<{dt}[{consts['BLOCK_N']},{consts['HEAD_DIM_P2']}]>"
        ptrs.update(K_DESC=desc, V_DESC=desc)
    ptrs.update({n: "*i32" for n in ("BLOCK_TABLE", "CU_SEQLENS_Q", "CACHE_SEQLENS", "CACHE_LEFTPAD",
                                     "CU_SEQLENS_K_NEW", "ROTARY_SEQLENS")})
    ptrs.update(ALIBI="*fp32", OUT="*fp32" if consts["SPLIT"] else f"*{dt}", LSE="*fp32")
    return _compile(attention_split_kernel, ptrs, consts, ("qk_scale", "softcap_log2"), num_warps, num_stages)


# The Gluon decode kernel (`gluon_decode.py`) as `launch.gluon_launch_plan` plans it: contiguous
# (ONE_PAGE, one TMA box per tile) and paged caches (one box per 16-slot page).
GLUON_VARIANTS: dict[str, dict[str, Any]] = {
    "gluon-decode-d128-split": dict(GROUP=4, HEAD_DIM=128, BLOCK_N=64, BOX_N=64, STAGES=3, SPLIT=True, ONE_PAGE=True),
    "gluon-decode-d64": dict(GROUP=3, HEAD_DIM=64, BLOCK_N=128, BOX_N=128, STAGES=2, SPLIT=False, ONE_PAGE=True),
    "gluon-decode-mha-batch-1": dict(GROUP=1, HEAD_DIM=128, BLOCK_N=64, BOX_N=64, STAGES=3, SPLIT=False, ONE_PAGE=True,
                                     num_pages=1),
    "gluon-decode-mqa": dict(GROUP=32, BLOCK_M=32, HEAD_DIM=128, BLOCK_N=64, BOX_N=64, STAGES=4, SPLIT=True,
                             ONE_PAGE=True),
    # A paged cache of 16-slot pages: one TMA box per page.
    "gluon-decode-page16-split": dict(GROUP=4, HEAD_DIM=128, BLOCK_N=64, BOX_N=16, STAGES=3, SPLIT=True,
                                      ONE_PAGE=False),
    "gluon-decode-page16-d64": dict(GROUP=3, HEAD_DIM=64, BLOCK_N=128, BOX_N=16, STAGES=2, SPLIT=False,
                                    ONE_PAGE=False),
    "gluon-decode-pdl": dict(GROUP=4, HEAD_DIM=128, BLOCK_N=64, BOX_N=16, STAGES=3, SPLIT=True, ONE_PAGE=False,
                             USE_PDL=True),
    "gluon-decode-page16-mqa": dict(GROUP=32, BLOCK_M=32, HEAD_DIM=128, BLOCK_N=64, BOX_N=16, STAGES=4, SPLIT=True,
                                    ONE_PAGE=False),
}


def gluon_variant(**kw: Any) -> Any:
    """Compile `gluon_decode_kernel` (bf16) with the constants ``kw``; its K/V descriptors get the
    shared layout and box the launcher gives them."""
    from triton.experimental.gluon.language import NVMMASharedLayout, bfloat16

    from flashdecode.attention.kernels.gluon_decode import LOAD_PARTITION_REGS, MAX_REGISTERS, gluon_decode_kernel

    consts: dict[str, Any] = dict(BLOCK_M=16, stride_od=1, USE_PDL=False, LOAD_REGS=LOAD_PARTITION_REGS)
    consts.update(kw)
    layout = NVMMASharedLayout.get_default_for([consts["BLOCK_N"], consts["HEAD_DIM"]], bfloat16)
    desc = f"tensordesc<bf16[{consts['BOX_N']},{consts['HEAD_DIM']}],{layout!r}>"
    ptrs = dict(Q="*bf16", K_DESC=desc, V_DESC=desc, CACHE_SEQLENS="*i32", CACHE_LEFTPAD="*i32", BLOCK_TABLE="*i32",
                OUT="*fp32" if consts["SPLIT"] else "*bf16", LSE="*fp32")
    return _compile(gluon_decode_kernel, ptrs, consts, ("qk_scale",), gluon=True, maxnreg=MAX_REGISTERS)


def main() -> int:
    from flashdecode.attention.kernels.append import append_kv_kernel
    from flashdecode.attention.kernels.combine import combine_splits_kernel
    from flashdecode.attention.kernels.merge_states import merge_states_kernel
    from flashdecode.attention.kernels.value_checks import value_checks_kernel
    from flashdecode.models.kernels.gemv import gemv_kernel

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    jobs: dict[str, Any] = {name: (lambda kw=kw: attention_variant(**dict(kw))) for name, kw in ATTENTION_VARIANTS.items()}
    append_ptrs = {n: "*bf16" for n in ("K_NEW", "V_NEW", "K_CACHE", "V_CACHE", "COS", "SIN")}
    append_ptrs.update({n: "*i32" for n in ("BLOCK_TABLE", "CACHE_SEQLENS", "CU_SEQLENS_K_NEW", "ROTARY_SEQLENS")})
    jobs["append-rotary"] = lambda: _compile(append_kv_kernel, append_ptrs, dict(
        HEAD_DIM=128, HEAD_DIM_P2=128, BLOCK_T=16, ROTARY_DIM=64, INTERLEAVED=True))
    jobs["combine"] = lambda: _compile(combine_splits_kernel, dict(O_PART="*fp32", LSE_PART="*fp32", OUT="*bf16", LSE="*fp32"),
                                       dict(HEAD_DIM=128, HEAD_DIM_P2=128, SPLITS_P2=16, SPLIT_CHUNK=16, stride_od=1))
    jobs["combine-64-splits"] = lambda: _compile(
        combine_splits_kernel, dict(O_PART="*fp32", LSE_PART="*fp32", OUT="*bf16", LSE="*fp32"),
        dict(HEAD_DIM=128, HEAD_DIM_P2=128, SPLITS_P2=64, SPLIT_CHUNK=64, stride_od=1))
    jobs["combine-chunked"] = lambda: _compile(
        combine_splits_kernel, dict(O_PART="*fp32", LSE_PART="*fp32", OUT="*bf16", LSE="*fp32"),
        dict(HEAD_DIM=128, HEAD_DIM_P2=128, SPLITS_P2=128, SPLIT_CHUNK=64, stride_od=1))
    jobs["combine-pdl"] = lambda: _compile(combine_splits_kernel, dict(O_PART="*fp32", LSE_PART="*fp32", OUT="*bf16",
                                                                       LSE="*fp32"),
                                           dict(HEAD_DIM=128, HEAD_DIM_P2=128, SPLITS_P2=16, SPLIT_CHUNK=16, stride_od=1,
                                                USE_PDL=True))
    jobs["merge"] = lambda: _compile(merge_states_kernel, dict(OUT_A="*bf16", OUT_B="*bf16", OUT="*bf16", LSE_A="*fp32",
                                                                LSE_B="*fp32", LSE="*fp32"),
                                     dict(HEAD_DIM=128, HEAD_DIM_P2=128, BLOCK_H=32))
    check_ptrs = {n: "*i32" for n in ("FLAGS", "SEQLENS", "CU_Q", "CU_K", "LEFTPAD", "BATCH_IDX", "TABLE",
                                      "ROTARY_SEQLENS")}
    check_flags = ("HAS_LEFTPAD", "HAS_BATCH_IDX", "PAGED", "CHECK_CU_Q", "CHECK_CU_K", "CHECK_MAX_Q", "HAS_ROTARY",
                   "ROTARY_ALL_QUERIES")
    jobs["value-checks"] = lambda: _compile(value_checks_kernel, check_ptrs, dict(
        dict.fromkeys(check_flags, True), NUM_FLAGS=16, BLOCK_B=128, BLOCK_W=32))
    gemv_ptrs = {n: "*bf16" for n in ("X", "RESIDUAL", "NORM_W", "W", "BIAS", "Y", "RESIDUAL_OUT")}
    for name, consts, warps in (
        ("gemv-add-norm-small", dict(PROLOGUE=2, BLOCK_N=4, BLOCK_K=1024, K_TILES=1), 4),
        ("gemv-silu-small", dict(PROLOGUE=3, BLOCK_N=4, BLOCK_K=2048, K_TILES=1), 4),
        ("gemv-add-norm-wide", dict(PROLOGUE=2, BLOCK_N=4, BLOCK_K=4096, K_TILES=1), 4),
        ("gemv-silu-long", dict(PROLOGUE=3, BLOCK_N=16, BLOCK_K=1024, K_TILES=14), 16),
    ):
        jobs[name] = lambda c=consts, w=warps: _compile(gemv_kernel, gemv_ptrs, dict(c, HAS_BIAS=False, USE_PDL=True),
                                                        ("eps",), w)
    import triton

    from flashdecode.attention.kernels.constants import GLUON_TRITON_VERSIONS

    gluon_ok = triton.__version__.startswith(GLUON_TRITON_VERSIONS)
    for name, kw in GLUON_VARIANTS.items():
        jobs[name] = (lambda kw=kw: gluon_variant(**dict(kw))) if gluon_ok else None
    only = sys.argv[1:]
    failed = 0
    for name, job in jobs.items():
        if only and name not in only:
            continue
        if job is None:
            print(f"skip  {name:24s} written for Triton {' / '.join(GLUON_TRITON_VERSIONS)}x, not {triton.__version__}",
                  flush=True)
            continue
        try:
            print(f"ok    {name:24s} {_summary(job())}", flush=True)
        except Exception as exc:  # report every variant, then fail
            failed += 1
            print(f"FAIL  {name:24s} {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
