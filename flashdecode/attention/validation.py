"""Every check on the arguments of `flash_attn_with_kvcache`, run before anything is written.

Shape, dtype and device checks cost nothing. Checks on tensor *values* (lengths against the cache
capacity, block-table entries against the pool, ...) are read back with a single host sync: as
one kernel's failure counts on the Triton backend (`kernels/value_checks.py`), as one stacked
boolean tensor on the reference backend. They are skipped while a CUDA graph is being captured
or under `torch.compile` (the kernels still mask every write, so bad values cannot corrupt
memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class CallShape:
    """The sizes a validated call implies; the packing step reuses them."""

    batch: int
    seqlen_q: int  # Sq for padded queries; max_seqlen_q (or 0 = unknown) for varlen
    num_heads: int
    num_kv_heads: int
    head_dim: int
    paged: bool
    capacity: int  # slots per sequence: S_cache, or max_blocks * page_size
    varlen_q: bool
    seqlen_new: int  # S_new for padded k/v, total_new for packed, 0 without append


def _require_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_index_tensor(name: str, x: object, length: int, device: torch.device) -> None:
    t = _require_tensor(name, x)
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must have dtype torch.int32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _check_same(name: str, x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if x.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} (the dtype of q), got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} (the device of q), got {x.device}")


def value_checks_enabled(q: torch.Tensor) -> bool:
    """False where a host sync is impossible (graph capture) or unwanted (torch.compile tracing)."""
    if torch.compiler.is_compiling():
        return False
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def validate_call(
    q,
    k_cache,
    v_cache,
    k,
    v,
    rotary_cos,
    rotary_sin,
    cache_seqlens,
    cache_batch_idx,
    cache_leftpad,
    block_table,
    softmax_scale,
    causal,
    window_size,
    softcap,
    rotary_interleaved,
    alibi_slopes,
    num_splits,
    return_softmax_lse,
    cu_seqlens_q,
    max_seqlen_q,
    cu_seqlens_k_new,
    rotary_seqlens,
) -> CallShape:
    """Raise ValueError/TypeError naming the first bad argument; return the call's sizes."""
    q = _require_tensor("q", q)
    k_cache = _require_tensor("k_cache", k_cache)
    v_cache = _require_tensor("v_cache", v_cache)
    dtype, device = q.dtype, q.device
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {dtype}")

    # ---- queries -------------------------------------------------------------------------
    varlen_q = cu_seqlens_q is not None
    if varlen_q:
        if q.dim() != 3:
            raise ValueError(f"q must be (total_q, H, D) with cu_seqlens_q, got shape {tuple(q.shape)}")
        cu = _require_tensor("cu_seqlens_q", cu_seqlens_q)
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"cu_seqlens_q must be an int32 tensor of shape (B + 1,), got {cu.dtype} {tuple(cu.shape)}")
        if cu.device != device:
            raise ValueError(f"cu_seqlens_q must be on {device}, got {cu.device}")
        batch = cu.shape[0] - 1
        if max_seqlen_q is not None and (not isinstance(max_seqlen_q, int) or isinstance(max_seqlen_q, bool)):
            raise TypeError(f"max_seqlen_q must be an int, got {type(max_seqlen_q).__name__}")
        if max_seqlen_q is not None and max_seqlen_q < 0:
            raise ValueError(f"max_seqlen_q must be >= 0, got {max_seqlen_q}")
        seqlen_q = max_seqlen_q or 0
        _, num_heads, head_dim = q.shape
    else:
        if q.dim() != 4:
            raise ValueError(f"q must be a 4-D tensor (B, Sq, H, D), got shape {tuple(q.shape)}")
        if max_seqlen_q is not None:
            raise ValueError("max_seqlen_q is only meaningful together with cu_seqlens_q")
        batch, seqlen_q, num_heads, head_dim = q.shape
    if batch < 1:
        raise ValueError("q must hold at least one sequence (batch size 0)")
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")

    # ---- caches --------------------------------------------------------------------------
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B_cache, S_cache, Hk, D) or (num_blocks, page_size, Hk, D), got {tuple(c.shape)}")
        _check_same(name, c, dtype, device)
        if c.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    cache_rows, page_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"k_cache head dim {cache_dim} does not match q head dim {head_dim}")
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"number of query heads ({num_heads}) must be a multiple of k_cache's KV heads ({num_kv_heads})")
    if cache_rows < 1 or page_size < 1:
        raise ValueError(f"k_cache must have at least one row/page and one slot, got {tuple(k_cache.shape)}")

    paged = block_table is not None
    if paged:
        bt = _require_tensor("block_table", block_table)
        if bt.dtype != torch.int32 or bt.dim() != 2:
            raise ValueError(f"block_table must be a 2-D int32 tensor, got {bt.dtype} {tuple(bt.shape)}")
        if bt.device != device:
            raise ValueError(f"block_table must be on {device}, got {bt.device}")
        if cache_batch_idx is None and bt.shape[0] != batch:
            raise ValueError(f"block_table must have {batch} rows (one per sequence), got {bt.shape[0]}")
        if bt.shape[1] < 1:
            raise ValueError("block_table must have at least one column")
        capacity = bt.shape[1] * page_size
    else:
        capacity = page_size
        if cache_batch_idx is None and cache_rows < batch:
            raise ValueError(f"k_cache has {cache_rows} rows but q has batch {batch}; pass cache_batch_idx to pick rows")

    if cache_batch_idx is not None:
        _check_index_tensor("cache_batch_idx", cache_batch_idx, batch, device)
    if cache_leftpad is not None:
        _check_index_tensor("cache_leftpad", cache_leftpad, batch, device)
    if cache_seqlens is not None and not isinstance(cache_seqlens, torch.Tensor):
        if not isinstance(cache_seqlens, int) or isinstance(cache_seqlens, bool):
            raise TypeError(f"cache_seqlens must be an int or an int32 tensor, got {type(cache_seqlens).__name__}")
        if cache_seqlens < 0 or cache_seqlens > capacity:
            raise ValueError(f"cache_seqlens={cache_seqlens} must be in [0, {capacity}] (the cache capacity)")
    elif cache_seqlens is not None:
        _check_index_tensor("cache_seqlens", cache_seqlens, batch, device)

    # ---- new keys / values ---------------------------------------------------------------
    seqlen_new = 0
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (got only one of them)")
    if k is not None:
        k = _require_tensor("k", k)
        v = _require_tensor("v", v)
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required when k and v are appended")
        _check_same("k", k, dtype, device)
        _check_same("v", v, dtype, device)
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if cu_seqlens_k_new is not None:
            if k.dim() != 3:
                raise ValueError(f"k must be (total_new, Hk, D) with cu_seqlens_k_new, got {tuple(k.shape)}")
            cuk = _require_tensor("cu_seqlens_k_new", cu_seqlens_k_new)
            if cuk.dtype != torch.int32 or cuk.dim() != 1 or cuk.shape[0] != batch + 1:
                raise ValueError(f"cu_seqlens_k_new must be an int32 tensor of shape ({batch + 1},), got {cuk.dtype} {tuple(cuk.shape)}")
            if cuk.device != device:
                raise ValueError(f"cu_seqlens_k_new must be on {device}, got {cuk.device}")
            seqlen_new = k.shape[0]
        else:
            if k.dim() != 4 or k.shape[0] != batch:
                raise ValueError(f"k must be (B={batch}, S_new, Hk, D), got {tuple(k.shape)}")
            seqlen_new = k.shape[1]
        if k.shape[-2] != num_kv_heads:
            raise ValueError(f"k has {k.shape[-2]} heads but k_cache has {num_kv_heads}")
        if k.shape[-1] != head_dim:
            raise ValueError(f"k head dim {k.shape[-1]} does not match q head dim {head_dim}")
        if cu_seqlens_k_new is None and seqlen_new > capacity:
            raise ValueError(f"k appends {seqlen_new} tokens, more than the cache capacity {capacity}")
        if isinstance(cache_seqlens, int) and cu_seqlens_k_new is None and cache_seqlens + seqlen_new > capacity:
            raise ValueError(
                f"appending k (S_new={seqlen_new}) at cache_seqlens={cache_seqlens} passes the cache capacity {capacity}"
            )
    elif cu_seqlens_k_new is not None:
        raise ValueError("cu_seqlens_k_new is only meaningful when k and v are given")

    # ---- rotary --------------------------------------------------------------------------
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need k and v (rotary is applied to appended keys)")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            t = _require_tensor(name, t)
            if t.dim() != 2:
                raise ValueError(f"{name} must be 2-D (seqlen_ro, rotary_dim / 2), got {tuple(t.shape)}")
            _check_same(name, t, dtype, device)
        if rotary_cos.shape != rotary_sin.shape:
            raise ValueError(f"rotary_cos and rotary_sin shapes differ: {tuple(rotary_cos.shape)} vs {tuple(rotary_sin.shape)}")
        rotary_dim = 2 * rotary_cos.shape[1]
        if rotary_dim < 2 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim (2 * rotary_cos.shape[1] = {rotary_dim}) must be in [2, head dim {head_dim}]")
        if rotary_seqlens is not None:
            _check_index_tensor("rotary_seqlens", rotary_seqlens, batch, device)
    elif rotary_seqlens is not None:
        raise ValueError("rotary_seqlens is only meaningful with rotary_cos/rotary_sin")

    # ---- scalars -------------------------------------------------------------------------
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    for side in window_size:
        if not isinstance(side, int) or isinstance(side, bool) or side < -1:
            raise ValueError(f"window_size entries must be ints >= -1, got {window_size!r}")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise ValueError(f"softcap must be a float >= 0, got {softcap!r}")
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    if alibi_slopes is not None:
        a = _require_tensor("alibi_slopes", alibi_slopes)
        if a.dtype != torch.float32:
            raise ValueError(f"alibi_slopes must be float32, got {a.dtype}")
        if tuple(a.shape) not in ((num_heads,), (batch, num_heads)):
            raise ValueError(f"alibi_slopes must have shape ({num_heads},) or ({batch}, {num_heads}), got {tuple(a.shape)}")
        if a.device != device:
            raise ValueError(f"alibi_slopes must be on {device}, got {a.device}")

    return CallShape(
        batch=batch,
        seqlen_q=seqlen_q,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        paged=paged,
        capacity=capacity,
        varlen_q=varlen_q,
        seqlen_new=seqlen_new,
    )


def validate_values(
    shape: CallShape,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    cache_batch_idx: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
    block_table: torch.Tensor | None,
    packed_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k_new: torch.Tensor | None,
    total_new: int,
    rotary_cos: torch.Tensor | None,
    rotary_seqlens: torch.Tensor,
    rotary_all_queries: bool,
    on_device: bool = False,
) -> None:
    """Checks that read tensor values, with one host sync in all; raises ValueError for the
    first that fails, in a fixed order.

    `cache_seqlens`, `cu_q` and `cu_k` are the per-sequence int32 tensors the packing step built
    (lengths, and offsets of the queries and of the appended keys). `packed_table` is the block
    table with its rows already picked by `cache_batch_idx` (the packing step built it), so it is
    not gathered twice. With rotary, each sequence needs rows up to rotary_seqlens[b] plus its
    appended keys, or plus its queries where ``rotary_all_queries`` (causal or local attention;
    else at most one query row). ``on_device``: count the failures in one kernel launch
    (`kernels.value_checks`, the Triton backend's way) instead of some 50-80 small PyTorch
    operations.
    """
    from flashdecode.attention.kernels import value_checks as vc  # noqa: PLC0415 (the check ids)

    rows_available = block_table.shape[0] if block_table is not None else k_cache.shape[0]
    checks: list[tuple[int, str]] = [
        (vc.SEQLENS_NEGATIVE, "cache_seqlens must be >= 0"),
        (vc.PAST_CAPACITY, f"cache_seqlens + the appended length of k passes the cache capacity ({shape.capacity})"),
    ]
    if cache_leftpad is not None:
        checks.append((vc.LEFTPAD, "cache_leftpad must be in [0, cache_seqlens]"))
    if cache_batch_idx is not None:
        rows_of = "block_table" if block_table is not None else "k_cache"
        checks.append((vc.BATCH_IDX, f"cache_batch_idx entries must be in [0, {rows_available}) (rows of {rows_of})"))
    if block_table is not None:
        checks.append((vc.TABLE, f"block_table entries must be in [0, {k_cache.shape[0]}) (pages of k_cache)"))
    if cu_seqlens_q is not None:
        checks.append((vc.CU_Q, f"cu_seqlens_q must start at 0, be non-decreasing and end at {q.shape[0]}"))
    if cu_seqlens_k_new is not None:
        checks.append((vc.CU_K, f"cu_seqlens_k_new must start at 0, be non-decreasing and end at {total_new}"))
    check_max_q = bool(shape.varlen_q and shape.seqlen_q and cu_seqlens_q is not None)
    if check_max_q:
        checks.append((vc.MAX_SEQLEN_Q, "max_seqlen_q is smaller than a sequence of cu_seqlens_q"))
    if rotary_cos is not None:
        rows = rotary_cos.shape[0]
        checks.append((vc.ROTARY, f"rotary_cos/rotary_sin have {rows} rows, fewer than the positions needed"))

    if on_device:
        counts = vc.failure_counts(
            cache_seqlens, cu_q, cu_k, cache_leftpad, cache_batch_idx,
            packed_table if block_table is not None else None,
            rotary_seqlens if rotary_cos is not None else None,
            capacity=shape.capacity, rows_available=rows_available, num_pages=k_cache.shape[0],
            page_size=k_cache.shape[1], total_q=q.shape[0], total_new=total_new,
            check_cu_q=cu_seqlens_q is not None, check_cu_k=cu_seqlens_k_new is not None,
            max_seqlen_q=shape.seqlen_q if check_max_q else None,
            rotary_rows=0 if rotary_cos is None else rotary_cos.shape[0], rotary_all_queries=rotary_all_queries,
        )
        failed = [counts[i] > 0 for i, _ in checks]
    else:
        ok = _value_conditions({i for i, _ in checks}, k_cache, cache_seqlens, cu_q, cu_k, cache_batch_idx,
                               cache_leftpad, packed_table, cu_seqlens_q, cu_seqlens_k_new, rotary_seqlens,
                               rotary_all_queries,
                               capacity=shape.capacity, rows_available=rows_available, total_q=q.shape[0],
                               total_new=total_new, max_seqlen_q=shape.seqlen_q,
                               rotary_rows=0 if rotary_cos is None else rotary_cos.shape[0])
        flags = torch.stack([ok[i] for i, _ in checks]).tolist()  # the one host sync
        failed = [not f for f in flags]
    for (_, message), bad in zip(checks, failed):
        if bad:
            raise ValueError(message)


def _value_conditions(wanted: set[int], k_cache, cache_seqlens, cu_q, cu_k, cache_batch_idx, cache_leftpad,
                      packed_table, cu_seqlens_q, cu_seqlens_k_new, rotary_seqlens, rotary_all_queries, *, capacity,
                      rows_available, total_q, total_new, max_seqlen_q, rotary_rows) -> dict[int, torch.Tensor]:
    """The checks of `validate_values` whose ids are in ``wanted``, as PyTorch expressions: check
    id -> a boolean scalar tensor, True where the check passes."""
    from flashdecode.attention.kernels import value_checks as vc  # noqa: PLC0415

    new_lens = (cu_k[1:] - cu_k[:-1]).long()
    q_lens = (cu_q[1:] - cu_q[:-1]).long()
    end = cache_seqlens.long() + new_lens
    ok = {vc.SEQLENS_NEGATIVE: (cache_seqlens >= 0).all(), vc.PAST_CAPACITY: (end <= capacity).all()}
    if vc.LEFTPAD in wanted:
        ok[vc.LEFTPAD] = ((cache_leftpad >= 0) & (cache_leftpad <= cache_seqlens)).all()
    if vc.BATCH_IDX in wanted:
        ok[vc.BATCH_IDX] = ((cache_batch_idx >= 0) & (cache_batch_idx < rows_available)).all()
    if vc.TABLE in wanted:
        page_size = k_cache.shape[1]
        needed_pages = (end + page_size - 1) // page_size  # pages holding slots [0, end)
        cols = torch.arange(packed_table.shape[1], device=packed_table.device)
        used = cols[None, :] < needed_pages[:, None]
        in_pool = (packed_table >= 0) & (packed_table < k_cache.shape[0])
        ok[vc.TABLE] = (in_pool | ~used).all()
    for cid, cu, total in ((vc.CU_Q, cu_seqlens_q, total_q), (vc.CU_K, cu_seqlens_k_new, total_new)):
        if cid in wanted:
            ok[cid] = (cu[0] == 0) & (cu[-1] == total) & (cu[1:] >= cu[:-1]).all()
    if vc.MAX_SEQLEN_Q in wanted:
        ok[vc.MAX_SEQLEN_Q] = (q_lens <= max_seqlen_q).all()
    if vc.ROTARY in wanted:
        q_span = q_lens if rotary_all_queries else q_lens.clamp(max=1)
        need = rotary_seqlens.long() + torch.maximum(new_lens, q_span)
        ok[vc.ROTARY] = ((need <= rotary_rows) & (rotary_seqlens >= 0)).all()
    return ok
