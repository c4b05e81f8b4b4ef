"""`merge_attention_states`: combine two attention results computed over disjoint key sets.

Attention over keys ``A ∪ B`` equals the two partial results weighted by their softmax mass:
``out = (e^{lse_a} out_a + e^{lse_b} out_b) / (e^{lse_a} + e^{lse_b})`` and
``lse = log(e^{lse_a} + e^{lse_b})``. This lets a caller attend over a shared prefix cache and a
per-request suffix cache separately (e.g. two `flash_attn_with_kvcache` calls with
``return_softmax_lse=True``) and merge. An LSE of +inf (the op's "no visible key") or -inf marks
an empty side; when both sides are empty the result is 0 with LSE +inf, as the op returns.
"""

from __future__ import annotations

import torch

from flashdecode.cuda_device import launch_on

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(out_a: object, lse_a: object, out_b: object, lse_b: object) -> None:
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    assert isinstance(out_a, torch.Tensor) and isinstance(out_b, torch.Tensor)
    assert isinstance(lse_a, torch.Tensor) and isinstance(lse_b, torch.Tensor)
    if out_a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_a must be float16, bfloat16 or float32, got {out_a.dtype}")
    if out_b.dtype != out_a.dtype:
        raise TypeError(f"out_b must have out_a's dtype {out_a.dtype}, got {out_b.dtype}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    if out_a.dim() not in (3, 4):
        raise ValueError(f"out_a must be (batch, seqlen, heads, head_dim) or (total, heads, head_dim), got shape {tuple(out_a.shape)}")
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b must have out_a's shape {tuple(out_a.shape)}, got {tuple(out_b.shape)}")
    if out_a.dim() == 4:
        b, s, h, _ = out_a.shape
        want = (b, h, s)
    else:
        t_, h, _ = out_a.shape
        want = (h, t_)
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want} to match out_a {tuple(out_a.shape)}, got {tuple(t.shape)}")
    for name, t in (("out_b", out_b), ("lse_a", lse_a), ("lse_b", lse_b)):
        if t.device != out_a.device:
            raise ValueError(f"{name} must be on out_a's device {out_a.device}, got {t.device}")


def _use_triton(device: torch.device) -> bool:
    """Same dispatch as the op (FLASHDECODE_BACKEND, read on every call)."""
    from flashdecode.attention.interface import selected_backend

    return selected_backend(device) == "triton"


def _merge_torch(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    # Bring lse to the output layout: (..., seqlen, heads).
    la = (lse_a.transpose(-1, -2)).to(torch.float32)
    lb = (lse_b.transpose(-1, -2)).to(torch.float32)
    la = torch.where(la == float("inf"), float("-inf"), la)
    lb = torch.where(lb == float("inf"), float("-inf"), lb)
    m = torch.maximum(la, lb)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    denom = wa + wb
    has = denom > 0
    acc = torch.where((wa > 0)[..., None], wa[..., None] * out_a.float(), 0.0)
    acc = acc + torch.where((wb > 0)[..., None], wb[..., None] * out_b.float(), 0.0)
    safe = torch.where(has, denom, torch.ones_like(denom))
    out = (acc / safe[..., None]).to(out_a.dtype)
    lse = torch.where(has, m + torch.log(safe), float("inf"))
    return out, lse.transpose(-1, -2).contiguous()


def _merge_triton(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    import triton

    from flashdecode.attention import heuristics
    from flashdecode.attention.kernels.merge_states import merge_states_kernel

    packed = out_a.dim() == 3
    out = torch.empty_like(out_a, memory_format=torch.contiguous_format)
    lse = torch.empty(lse_a.shape, device=lse_a.device, dtype=torch.float32)
    # View the packed layout as batch 1: out (1, T, H, D), lse (1, H, T).
    oa, ob, o = (x.unsqueeze(0) if packed else x for x in (out_a, out_b, out))
    la, lb, lo = (x.unsqueeze(0) if packed else x for x in (lse_a, lse_b, lse))
    batch, seqlen, heads, head_dim = o.shape
    if batch * seqlen == 0 or heads == 0:
        return out, lse
    block_h = heuristics.combine_block_h(heads, head_dim)
    grid = (batch * seqlen, triton.cdiv(heads, block_h))
    merge_states_kernel[grid](
        oa, la, ob, lb, o, lo, seqlen, heads,
        *oa.stride(), *ob.stride(), *o.stride(),
        *la.stride(), *lb.stride(), *lo.stride(),
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=heuristics.padded_head_dim(head_dim),
        BLOCK_H=block_h,
        num_warps=4,
    )
    return out, lse


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention outputs over two disjoint key sets into attention over their union.

    Layouts (as returned by `flash_attn_with_kvcache(..., return_softmax_lse=True)`):
    ``out (B, Sq, H, D)`` with ``lse (B, H, Sq)``, or packed ``out (T, H, D)`` with ``lse (H, T)``.
    ``lse`` is float32, natural log; +inf (or -inf) marks a row whose side saw no key.
    Returns ``(out, lse)``: ``out`` in the inputs' dtype, ``lse`` float32, same layouts.
    """
    _check(out_a, lse_a, out_b, lse_b)
    if _use_triton(out_a.device):
        with launch_on(out_a.device):
            return _merge_triton(out_a, lse_a, out_b, lse_b)
    return _merge_torch(out_a, lse_a, out_b, lse_b)
