"""The public op: `flash_attn_with_kvcache`, a drop-in for FlashAttention's function of that name.

Flow of one call: validate every argument (`validation.py`), rewrite the call into one
`PackedProblem` (`pack_problem`), then run it on a backend:

* ``reference`` — pure PyTorch (`reference.py`), the path of CPU tensors;
* ``triton`` — the Triton kernels (`kernels/launch.py`), the path of CUDA tensors; CPU tensors
  take it too when ``TRITON_INTERPRET=1`` is set (that is how CI tests the kernel source).

``FLASHDECODE_BACKEND`` (``auto``, ``reference`` or ``triton``) is read on every call.
The op is registered with ``torch.library`` as ``flashdecode::fwd_kvcache`` so `torch.compile`
sees it as one opaque op that mutates ``k_cache`` and ``v_cache``.
"""

from __future__ import annotations

import os

import torch

from flashdecode.attention.problem import PackedProblem
from flashdecode.attention.ramps import offsets, ramp
from flashdecode.attention.reference import reference_forward
from flashdecode.attention.validation import CallShape, validate_call, validate_values, value_checks_enabled
from flashdecode.cuda_device import launch_on

BACKENDS = ("auto", "reference", "triton")


def selected_backend(device: torch.device) -> str:
    """The backend a call on `device` takes, from FLASHDECODE_BACKEND (read on every call)."""
    choice = os.environ.get("FLASHDECODE_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"FLASHDECODE_BACKEND must be one of {', '.join(BACKENDS)}; got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("FLASHDECODE_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)")
    return choice


def _per_sequence(value: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.full((batch,), value, dtype=torch.int32, device=device)


def pack_problem(
    shape: CallShape,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    rotary_cos: torch.Tensor | None,
    rotary_sin: torch.Tensor | None,
    cache_seqlens: torch.Tensor | int | None,
    cache_batch_idx: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
    block_table: torch.Tensor | None,
    softmax_scale: float | None,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    rotary_interleaved: bool,
    alibi_slopes: torch.Tensor | None,
    num_splits: int,
    cu_seqlens_q: torch.Tensor | None,
    max_seqlen_q: int | None,
    cu_seqlens_k_new: torch.Tensor | None,
    rotary_seqlens: torch.Tensor | None,
    check_values: bool,
    checks_on_device: bool = False,
) -> PackedProblem:
    """Rewrite a validated call into the single layout both backends take (see problem.py).
    ``check_values``: run `validate_values` (one host sync), in one kernel launch where
    ``checks_on_device`` (the Triton backend)."""
    batch, device = shape.batch, q.device

    if shape.varlen_q:
        q_packed = q
        cu_q = cu_seqlens_q
        if max_seqlen_q is None:
            # Only the grid needs it; computing it costs a host sync, so callers should pass it.
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    else:
        q_packed = q.reshape(batch * shape.seqlen_q, shape.num_heads, shape.head_dim)
        cu_q = offsets(batch, shape.seqlen_q, device)
        max_seqlen_q = shape.seqlen_q
    if q_packed.stride(-1) != 1:
        q_packed = q_packed.contiguous()

    if k is not None:
        if cu_seqlens_k_new is not None:
            k_new, v_new, cu_k = k, v, cu_seqlens_k_new
        else:
            k_new = k.reshape(batch * shape.seqlen_new, shape.num_kv_heads, shape.head_dim)
            v_new = v.reshape(batch * shape.seqlen_new, shape.num_kv_heads, shape.head_dim)
            cu_k = offsets(batch, shape.seqlen_new, device)
        k_new = k_new if k_new.stride(-1) == 1 else k_new.contiguous()
        v_new = v_new if v_new.stride(-1) == 1 else v_new.contiguous()
        max_new = shape.seqlen_new  # an upper bound for packed k (its total length): no sync
    else:
        k_new = v_new = None
        cu_k = offsets(batch, 0, device)
        max_new = 0

    seqlens = _per_sequence(shape.capacity if cache_seqlens is None else cache_seqlens, batch, device)
    leftpad = cache_leftpad if cache_leftpad is not None else ramp(batch, 0, device)

    if shape.paged:
        table = block_table
        if cache_batch_idx is not None:
            rows = cache_batch_idx.long().clamp(0, block_table.shape[0] - 1)
            table = block_table.index_select(0, rows)
    else:
        rows = cache_batch_idx if cache_batch_idx is not None else ramp(batch, 1, device)
        table = rows.to(torch.int32).reshape(batch, 1)
    table = table.contiguous()

    rotary_rows = rotary_seqlens if rotary_seqlens is not None else seqlens
    local = window_size[0] >= 0 or window_size[1] >= 0
    window_right = 0 if causal else window_size[1]

    if check_values:
        validate_values(shape, q_packed, k_cache, seqlens, cu_q, cu_k, cache_batch_idx, cache_leftpad, block_table,
                        table, cu_seqlens_q, cu_seqlens_k_new, 0 if k_new is None else k_new.shape[0], rotary_cos,
                        rotary_rows, causal or local, on_device=checks_on_device)

    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.reshape(-1, shape.num_heads).expand(batch, shape.num_heads).contiguous()

    return PackedProblem(
        q=q_packed,
        k_pages=k_cache,
        v_pages=v_cache,
        block_table=table,
        cu_seqlens_q=cu_q,
        max_seqlen_q=int(max_seqlen_q),
        cache_seqlens=seqlens,
        cache_leftpad=leftpad,
        k_new=k_new,
        v_new=v_new,
        cu_seqlens_k_new=cu_k,
        max_seqlen_k_new=max_new,
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        rotary_interleaved=bool(rotary_interleaved),
        rotary_seqlens=rotary_rows,
        softmax_scale=float(shape.head_dim**-0.5 if softmax_scale is None else softmax_scale),
        causal=bool(causal),
        window_left=int(window_size[0]),
        window_right=int(window_right),
        softcap=float(softcap),
        alibi_slopes=slopes,
        num_splits=int(num_splits),
    )


def _run(problem: PackedProblem, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    total_q, num_heads, head_dim = problem.q.shape
    out = torch.empty((total_q, num_heads, head_dim), dtype=problem.q.dtype, device=problem.q.device)
    lse = torch.empty((num_heads, total_q), dtype=torch.float32, device=problem.q.device)
    if backend == "triton":
        from flashdecode.attention.kernels.launch import triton_forward

        triton_forward(problem, out, lse)
    else:
        reference_forward(problem, out, lse)
    return out, lse


# ---- torch.library registration --------------------------------------------------------------
# The registered op takes the raw (validated) arguments; packing happens inside so that
# torch.compile sees one op. Optional ints are encoded as -1 because the schema needs one type.


@torch.library.custom_op("flashdecode::fwd_kvcache", mutates_args=("k_cache", "v_cache"))
def _fwd_kvcache_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    rotary_cos: torch.Tensor | None,
    rotary_sin: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    cache_seqlens_int: int,
    cache_batch_idx: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
    block_table: torch.Tensor | None,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    rotary_interleaved: bool,
    alibi_slopes: torch.Tensor | None,
    num_splits: int,
    cu_seqlens_q: torch.Tensor | None,
    max_seqlen_q: int,
    cu_seqlens_k_new: torch.Tensor | None,
    rotary_seqlens: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    seqlens = cache_seqlens if cache_seqlens is not None else (None if cache_seqlens_int < 0 else cache_seqlens_int)
    args = (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, cache_batch_idx, cache_leftpad, block_table,
            softmax_scale, causal, (window_left, window_right), softcap, rotary_interleaved, alibi_slopes, num_splits,
            False, cu_seqlens_q, None if max_seqlen_q < 0 else max_seqlen_q, cu_seqlens_k_new, rotary_seqlens)
    shape = validate_call(*args)
    with launch_on(q.device):
        problem = pack_problem(shape, *args[:18], *args[19:], check_values=False)
        return _run(problem, backend)


@_fwd_kvcache_op.register_fake
def _(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_seqlens_int, cache_batch_idx,
      cache_leftpad, block_table, softmax_scale, causal, window_left, window_right, softcap, rotary_interleaved,
      alibi_slopes, num_splits, cu_seqlens_q, max_seqlen_q, cu_seqlens_k_new, rotary_seqlens, backend):
    total_q = q.shape[0] if cu_seqlens_q is not None else q.shape[0] * q.shape[1]
    out = q.new_empty((total_q, q.shape[-2], q.shape[-1]))
    lse = q.new_empty((q.shape[-2], total_q), dtype=torch.float32)
    return out, lse


# ---- the public function ---------------------------------------------------------------------


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | int | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    cu_seqlens_k_new: torch.Tensor | None = None,
    rotary_seqlens: torch.Tensor | None = None,
    check_values: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of `q` over a KV cache, appending `k`/`v` to the cache in place first.

    Same arguments, defaults and results as FlashAttention 2.8's `flash_attn_with_kvcache`, plus
    FlashAttention 3's variable-length extras (keyword-only). Works on CPU and CUDA tensors,
    paged caches of any page size, float16/bfloat16/float32. Returns ``out`` shaped like ``q``
    (``(B, Sq, H, D)`` or ``(total_q, H, D)``), or ``(out, lse)`` when ``return_softmax_lse`` —
    lse is float32 ``(B, H, Sq)`` (``(H, total_q)`` for varlen), natural log, ``+inf`` for a query
    row that sees no key (its output is 0). ``cache_seqlens`` is never modified.

    Bad arguments raise ``ValueError``/``TypeError`` naming the argument before anything is
    written. Checks on tensor values (lengths against capacity, block-table entries against the
    pool, ...) cost one host sync; they are skipped during CUDA-graph capture and torch.compile
    tracing, and when ``check_values=False`` — for callers such as an engine that build the
    metadata themselves. Without them the kernels still never write outside the caches.

    Sequences of one call may share cache pages that they only read (a common prefix); a slot
    that one sequence appends to must not be read by another sequence of the same call (on the
    GPU the append and the attention of a decode step run in one kernel, as in FlashAttention).
    """
    args = (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
            block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
            return_softmax_lse, cu_seqlens_q, max_seqlen_q, cu_seqlens_k_new, rotary_seqlens)
    shape = validate_call(*args)
    backend = selected_backend(q.device)

    if torch.compiler.is_compiling():
        out, lse = torch.ops.flashdecode.fwd_kvcache(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin,
            cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None,
            -1 if cache_seqlens is None or isinstance(cache_seqlens, torch.Tensor) else int(cache_seqlens),
            cache_batch_idx, cache_leftpad, block_table,
            float(shape.head_dim**-0.5 if softmax_scale is None else softmax_scale), bool(causal),
            int(window_size[0]), int(window_size[1]), float(softcap), bool(rotary_interleaved), alibi_slopes,
            int(num_splits), cu_seqlens_q, -1 if max_seqlen_q is None else int(max_seqlen_q), cu_seqlens_k_new,
            rotary_seqlens, backend,
        )
    else:
        # Eager calls skip the dispatcher round trip: it costs microseconds a decode step cannot spare.
        if not isinstance(check_values, bool):
            raise TypeError(f"check_values must be a bool, got {type(check_values).__name__}")
        with launch_on(q.device):  # the value checks and the kernels launch on q's GPU
            problem = pack_problem(shape, *args[:18], *args[19:],
                                   check_values=check_values and value_checks_enabled(q),
                                   checks_on_device=backend == "triton")
            out, lse = _run(problem, backend)

    if not shape.varlen_q:
        out = out.view(shape.batch, shape.seqlen_q, shape.num_heads, shape.head_dim)
        lse = lse.view(shape.num_heads, shape.batch, shape.seqlen_q).permute(1, 0, 2)
    if return_softmax_lse:
        return out, lse.contiguous()
    return out
