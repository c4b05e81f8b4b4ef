"""Running one implementation on one workload: flashdecode's engine and transformers' generate()."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import torch

from flashdecode.bench.e2e.config import Workload
from flashdecode.bench.e2e.models import free_memory, sync_device
from flashdecode.bench.e2e.workloads import hf_batches, random_prompt


def _greedy(n: int):
    from flashdecode.engine.sampling import SamplingParams  # noqa: PLC0415

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync_device(device)
    t0 = time.perf_counter()
    out = fn()
    sync_device(device)
    return out, time.perf_counter() - t0


def _stats(llm) -> dict[str, int]:
    s = llm.stats
    return {k: int(getattr(s, k)) for k in ("steps", "prefix_hit_tokens", "prefilled_tokens", "decode_tokens",
                                            "preemptions", "ahead_steps") if hasattr(s, k)}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def _batch1_prompts(wl: Workload, vocab: int, seed: int, count: int, salt: int) -> list[list[int]]:
    rng = random.Random(seed * 1000003 + salt)
    return [random_prompt(rng, wl.batch1_prompt, vocab) for _ in range(count)]


def fd_batch1(llm, wl: Workload, vocab: int, seed: int, repeats: int, device: torch.device,
              log: Callable[[str], None]) -> dict[str, Any]:
    P, N = wl.batch1_prompt, wl.batch1_new
    warm = _batch1_prompts(wl, vocab, seed, 1, salt=1)[0]
    llm.generate([warm], _greedy(N))  # a full run: every kernel specialisation is compiled before timing
    llm.generate([warm[: max(1, P // 2)]], _greedy(min(16, N)))
    prefill = []
    for p in _batch1_prompts(wl, vocab, seed, 3, salt=2):
        llm.reset_prefix_cache()
        _, s = timed(lambda p=p: llm.generate([p], _greedy(1)), device)
        prefill.append(s)
    totals, first = [], None
    before = _stats(llm)
    for r, p in enumerate(_batch1_prompts(wl, vocab, seed, max(1, repeats), salt=3)):
        llm.reset_prefix_cache()
        out, s = timed(lambda p=p: llm.generate([p], _greedy(N)), device)
        got = len(out[0].token_ids)
        if got != N:
            raise RuntimeError(f"generated {got} tokens, expected {N}")
        if r == 0:
            first = list(out[0].token_ids[:32])
        totals.append(s)
        log(f"      run {r + 1}: {s:.3f} s")
    res = _batch1_figures(N, min(prefill), min(totals), totals)
    res["first_tokens"] = first
    res["engine_stats"] = _delta(_stats(llm), before)
    return res


def _batch1_figures(new_tokens: int, prefill_s: float, total_s: float, totals: list[float]) -> dict[str, Any]:
    """Figures of a batch-1 run from its fastest prefill and fastest whole run: the same estimator
    for both, so that noise in one (a slow prefill sample on a busy CPU) cannot make the decode
    time ``total_s - prefill_s`` negative."""
    decode_s = total_s - prefill_s
    return {
        "total_s": total_s,
        "prefill_s": prefill_s,
        "output_tokens": new_tokens,
        "requested_tokens": new_tokens,
        "e2e_tokens_per_s": new_tokens / total_s if total_s > 0 else None,
        "decode_tokens_per_s": (new_tokens - 1) / decode_s if decode_s > 0 and new_tokens > 1 else None,
        "runs_s": totals,
    }


def _warmup_requests(requests: list[tuple[list[int], int]], max_seqs: int = 256) -> tuple[list[list[int]], list[int]]:
    """Short requests whose running count passes 256, 128, ..., 1 (every CUDA-graph bucket),
    plus the first real prompts (prefill shapes), each a few tokens."""
    prompts, outs = [], []
    n = min(max_seqs, 256, 2 * len(requests))
    for i in range(n):
        b = i.bit_length()
        prompts.append(requests[i % len(requests)][0][:16])
        outs.append(2 + max(0, 8 - b))
    for p, _ in requests[:64]:
        prompts.append(p)
        outs.append(4)
    return prompts, outs


def fd_throughput(llm, requests: list[tuple[list[int], int]], device: torch.device,
                  log: Callable[[str], None], full_warmup: bool = True) -> dict[str, Any]:
    from flashdecode.engine.sampling import SamplingParams  # noqa: PLC0415

    wp, wo = _warmup_requests(requests)
    _, ws = timed(lambda: llm.generate(wp, [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True)
                                             for o in wo]), device)
    log(f"      warm-up: {len(wp)} short requests in {ws:.2f} s")
    first_pass = None
    if full_warmup:  # Triton compiles kernel variants for lengths/batch sizes met only in the real workload
        llm.reset_prefix_cache()
        _, first_pass = timed(lambda: llm.generate([p for p, _ in requests], [
            SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in requests]), device)
        log(f"      untimed first pass of the workload: {first_pass:.2f} s")
    llm.reset_prefix_cache()
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in requests]
    before = _stats(llm)
    outs, total = timed(lambda: llm.generate([p for p, _ in requests], params), device)
    produced = sum(len(o.token_ids) for o in outs)
    requested = sum(o for _, o in requests)
    res = {
        "total_s": total,
        "output_tokens": produced,
        "requested_tokens": requested,
        "tokens_per_s": requested / total if total > 0 else None,
        "engine_stats": _delta(_stats(llm), before),
        "first_pass_s": first_pass,
    }
    if produced != requested:
        res["note"] = f"produced {produced} tokens, {requested} requested"
    return res


def _hf_kwargs(cache: str, new_tokens: int) -> dict[str, Any]:
    kw: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, eos_token_id=2)
    if cache in ("static", "static-compile"):
        kw["cache_implementation"] = "static"
    if cache == "static":
        from transformers import GenerationConfig  # noqa: PLC0415

        if hasattr(GenerationConfig(), "disable_compile"):
            kw["disable_compile"] = True
    return kw


def hf_generate(model, batch: list[list[int]], new_tokens: int, cache: str, device: torch.device) -> torch.Tensor:
    """Greedy transformers `generate()` of a left-padded batch; returns the new tokens ``(B, new)``."""
    width = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **_hf_kwargs(cache, new_tokens))
    return out[:, width:]


def hf_batch1(model, cache: str, wl: Workload, vocab: int, seed: int, repeats: int, device: torch.device,
              log: Callable[[str], None]) -> dict[str, Any]:
    N = wl.batch1_new
    warm = _batch1_prompts(wl, vocab, seed, 1, salt=1)[0]
    if cache == "static-compile":  # compiled for the exact shapes: warm up with the full run
        _, s = timed(lambda: hf_generate(model, [warm], N, cache, device), device)
        log(f"      warm-up (compile): {s:.1f} s")
    hf_generate(model, [warm], min(4, N), cache, device)
    prefill = []
    for p in _batch1_prompts(wl, vocab, seed, 3, salt=2):
        _, s = timed(lambda p=p: hf_generate(model, [p], 1, cache, device), device)
        prefill.append(s)
    totals, first = [], None
    for r, p in enumerate(_batch1_prompts(wl, vocab, seed, max(1, repeats), salt=3)):
        out, s = timed(lambda p=p: hf_generate(model, [p], N, cache, device), device)
        if out.shape[1] != N:
            raise RuntimeError(f"generated {out.shape[1]} tokens, expected {N}")
        if r == 0:
            first = out[0, :32].tolist()
        totals.append(s)
        log(f"      run {r + 1}: {s:.3f} s")
    res = _batch1_figures(N, min(prefill), min(totals), totals)
    res["first_tokens"] = first
    return res


def hf_throughput(model, cache: str, requests: list[tuple[list[int], int]], batch_size: int, device: torch.device,
                  log: Callable[[str], None]) -> dict[str, Any]:
    bs = max(1, min(batch_size, len(requests)))
    errors: list[str] = []
    while True:
        if errors:
            free_memory(device)  # outside the except block, so the failed attempt's tensors are released
        try:
            return _hf_throughput_once(model, cache, requests, bs, device, log) | (
                {"note_extra": "; ".join(errors)} if errors else {})
        except torch.OutOfMemoryError as exc:
            if bs <= 4:
                raise
            errors.append(f"batch {bs} ran out of memory ({str(exc).splitlines()[0][:80]})")
            log(f"      out of memory at batch {bs}; retrying with {bs // 2}")
            bs //= 2


def _hf_throughput_once(model, cache, requests, bs, device, log) -> dict[str, Any]:
    batches = hf_batches(requests, bs)
    first = batches[0]
    hf_generate(model, [requests[i][0] for i in first], 4, cache, device)  # warm-up at the batch size
    requested = sum(o for _, o in requests)
    generated = 0
    sync_device(device)
    t0 = time.perf_counter()
    for k, idx in enumerate(batches):
        new = max(requests[i][1] for i in idx)
        out = hf_generate(model, [requests[i][0] for i in idx], new, cache, device)
        generated += out.shape[0] * out.shape[1]
        log(f"      batch {k + 1}/{len(batches)}: {len(idx)} requests x {new} new tokens, "
            f"{time.perf_counter() - t0:.1f} s so far")
    sync_device(device)
    total = time.perf_counter() - t0
    return {
        "total_s": total,
        "output_tokens": requested,
        "requested_tokens": requested,
        "generated_tokens": generated,
        "tokens_per_s": requested / total if total > 0 else None,
        "hf_batch_size": bs,
        "batching": f"{len(batches)} padded batches of <= {bs} (left padding, sorted by output length); each runs "
                    f"to its longest request: {generated} tokens generated for {requested} requested",
    }
