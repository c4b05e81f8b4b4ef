"""Pure-PyTorch implementation of the whole contract: the CPU path and the fallback of any device.

It takes a `PackedProblem` (see problem.py), appends the new keys/values into the pages, then
computes attention one sequence at a time with dense fp32 math. Readability wins over speed
here; the per-sequence loop reads lengths on the host, which is free on the CPU.
"""

from __future__ import annotations

import torch

from flashdecode.attention.problem import PackedProblem


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` channels of ``x`` (n, heads, D); fp32 math, x's dtype out.

    ``cos``/``sin`` are ``(n, rotary_dim / 2)``: one row per token of ``x``.
    """
    half = cos.shape[-1]
    rot = 2 * half
    xf = x.float()
    c = cos.float()[:, None, :]
    s = sin.float()[:, None, :]
    if interleaved:
        x1, x2 = xf[..., 0:rot:2], xf[..., 1:rot:2]
        r1, r2 = x1 * c - x2 * s, x1 * s + x2 * c
        rotated = torch.stack((r1, r2), dim=-1).flatten(-2)
    else:
        x1, x2 = xf[..., :half], xf[..., half:rot]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated, xf[..., rot:]), dim=-1).to(x.dtype)


def _slot_address(p: PackedProblem, b: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Page ids, in-page offsets and validity of logical `slots` of sequence `b`.

    A slot past the block table or on a page outside the pool is invalid: it is neither written
    nor read (the value checks refuse such calls unless they were switched off).
    """
    table = p.block_table[b].long()
    index = slots // p.page_size
    in_table = index < table.shape[0]
    pages = table[index.clamp(max=table.shape[0] - 1)]
    valid = (slots >= 0) & in_table & (pages >= 0) & (pages < p.k_pages.shape[0])
    return pages.clamp(0, p.k_pages.shape[0] - 1), slots % p.page_size, valid


def _append(p: PackedProblem, b: int, cache_len: int, new_start: int, new_end: int, rotary_start: int) -> None:
    n = new_end - new_start
    if n == 0:
        return
    k_new = p.k_new[new_start:new_end]
    if p.rotary_cos is not None:
        rows = torch.arange(rotary_start, rotary_start + n, device=k_new.device)
        k_new = apply_rotary(k_new, p.rotary_cos[rows], p.rotary_sin[rows], p.rotary_interleaved)
    slots = torch.arange(cache_len, cache_len + n, device=k_new.device)
    pages, offsets, valid = _slot_address(p, b, slots)
    p.k_pages[pages[valid], offsets[valid]] = k_new[valid]
    p.v_pages[pages[valid], offsets[valid]] = p.v_new[new_start:new_end][valid]


def _attend_one(
    p: PackedProblem, b: int, q: torch.Tensor, leftpad: int, end: int, rotary_start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence's queries `q` (Sq, H, D) over its slots [leftpad, end)."""
    sq, num_heads, _ = q.shape
    num_kv_heads = p.k_pages.shape[2]
    if p.rotary_cos is not None:
        if p.causal or p.local:
            rows = torch.arange(rotary_start, rotary_start + sq, device=q.device)
        else:
            rows = torch.full((sq,), rotary_start, device=q.device)
        q = apply_rotary(q, p.rotary_cos[rows], p.rotary_sin[rows], p.rotary_interleaved)

    slots = torch.arange(leftpad, end, device=q.device)
    pages, offsets, valid = _slot_address(p, b, slots)
    group = num_heads // num_kv_heads
    keys = p.k_pages[pages, offsets].float().repeat_interleave(group, dim=1)  # (Sk, H, D)
    values = p.v_pages[pages, offsets].float().repeat_interleave(group, dim=1)

    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * p.softmax_scale
    if p.softcap > 0:
        scores = p.softcap * torch.tanh(scores / p.softcap)

    sk = end - leftpad
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    diagonal = i + sk - sq  # the key aligned with query i (bottom-right alignment)
    if p.alibi_slopes is not None:
        distance = (diagonal - j).abs().float()
        scores = scores - p.alibi_slopes[b].float()[:, None, None] * distance
    visible = valid[None, :].expand(sq, sk).clone()
    if p.window_right >= 0:
        visible &= j <= diagonal + p.window_right
    if p.window_left >= 0:
        visible &= j >= diagonal - p.window_left
    scores = scores.masked_fill(~visible, float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)  # (H, Sq); -inf for rows with no visible key
    weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", weights, values)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    return out, lse


def reference_forward(p: PackedProblem, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Append new keys/values into the pages, then write `out` (total_q, H, D) and `lse` (H, total_q)."""
    cu_q = p.cu_seqlens_q.tolist()
    cu_k = p.cu_seqlens_k_new.tolist()
    seqlens = p.cache_seqlens.tolist()
    leftpads = p.cache_leftpad.tolist()
    rotary_starts = p.rotary_seqlens.tolist()
    for b in range(p.batch):
        if p.k_new is not None:
            _append(p, b, seqlens[b], cu_k[b], cu_k[b + 1], rotary_starts[b])
    for b in range(p.batch):
        q_start, q_end = cu_q[b], cu_q[b + 1]
        if q_end == q_start:
            continue
        end = seqlens[b] + cu_k[b + 1] - cu_k[b]
        o, l = _attend_one(p, b, p.q[q_start:q_end], leftpads[b], end, rotary_starts[b])
        out[q_start:q_end] = o.to(out.dtype)
        lse[:, q_start:q_end] = l
