"""Independent float64 brute force for `flash_attn_with_kvcache`, written from the op contract.

Nothing here imports flashdecode. Everything is an explicit Python loop over sequence, query
position, head and key slot, with explicit masks; only dot products over the head dimension are
vectorised (numpy float64). It is slow on purpose: keep shapes tiny.

Contract points implemented (issue "the op contract"):
* caches contiguous ``(B_cache, S_cache, Hk, D)`` or paged ``(num_blocks, page_size, Hk, D)``;
  logical slot t of sequence b lives at ``block_table[row, t // page_size]``, offset
  ``t % page_size``, with ``row = cache_batch_idx[b]`` when given, else ``b``;
* ``cache_seqlens`` int / (B,) tensor / None (= full capacity) is the absolute end of the existing
  cache; ``cache_leftpad`` its start; valid keys are slots ``[leftpad, seqlens + S_new)``;
* new k/v (padded ``(B, S_new, Hk, D)`` or packed with ``cu_seqlens_k_new``) go to slots
  ``seqlens + j``; k after rotary, v exact;
* rotary: new key j at table row ``(rotary_seqlens or cache_seqlens)[b] + j``; query i at
  ``(rotary_seqlens or cache_seqlens)[b] + i`` when causal or windowed, else at the base alone
  (FlashAttention 3 uses the rotary base for the queries too); interleaved pairs (2m, 2m+1),
  else (m, m + rd/2); channels past rotary_dim pass through;
* GQA: query head h reads KV head ``h // (H // Hk)``;
* score = scale * q.k, then softcap ``c * tanh(s / c)``, then ALiBi ``-slope * |i + Sk - Sq - j|``,
  then masks: visible iff ``j >= i + Sk - Sq - left`` (left >= 0) and ``j <= i + Sk - Sq + right``
  (right >= 0; right = 0 when causal), with j counted from leftpad and Sk = seqlens + S_new - leftpad;
* a row with no visible key: out 0, lse +inf; lse is the natural log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class OracleResult:
    out: torch.Tensor  # float64; (B, Sq, H, D), or (total_q, H, D) with cu_seqlens_q
    lse: torch.Tensor  # float64; (B, H, Sq), or (H, total_q) with cu_seqlens_q; +inf for empty rows
    k_cache: torch.Tensor  # float64 expected k cache after the append (new keys rotated, unrounded)
    v_cache: torch.Tensor  # expected v cache after the append, in v_cache's dtype (bit exact)
    written: torch.Tensor  # bool (cache.shape[0], cache.shape[1]): slots the append writes
    seq_rows: list  # per sequence, the list of (page_or_row, offset) of its valid key slots


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").to(torch.float64).numpy()


def _ints(t) -> list:
    return [int(x) for x in t.detach().to("cpu").reshape(-1).tolist()]


def _rotate(x: np.ndarray, cos_row: np.ndarray, sin_row: np.ndarray, rd: int, interleaved: bool) -> np.ndarray:
    y = x.copy()
    half = rd // 2
    for m in range(half):
        if interleaved:
            a, b = 2 * m, 2 * m + 1
        else:
            a, b = m, m + half
        c, s = cos_row[m], sin_row[m]
        y[a] = x[a] * c - x[b] * s
        y[b] = x[a] * s + x[b] * c
    return y


def oracle(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    *,
    cu_seqlens_q=None,
    max_seqlen_q=None,
    cu_seqlens_k_new=None,
    rotary_seqlens=None,
) -> OracleResult:
    del max_seqlen_q  # a sizing hint only
    Q = _f64(q)
    KC = _f64(k_cache)

    # ---- query layout ------------------------------------------------------------------------
    if cu_seqlens_q is not None:
        cuq = _ints(cu_seqlens_q)
        B = len(cuq) - 1
        _, H, D = q.shape
        sq = [cuq[b + 1] - cuq[b] for b in range(B)]

        def qvec(b, i, h):
            return Q[cuq[b] + i, h]

    else:
        B, Sq_pad, H, D = q.shape
        sq = [Sq_pad] * B

        def qvec(b, i, h):
            return Q[b, i, h]

    # ---- cache layout ------------------------------------------------------------------------
    Hk = k_cache.shape[2]
    group = H // Hk
    if block_table is not None:
        BT = [_ints(r) for r in block_table.detach().cpu()]
        page = k_cache.shape[1]
        capacity = len(BT[0]) * page

        def loc(row, t):
            return BT[row][t // page], t % page

    else:
        capacity = k_cache.shape[1]

        def loc(row, t):
            return row, t

    rows = _ints(cache_batch_idx) if cache_batch_idx is not None else list(range(B))
    if cache_seqlens is None:
        L = [capacity] * B
    elif isinstance(cache_seqlens, int):
        L = [cache_seqlens] * B
    else:
        L = _ints(cache_seqlens)
    lp = _ints(cache_leftpad) if cache_leftpad is not None else [0] * B

    # ---- new keys ----------------------------------------------------------------------------
    if k is None:
        n = [0] * B
        KN = VN = None
    else:
        KN = _f64(k)
        VN = v  # kept in its own dtype: v is stored bit exact
        if cu_seqlens_k_new is not None:
            cuk = _ints(cu_seqlens_k_new)
            n = [cuk[b + 1] - cuk[b] for b in range(B)]

            def new_index(b, j):
                return (cuk[b] + j,)

        else:
            n = [k.shape[1]] * B

            def new_index(b, j):
                return (b, j)

    # ---- rotary ------------------------------------------------------------------------------
    rd = 0 if rotary_cos is None else 2 * rotary_cos.shape[1]
    if rd:
        COS = _f64(rotary_cos)
        SIN = _f64(rotary_sin)
    rbase = _ints(rotary_seqlens) if rotary_seqlens is not None else list(L)

    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    left, right = int(window_size[0]), int(window_size[1])
    per_position_q = causal or left >= 0 or right >= 0
    if causal:
        right = 0
    if alibi_slopes is not None:
        A = _f64(alibi_slopes)

        def slope(b, h):
            return A[h] if A.ndim == 1 else A[b, h]

    # ---- append: expected caches -------------------------------------------------------------
    exp_k = KC.copy()
    exp_v = v_cache.detach().to("cpu").clone()
    written = torch.zeros(k_cache.shape[0], k_cache.shape[1], dtype=torch.bool)
    for b in range(B):
        for j in range(n[b]):
            t = L[b] + j
            assert t < capacity, "test construction error: append beyond capacity"
            p, o = loc(rows[b], t)
            idx = new_index(b, j)
            for kh in range(Hk):
                kv = KN[idx + (kh,)]
                if rd:
                    pos = rbase[b] + j
                    kv = _rotate(kv, COS[pos], SIN[pos], rd, rotary_interleaved)
                exp_k[p, o, kh] = kv
                exp_v[p, o, kh] = VN[idx + (kh,)].detach().to("cpu")
            written[p, o] = True
    EV = exp_v.to(torch.float64).numpy()

    # ---- attention ---------------------------------------------------------------------------
    if cu_seqlens_q is not None:
        out = np.zeros((sum(sq), H, D))
        lse = np.full((H, sum(sq)), np.inf)
    else:
        out = np.zeros((B, sq[0] if B else 0, H, D))
        lse = np.full((B, H, sq[0] if B else 0), np.inf)

    seq_rows = []
    for b in range(B):
        Sk = L[b] + n[b] - lp[b]
        slots = [loc(rows[b], lp[b] + jj) for jj in range(Sk)]
        seq_rows.append(slots)
        Sq = sq[b]
        for i in range(Sq):
            diag = i + Sk - Sq
            for h in range(H):
                kh = h // group
                qv = qvec(b, i, h)
                if rd:
                    pos = rbase[b] + (i if per_position_q else 0)
                    qv = _rotate(qv, COS[pos], SIN[pos], rd, rotary_interleaved)
                scores = []
                keys = []
                for jj in range(Sk):
                    if left >= 0 and jj < diag - left:
                        continue
                    if right >= 0 and jj > diag + right:
                        continue
                    p, o = slots[jj]
                    s = scale * float(np.dot(qv, exp_k[p, o, kh]))
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if alibi_slopes is not None:
                        s -= slope(b, h) * abs(i + Sk - Sq - jj)
                    scores.append(s)
                    keys.append(jj)
                if not scores:
                    continue  # out stays 0, lse stays +inf
                m = max(scores)
                w = [math.exp(s - m) for s in scores]
                z = sum(w)
                acc = np.zeros(D)
                for wj, jj in zip(w, keys):
                    p, o = slots[jj]
                    acc += wj * EV[p, o, kh]
                if cu_seqlens_q is not None:
                    out[cuq[b] + i, h] = acc / z
                    lse[h, cuq[b] + i] = m + math.log(z)
                else:
                    out[b, i, h] = acc / z
                    lse[b, h, i] = m + math.log(z)

    return OracleResult(
        out=torch.from_numpy(out),
        lse=torch.from_numpy(lse),
        k_cache=torch.from_numpy(exp_k),
        v_cache=exp_v,
        written=written,
        seq_rows=seq_rows,
    )
