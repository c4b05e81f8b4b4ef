"""End-to-end generation benchmark (issue 6): flashdecode's engine vs Hugging Face transformers.

Run it as ``python -m flashdecode.bench --e2e [...]`` or ``flashdecode bench-e2e [...]``.

Models are random-weight Llamas of real shapes (``MODEL_SHAPES``: SmolLM2-135M and Llama-3-8B,
plus ``tiny`` for CPU smoke tests), built with transformers directly on the device in the
benchmark dtype (bf16 on CUDA). flashdecode's model is built from the same tensors in memory (no
checkpoint is written, no tokenizer is needed: prompts are token ids), so both engines run the
very same weights on the same card in the same process.

Workloads (``Workload``):

* ``batch1``: one request, prompt 512 tokens, 256 new tokens, greedy, EOS ignored. Prefill time
  is measured separately (``max_tokens=1``), so ``decode tok/s = (new - 1) / (total - prefill)``;
  its share of the roofline is ``decode tok/s * bytes read per step / measured read bandwidth``,
  with bytes per step = every weight read once (lm_head included, one embedding row) + the K/V of
  the average context (prompt + new/2).
* ``throughput``: 256 requests, prompt lengths uniform in [64, 1024], output lengths uniform in
  [64, 512] (per-request ``max_tokens``, EOS ignored); output tokens/s = requested output tokens /
  wall time. transformers runs them in padded batches (left padding, sorted by output length,
  each batch generating up to its longest request); only the requested tokens count.

Implementations: ``flashdecode`` (the engine as `LLM()` builds it: decode steps replayed as CUDA
graphs on a GPU), ``flashdecode-eager`` (``cuda_graphs=False``; on CUDA only), ``hf-dynamic``
(``generate()``, dynamic cache), ``hf-static``
(``cache_implementation="static"``, no torch.compile) and, opt-in, ``hf-static-compile`` (static
cache with transformers' automatic compile; batch 1 only). Every failure becomes a row's error;
nothing raises out of `run`. ``budget_s`` stops starting new rows; reports are rewritten after
every row, so a killed run still leaves them.

Outputs in ``out``: ``e2e_results.json`` (every figure, card, versions, date), ``e2e_results.md``
(for BENCHMARKS.md) and ``e2e_table.txt`` (the table printed last).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import signal
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# ------------------------------------------------------------------------------------------------
# Models, workloads, implementations
# ------------------------------------------------------------------------------------------------

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
MODEL_ALIASES = {"smollm2": "smollm2-135m", "135m": "smollm2-135m", "smollm": "smollm2-135m",
                 "8b": "llama3-8b", "llama3": "llama3-8b", "llama-3-8b": "llama3-8b", "llama3-8B": "llama3-8b"}
DEFAULT_MODELS = ("smollm2-135m", "llama3-8b")

OURS = ("flashdecode", "flashdecode-eager")
HF_IMPLS = ("hf-dynamic", "hf-static", "hf-static-compile")
IMPLS = OURS + HF_IMPLS
IMPL_ALIASES = {"flashdecode-graphs": "flashdecode"}  # the former name of the graph path, now the default
# Run order: the main comparison first; the eager engine (a diagnostic: what graphs save) and
# compile run in a second pass, after every other row of every model.
DEFAULT_IMPLS = ("flashdecode", "hf-dynamic", "hf-static", "flashdecode-eager")
LATE_IMPLS = ("flashdecode-eager", "hf-static-compile")
WORKLOADS = ("batch1", "throughput")

JSON_FILE = "e2e_results.json"
MD_FILE = "e2e_results.md"
TABLE_FILE = "e2e_table.txt"

# Targets of issue 6 (stated for an H100), on the best flashdecode configuration.
TARGET_8B_ROOFLINE_PCT = 85.0
TARGET_SMOLLM2_TPS = 1000.0
TARGET_THROUGHPUT_SPEEDUP = 5.0


@dataclass
class Workload:
    batch1_prompt: int = 512
    batch1_new: int = 256
    requests: int = 256
    prompt_range: tuple[int, int] = (64, 1024)
    output_range: tuple[int, int] = (64, 512)


FULL_WORKLOAD = Workload()
TINY_WORKLOAD = Workload(batch1_prompt=24, batch1_new=8, requests=6, prompt_range=(4, 40), output_range=(2, 10))


@dataclass
class E2EOptions:
    device: str = "auto"
    models: list[str] = field(default_factory=list)  # empty: DEFAULT_MODELS (tiny with tiny=True or on CPU)
    impls: list[str] = field(default_factory=list)  # empty: DEFAULT_IMPLS (no graphs on CPU)
    workloads: list[str] = field(default_factory=list)  # empty: both
    out: str = "bench_results"
    budget_s: float = 0.0  # 0 = no limit
    tiny: bool = False
    seed: int = 0
    dtype: str = "auto"  # bf16 on CUDA, fp32 on CPU
    hf_batch: int = 64
    repeats: int = 2  # timed batch-1 runs (best is kept)
    max_model_len: int = 2048
    kv_cache_gb: float | None = None  # None: what the throughput workload needs, capped by free memory
    ceiling_gb: float = 2.0
    full_warmup: bool = True  # flashdecode throughput: an untimed first pass of the whole workload
    init_std: float = 0.02
    write: bool = True  # write the reports under `out`


class Interrupted(BaseException):
    """SIGTERM (e.g. `timeout`) while running: stop, but still write the reports."""


def resolve_models(names: list[str], tiny: bool, device: torch.device) -> list[str]:
    if not names:
        return ["tiny"] if tiny or device.type != "cuda" else list(DEFAULT_MODELS)
    out = []
    for n in names:
        for part in n.replace(",", " ").split():
            key = MODEL_ALIASES.get(part, MODEL_ALIASES.get(part.lower(), part.lower()))
            if key not in MODEL_SHAPES:
                raise ValueError(f"unknown model {part!r}; choose from {', '.join(MODEL_SHAPES)}")
            if key not in out:
                out.append(key)
    return out


def resolve_impls(names: list[str], device: torch.device) -> list[str]:
    if not names:
        return [i for i in DEFAULT_IMPLS if device.type == "cuda" or i != "flashdecode-eager"]
    out = []
    for n in names:
        for part in n.replace(",", " ").split():
            part = IMPL_ALIASES.get(part, part)
            if part not in IMPLS:
                raise ValueError(f"unknown implementation {part!r}; choose from {', '.join(IMPLS)}")
            if part not in out:
                out.append(part)
    return out


def resolve_workloads(names: list[str]) -> list[str]:
    if not names:
        return list(WORKLOADS)
    out = []
    for n in names:
        for part in n.replace(",", " ").split():
            if part not in WORKLOADS:
                raise ValueError(f"unknown workload {part!r}; choose from {', '.join(WORKLOADS)}")
            if part not in out:
                out.append(part)
    return out


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name in ("auto", None):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}")
    return table[name]


# ------------------------------------------------------------------------------------------------
# Roofline arithmetic (pure Python)
# ------------------------------------------------------------------------------------------------


def _dims(shape: dict[str, Any]) -> tuple[int, int, int, int, int, int, int]:
    h, heads = int(shape["hidden_size"]), int(shape["num_attention_heads"])
    d = int(shape.get("head_dim") or h // heads)
    return (h, int(shape["intermediate_size"]), int(shape["num_hidden_layers"]), heads,
            int(shape.get("num_key_value_heads") or heads), d, int(shape["vocab_size"]))


def weight_bytes_per_step(shape: dict[str, Any], dtype_bytes: int) -> int:
    """Bytes of weights one decode step reads: every projection and norm once, the lm_head (vocab x
    hidden, also when tied), and one embedding row per token (batch 1)."""
    h, inter, layers, heads, kv_heads, d, vocab = _dims(shape)
    per_layer = h * heads * d + 2 * h * kv_heads * d + heads * d * h + 3 * h * inter + 2 * h
    return (layers * per_layer + h + vocab * h + h) * dtype_bytes


def num_parameters(shape: dict[str, Any]) -> int:
    h, inter, layers, heads, kv_heads, d, vocab = _dims(shape)
    per_layer = h * heads * d + 2 * h * kv_heads * d + heads * d * h + 3 * h * inter + 2 * h
    return layers * per_layer + h + vocab * h * (1 if shape.get("tie_word_embeddings") else 2)


def kv_bytes_per_token(shape: dict[str, Any], dtype_bytes: int) -> int:
    _h, _i, layers, _heads, kv_heads, d, _v = _dims(shape)
    return 2 * layers * kv_heads * d * dtype_bytes


def batch1_bytes_per_step(shape: dict[str, Any], prompt: int, new_tokens: int, dtype_bytes: int) -> float:
    """Average bytes per decode step of the batch-1 workload: weights + K/V of the mean context.

    Decode step j (1 .. new-1) attends over prompt + j keys; their mean is about prompt + new/2."""
    return weight_bytes_per_step(shape, dtype_bytes) + kv_bytes_per_token(shape, dtype_bytes) * (prompt + new_tokens / 2)


def roofline_tokens_per_s(bytes_per_step: float, read_gbs: float | None) -> float | None:
    if not read_gbs or not bytes_per_step:
        return None
    return read_gbs * 1e9 / bytes_per_step


# ------------------------------------------------------------------------------------------------
# Workload data
# ------------------------------------------------------------------------------------------------


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(length)]


def throughput_requests(wl: Workload, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) of every request; the same for every implementation of a model."""
    rng = random.Random(seed * 7919 + 17)
    out = []
    for _ in range(wl.requests):
        p = rng.randint(*wl.prompt_range)
        o = rng.randint(*wl.output_range)
        out.append((random_prompt(rng, p, vocab), o))
    return out


def hf_batches(requests: list[tuple[list[int], int]], batch_size: int) -> list[list[int]]:
    """Indices of the requests in each padded transformers batch: sorted by output length (then
    prompt length), longest first, so each batch's lengths are close (favourable to transformers)."""
    order = sorted(range(len(requests)), key=lambda i: (requests[i][1], len(requests[i][0])), reverse=True)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ------------------------------------------------------------------------------------------------
# Building the models
# ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


def build_hf_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int,
                   init_std: float = 0.02):
    """A random-weight transformers `LlamaForCausalLM`, created directly on ``device`` in ``dtype``
    (no fp32 copy on the host: the 8B shape is 16 GB in bf16)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    config = LlamaConfig(**shape, initializer_range=init_std, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for p in model.parameters():  # rotary buffers stay fp32; only parameters are checked
        if p.dtype != dtype or p.device.type != device.type:
            p.data = p.data.to(device=device, dtype=dtype)
    model.to(device)  # buffers too (a no-op when built in place); dtypes are left alone
    model.eval().requires_grad_(False)
    return model


class StubTokenizer:
    """What `LLM` needs of a tokenizer when every prompt is token ids: decode to "" (no text)."""

    eos_token_id = None
    bos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens: bool = True, **_kw) -> str:
        return ""

    def __call__(self, text, **_kw):
        raise ValueError("the benchmark's random-weight models have no tokenizer; pass token ids")


@contextlib.contextmanager
def in_memory_loader(hf_model):
    """Make `LLM(...)` build its model from ``hf_model``'s tensors (shared where no fusion is needed)
    instead of reading files; the tokenizer is a `StubTokenizer`."""
    import flashdecode.engine.llm as llm_mod  # noqa: PLC0415
    from flashdecode.models.config import LlamaConfig as FDConfig  # noqa: PLC0415
    from flashdecode.models.llama import LlamaForCausalLM as FDModel  # noqa: PLC0415
    from flashdecode.models.loader import LoadedModel, ModelSource  # noqa: PLC0415

    def load(_model, *, device, dtype, tokenizer: bool = True):
        config = FDConfig.from_hf_config(hf_model.config.to_dict())
        with torch.device("meta"):
            net = FDModel(config)
        net.load_hf_weights(hf_model.state_dict().items(), device=device, dtype=dtype)
        net.eval()
        return LoadedModel(net, config, StubTokenizer(), ModelSource("hf", "<in-memory random weights>"))

    original = llm_mod.load_model
    llm_mod.load_model = load
    try:
        yield
    finally:
        llm_mod.load_model = original


def kv_cache_gb_for(requests: list[tuple[list[int], int]], shape: dict[str, Any], dtype_bytes: int,
                    device: torch.device, page_size: int = 16) -> tuple[float, str]:
    """KV pool size: what the throughput workload needs at once (all requests resident), capped
    by free device memory (then the engine preempts, which it reports)."""
    tokens = sum(-(-(len(p) + o) // page_size) * page_size for p, o in requests)
    need = tokens * kv_bytes_per_token(shape, dtype_bytes) * 1.05 + (64 << 20)
    note = ""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        h, inter, layers, heads, kv_heads, d, _v = _dims(shape)
        fused = layers * (h * (heads + 2 * kv_heads) * d + 2 * h * inter) * dtype_bytes  # copies made by fusing
        cap = 0.80 * (free - fused) - (3 << 30)
        if need > cap:
            note = f"KV pool capped at {cap / 2**30:.1f} GiB by free memory (workload needs {need / 2**30:.1f})"
            need = max(cap, 256 << 20)
    return need / 2**30, note


def build_llm(hf_model, device: torch.device, dtype: torch.dtype, *, cuda_graphs: bool | None, kv_cache_gb: float,
              max_model_len: int):
    from flashdecode.engine.llm import LLM  # noqa: PLC0415

    context = int(hf_model.config.max_position_embeddings)
    with in_memory_loader(hf_model):
        return LLM("<in-memory>", dtype=dtype, device=device, kv_cache_gb=kv_cache_gb, cuda_graphs=cuda_graphs,
                   max_model_len=min(max_model_len, context), seed=0)


# ------------------------------------------------------------------------------------------------
# Running one implementation on one workload
# ------------------------------------------------------------------------------------------------


def _greedy(n: int):
    from flashdecode.engine.sampling import SamplingParams  # noqa: PLC0415

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
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
        _, s = _timed(lambda p=p: llm.generate([p], _greedy(1)), device)
        prefill.append(s)
    totals, first = [], None
    before = _stats(llm)
    for r, p in enumerate(_batch1_prompts(wl, vocab, seed, max(1, repeats), salt=3)):
        llm.reset_prefix_cache()
        out, s = _timed(lambda p=p: llm.generate([p], _greedy(N)), device)
        got = len(out[0].token_ids)
        if got != N:
            raise RuntimeError(f"generated {got} tokens, expected {N}")
        if r == 0:
            first = list(out[0].token_ids[:32])
        totals.append(s)
        log(f"      run {r + 1}: {s:.3f} s")
    res = _batch1_figures(N, statistics.median(prefill), min(totals), totals)
    res["first_tokens"] = first
    res["engine_stats"] = _delta(_stats(llm), before)
    return res


def _batch1_figures(new_tokens: int, prefill_s: float, total_s: float, totals: list[float]) -> dict[str, Any]:
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
    _, ws = _timed(lambda: llm.generate(wp, [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True)
                                             for o in wo]), device)
    log(f"      warm-up: {len(wp)} short requests in {ws:.2f} s")
    first_pass = None
    if full_warmup:  # Triton compiles kernel variants for lengths/batch sizes met only in the real workload
        llm.reset_prefix_cache()
        _, first_pass = _timed(lambda: llm.generate([p for p, _ in requests], [
            SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in requests]), device)
        log(f"      untimed first pass of the workload: {first_pass:.2f} s")
    llm.reset_prefix_cache()
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in requests]
    before = _stats(llm)
    outs, total = _timed(lambda: llm.generate([p for p, _ in requests], params), device)
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
        _, s = _timed(lambda: hf_generate(model, [warm], N, cache, device), device)
        log(f"      warm-up (compile): {s:.1f} s")
    hf_generate(model, [warm], min(4, N), cache, device)
    prefill = []
    for p in _batch1_prompts(wl, vocab, seed, 3, salt=2):
        _, s = _timed(lambda p=p: hf_generate(model, [p], 1, cache, device), device)
        prefill.append(s)
    totals, first = [], None
    for r, p in enumerate(_batch1_prompts(wl, vocab, seed, max(1, repeats), salt=3)):
        out, s = _timed(lambda p=p: hf_generate(model, [p], N, cache, device), device)
        if out.shape[1] != N:
            raise RuntimeError(f"generated {out.shape[1]} tokens, expected {N}")
        if r == 0:
            first = out[0, :32].tolist()
        totals.append(s)
        log(f"      run {r + 1}: {s:.3f} s")
    res = _batch1_figures(N, statistics.median(prefill), min(totals), totals)
    res["first_tokens"] = first
    return res


def hf_throughput(model, cache: str, requests: list[tuple[list[int], int]], batch_size: int, device: torch.device,
                  log: Callable[[str], None]) -> dict[str, Any]:
    bs = max(1, min(batch_size, len(requests)))
    errors: list[str] = []
    while True:
        if errors:
            _free(device)  # outside the except block, so the failed attempt's tensors are released
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
    _sync(device)
    t0 = time.perf_counter()
    for k, idx in enumerate(batches):
        new = max(requests[i][1] for i in idx)
        out = hf_generate(model, [requests[i][0] for i in idx], new, cache, device)
        generated += out.shape[0] * out.shape[1]
        log(f"      batch {k + 1}/{len(batches)}: {len(idx)} requests x {new} new tokens, "
            f"{time.perf_counter() - t0:.1f} s so far")
    _sync(device)
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


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def base_row(model: str, workload: str, impl: str) -> dict[str, Any]:
    return {"model": model, "workload": workload, "impl": impl, "group": "ours" if impl in OURS else "peer",
            "status": "not run", "reason": None, "tokens_per_s": None, "total_s": None, "prefill_s": None,
            "e2e_tokens_per_s": None, "decode_tokens_per_s": None, "output_tokens": None, "requested_tokens": None,
            "bytes_per_step": None, "roofline_tokens_per_s": None, "pct_roofline": None,
            "speedup_vs_best_hf": None, "best_hf": None, "note": ""}


def _error_text(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}"[:400]


class _Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def expired(self) -> bool:
        return bool(self.seconds) and self.elapsed() >= self.seconds


def environment(device: torch.device) -> dict[str, Any]:
    try:
        from flashdecode.bench.runner import _version, environment as kernel_env  # noqa: PLC0415

        meta = kernel_env(device)
        meta["versions"]["transformers"] = _version("transformers")
        meta["versions"]["safetensors"] = _version("safetensors")
        return meta
    except Exception as exc:  # never fatal
        return {"date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "device": str(device),
                "card": "?", "versions": {"torch": torch.__version__}, "env_error": _error_text(exc)}


def _cuda_alive(device: torch.device) -> bool:
    try:
        from flashdecode.bench.runner import cuda_alive  # noqa: PLC0415

        return cuda_alive(device)
    except Exception:
        return False


def run(opts: E2EOptions, log: Callable[[str], None] = print, ceilings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every (model, implementation, workload) row; never raises for a failing row."""
    from flashdecode.bench.runner import resolve_device  # noqa: PLC0415

    device = resolve_device(opts.device)
    models = resolve_models(opts.models, opts.tiny, device)
    impls = resolve_impls(opts.impls, device)
    workloads = resolve_workloads(opts.workloads)
    dtype = resolve_dtype(opts.dtype, device)
    wl = TINY_WORKLOAD if (opts.tiny or models == ["tiny"]) else FULL_WORKLOAD
    budget = _Budget(opts.budget_s)
    results: dict[str, Any] = {
        "kind": "e2e",
        "meta": environment(device),
        "options": {**asdict(opts), "out": os.path.basename(os.path.normpath(str(opts.out)))},
        "settings": {"models": models, "impls": impls, "workloads": workloads, "dtype": str(dtype).replace("torch.", ""),
                     "workload": asdict(wl), "shapes": {m: MODEL_SHAPES[m] for m in models},
                     "engine": {"max_model_len": opts.max_model_len, "page_size": 16, "max_num_seqs": 256,
                                "max_num_batched_tokens": 8192, "prefix_caching": True,
                                "weights": "random (transformers init), shared in memory with the transformers model"}},
        "ceilings": ceilings,
        "rows": [],
        "status": "running",
    }
    rows = results["rows"]
    plan = [(m, i, w) for m in models for i in impls for w in workloads]
    for m, i, w in plan:
        rows.append(base_row(m, w, i))
    row_of = {(r["model"], r["impl"], r["workload"]): r for r in rows}

    def save() -> None:
        derive(results)
        if opts.write:
            with contextlib.suppress(Exception):
                write_reports(results, opts.out, final=False)

    log(f"e2e: device {results['meta'].get('card')}, dtype {results['settings']['dtype']}, models {models}, "
        f"impls {impls}, workloads {workloads}, budget {opts.budget_s or 'none'} s")
    if results["ceilings"] is None:
        log("measuring the read bandwidth ceiling ...")
        try:
            from flashdecode.bench.ceiling import measure_ceilings  # noqa: PLC0415

            size = int(opts.ceiling_gb * 1e9) if device.type == "cuda" else (8 << 20)
            results["ceilings"] = measure_ceilings(device, size_bytes=size, log=log).as_dict()
        except Exception as exc:
            results["ceilings"] = {"read_gbs": None, "notes": [f"ceiling failed: {_error_text(exc)}"]}
            log(f"  ceiling failed: {_error_text(exc)}")
    save()
    dead = False
    phases = [[i for i in impls if i not in LATE_IMPLS], [i for i in impls if i in LATE_IMPLS]]
    try:
        for phase, model_name in [(ph, m) for ph in phases if ph for m in models]:
            model_rows = [r for r in rows if r["model"] == model_name and r["impl"] in phase]
            if dead or budget.expired():
                for r in model_rows:
                    r["status"], r["reason"] = "skipped", ("CUDA context lost" if dead else "time budget spent")
                continue
            shape = MODEL_SHAPES[model_name]
            vocab = int(shape["vocab_size"])
            log(f"\n== {model_name}: building random-weight transformers model "
                f"({num_parameters(shape) / 1e9:.2f} B parameters) (t={budget.elapsed():.0f}s)")
            hf = None
            try:
                hf, s = _timed(lambda: build_hf_model(shape, device, dtype, opts.seed, opts.init_std), device)
                log(f"   built in {s:.1f} s (transformers attention: {getattr(hf.config, '_attn_implementation', '?')})")
                results["settings"]["hf_attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
            except Exception as exc:
                log(f"   FAILED: {_error_text(exc)}")
                for r in model_rows:
                    r["status"], r["reason"] = "error", f"model build failed: {_error_text(exc)}"
                _free(device)
                save()
                continue
            requests = throughput_requests(wl, vocab, opts.seed)
            dbytes = torch.empty((), dtype=dtype).element_size()
            for impl in phase:
                todo = [row_of[(model_name, impl, w)] for w in workloads]
                if dead or budget.expired():
                    for r in todo:
                        r["status"], r["reason"] = "skipped", ("CUDA context lost" if dead else "time budget spent")
                    continue
                dead = _run_impl(impl, todo, hf, requests, shape, wl, vocab, dtype, dbytes, device, opts, budget,
                                 log, save)
            del hf
            _free(device)
        skipped = [r for r in rows if r["status"] in ("skipped", "not run")]
        results["status"] = "complete" if not skipped else f"partial ({len(skipped)} rows skipped)"
    except (KeyboardInterrupt, Interrupted):
        results["status"] = "interrupted"
        for r in rows:
            if r["status"] in ("not run", "running"):
                r["status"], r["reason"] = "skipped", "interrupted"
        log("\ninterrupted: writing what was measured")
    results["elapsed_s"] = budget.elapsed()
    derive(results)
    return results


def _run_impl(impl, todo, hf, requests, shape, wl, vocab, dtype, dbytes, device, opts, budget, log, save) -> bool:
    """Run one implementation's rows of one model; returns True when the CUDA context is lost."""
    llm = None
    if impl in OURS:
        try:
            kv_gb, kv_note = (opts.kv_cache_gb, "") if opts.kv_cache_gb else kv_cache_gb_for(requests, shape, dbytes,
                                                                                              device)
            log(f"-- {impl}: building the engine (KV pool {kv_gb:.2f} GiB) (t={budget.elapsed():.0f}s)")
            use_graphs = False if impl == "flashdecode-eager" else None  # None: the engine's default
            llm, s = _timed(lambda: build_llm(hf, device, dtype, cuda_graphs=use_graphs,
                                              kv_cache_gb=kv_gb, max_model_len=opts.max_model_len), device)
            log(f"   engine ready in {s:.1f} s: {llm!r}")
            for r in todo:
                r["note"] = kv_note
        except Exception as exc:
            log(f"   FAILED: {_error_text(exc)}")
            for r in todo:
                r["status"], r["reason"] = "error", f"engine build failed: {_error_text(exc)}"
            llm = None
            _free(device)
            save()
            return device.type == "cuda" and not _cuda_alive(device)
    try:
        for r in todo:
            if budget.expired():
                r["status"], r["reason"] = "skipped", "time budget spent"
                continue
            log(f"-- {r['model']} / {r['workload']} / {impl} (t={budget.elapsed():.0f}s)")
            r["status"] = "running"
            graphs = getattr(getattr(llm, "runner", None), "graphs", None)
            replays_before = int(graphs.replays) if graphs is not None else 0
            try:
                if r["workload"] == "batch1":
                    if impl in OURS:
                        res = fd_batch1(llm, wl, vocab, opts.seed, opts.repeats, device, log)
                    else:
                        res = hf_batch1(hf, impl[3:], wl, vocab, opts.seed, opts.repeats, device, log)
                    res["tokens_per_s"] = res.get("decode_tokens_per_s")
                    res["bytes_per_step"] = batch1_bytes_per_step(shape, wl.batch1_prompt, wl.batch1_new, dbytes)
                else:
                    if impl == "hf-static-compile":
                        raise _Skip("static cache + compile recompiles for every batch shape; batch 1 only")
                    if impl in OURS:
                        res = fd_throughput(llm, requests, device, log, full_warmup=opts.full_warmup)
                    else:
                        res = hf_throughput(hf, impl[3:], requests, opts.hf_batch, device, log)
                extra = "; ".join(x for x in (r.get("note"), res.pop("note", None), res.pop("note_extra", None)) if x)
                r.update(res)
                r["note"] = extra
                if graphs is not None:  # this row's replays (warm-up included) and the graphs captured so far
                    r["graph_replays"] = int(graphs.replays) - replays_before
                    r["graphs_captured"] = len(graphs.graphs)
                r["status"] = "ok"
                log(f"   {_row_summary(r)}")
            except _Skip as why:
                r["status"], r["reason"] = "n/a", str(why)
                log(f"   not applicable: {why}")
            except Exception as exc:
                r["status"], r["reason"] = "error", _error_text(exc)
                r["traceback"] = traceback.format_exc()[-2000:]
                log(f"   FAILED: {_error_text(exc)}")
                _free(device)
                if device.type == "cuda" and not _cuda_alive(device):
                    log("   the CUDA context is lost: the remaining rows are skipped")
                    return True
            save()
    finally:
        del llm
        _free(device)
    return False


class _Skip(Exception):
    pass


def _row_summary(r: dict[str, Any]) -> str:
    if r["workload"] == "batch1":
        return (f"decode {_f(r.get('decode_tokens_per_s'), '.1f')} tok/s, total {_f(r.get('total_s'), '.3f')} s, "
                f"prefill {_f((r.get('prefill_s') or 0) * 1e3, '.1f')} ms")
    return f"{_f(r.get('tokens_per_s'), '.1f')} output tok/s, total {_f(r.get('total_s'), '.2f')} s"


# ------------------------------------------------------------------------------------------------
# Derived figures, targets, reports (pure Python on the results dict)
# ------------------------------------------------------------------------------------------------


def _ok(r: dict[str, Any]) -> bool:
    return r.get("status") == "ok" and bool(r.get("tokens_per_s"))


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Fill roofline share, best transformers config and speed-up into every row (in place)."""
    read_gbs = (results.get("ceilings") or {}).get("read_gbs")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results.get("rows", []):
        groups.setdefault((r["model"], r["workload"]), []).append(r)
    for rows in groups.values():
        peers = [r for r in rows if r.get("group") == "peer" and _ok(r)]
        best = max(peers, key=lambda r: r["tokens_per_s"]) if peers else None
        ref = next((r for r in rows if r["impl"] == "hf-dynamic" and r.get("first_tokens")), None)
        eager = next((r for r in rows if r["impl"] == "flashdecode-eager" and r.get("first_tokens")), None)
        for r in rows:
            r["best_hf"] = best["impl"] if best else None
            r["speedup_vs_best_hf"] = None
            r["roofline_tokens_per_s"] = roofline_tokens_per_s(r.get("bytes_per_step") or 0, read_gbs)
            r["pct_roofline"] = None
            if not _ok(r):
                continue
            if best is not None:
                r["speedup_vs_best_hf"] = r["tokens_per_s"] / best["tokens_per_s"]
            if r["workload"] == "batch1" and r["roofline_tokens_per_s"]:
                r["pct_roofline"] = 100.0 * r["tokens_per_s"] / r["roofline_tokens_per_s"]
            if ref is not None and r.get("first_tokens") and r is not ref:
                r["greedy_agree_with_hf"] = common_prefix_length(r["first_tokens"], ref["first_tokens"])
            if eager is not None and r["impl"] == "flashdecode" and r.get("first_tokens"):
                # graph replay must equal eager execution: same tokens
                r["greedy_agree_with_eager"] = common_prefix_length(r["first_tokens"], eager["first_tokens"])
    results["targets"] = evaluate_targets(results)
    return results


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _best_ours(results, model: str, workload: str, key: str) -> dict[str, Any] | None:
    rows = [r for r in results.get("rows", []) if r["model"] == model and r["workload"] == workload
            and r.get("group") == "ours" and _ok(r) and r.get(key) is not None]
    return max(rows, key=lambda r: r[key]) if rows else None


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets on the best flashdecode row; met is None when not measured."""
    models = [m for m in dict.fromkeys(r["model"] for r in results.get("rows", [])) if m != "tiny"]
    workload = (results.get("settings") or {}).get("workload")
    if workload is not None and dict(workload) != asdict(FULL_WORKLOAD):
        return []  # a smoke-test workload: the issue's targets do not apply
    out = []

    def add(name, row, key, goal, unit):
        value = row.get(key) if row else None
        out.append({"target": name, "goal": goal, "unit": unit, "value": value, "impl": row["impl"] if row else None,
                    "met": None if value is None else bool(value >= goal)})

    if "llama3-8b" in models:
        add("llama3-8b batch-1 decode, % of roofline", _best_ours(results, "llama3-8b", "batch1", "pct_roofline"),
            "pct_roofline", TARGET_8B_ROOFLINE_PCT, "%")
    if "smollm2-135m" in models:
        add("smollm2-135m batch-1 decode tokens/s", _best_ours(results, "smollm2-135m", "batch1", "tokens_per_s"),
            "tokens_per_s", TARGET_SMOLLM2_TPS, "tok/s")
    for m in models:
        add(f"{m} throughput, x best transformers", _best_ours(results, m, "throughput", "speedup_vs_best_hf"),
            "speedup_vs_best_hf", TARGET_THROUGHPUT_SPEEDUP, "x")
    return out


def _f(x, fmt: str, none: str = "-") -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return none
    return format(x, fmt)


def _cell(r: dict[str, Any], width: int = 90) -> str:
    if r.get("status") == "ok":
        bits = []
        if r["workload"] == "batch1":
            bits.append(f"e2e {_f(r.get('e2e_tokens_per_s'), '.1f')} tok/s, prefill {_f((r.get('prefill_s') or 0) * 1e3, '.1f')} ms")
        if r.get("hf_batch_size"):
            bits.append(f"batches of {r['hf_batch_size']}")
        st = r.get("engine_stats") or {}
        if st.get("preemptions"):
            bits.append(f"{st['preemptions']} preemptions")
        if r.get("graph_replays") is not None:
            bits.append(f"{r['graph_replays']} graph replays" + (" (decode ran eagerly!)" if not r["graph_replays"] else ""))
        if st.get("ahead_steps"):
            bits.append(f"{st['ahead_steps']} of {st.get('steps', '?')} steps launched ahead")
        if r.get("greedy_agree_with_eager") is not None:
            n, total = r["greedy_agree_with_eager"], len(r.get("first_tokens") or [])
            bits.append(f"== eager for {n}/{total} tok" + ("" if n == total else " (MISMATCH)"))
        if r.get("greedy_agree_with_hf") is not None:
            bits.append(f"agrees with hf for {r['greedy_agree_with_hf']} tok")
        if r.get("note"):
            bits.append(r["note"])
        text = "; ".join(bits)
    else:
        text = f"{r.get('status', '').upper()}: {r.get('reason') or ''}"
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


TABLE_HEADERS = ["model", "workload", "impl", "tok/s", "total s", "% roofline", "vs best HF", "status / note"]


def table_rows(results: dict[str, Any], width: int = 90) -> list[list[str]]:
    out = []
    rows = results.get("rows", [])
    models = list(dict.fromkeys(r["model"] for r in rows))
    order = {w: i for i, w in enumerate(WORKLOADS)}
    for r in sorted(rows, key=lambda r: (models.index(r["model"]), order.get(r["workload"], 9))):
        ok = r.get("status") == "ok"
        out.append([r["model"], r["workload"], r["impl"], _f(r.get("tokens_per_s") if ok else None, ".1f"),
                    _f(r.get("total_s") if ok else None, ".2f"), _f(r.get("pct_roofline"), ".1f"),
                    _f(r.get("speedup_vs_best_hf"), ".2f"), _cell(r, width)])
    return out


def format_targets(results: dict[str, Any]) -> str:
    lines = []
    for t in results.get("targets") or []:
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"  {t['target']}: {_f(t['value'], '.2f')} {t['unit']} (goal >= {t['goal']:g} {t['unit']}, "
                     f"{t['impl'] or '-'}): {verdict}")
    return "\n".join(lines) if lines else "  (none apply: tiny model or smoke-test workload)"


def format_header(results: dict[str, Any]) -> str:
    m = results.get("meta", {})
    v = m.get("versions", {})
    c = results.get("ceilings") or {}
    return (f"end-to-end benchmark: {m.get('card', '?')}, {str(m.get('date', '?'))[:16].replace('T', ' ')} UTC, "
            f"torch {v.get('torch')}, transformers {v.get('transformers')}, triton {v.get('triton')}, "
            f"flashdecode {v.get('flashdecode')} ({v.get('flashdecode_commit')}); dtype "
            f"{(results.get('settings') or {}).get('dtype')}; read ceiling {_f(c.get('read_gbs'), '.1f')} GB/s; "
            f"status: {results.get('status')}")


LEGEND = ("tok/s: batch1 = decode tokens/s after prefill (roofline = read ceiling / (weights + mean K/V) bytes per "
          "step); throughput = requested output tokens / wall time. vs best HF = tok/s / the best transformers "
          "config's on the same row group.")


def format_report(results: dict[str, Any]) -> str:
    from flashdecode.bench.report import render_table  # noqa: PLC0415

    parts = [format_header(results), "", render_table(TABLE_HEADERS, table_rows(results), "lllrrrrl"), "",
             LEGEND, "", "targets (issue 6, stated for H100; best flashdecode row):", format_targets(results)]
    hf = [r for r in results.get("rows", []) if r.get("batching")]
    if hf:
        parts += ["", "transformers throughput batching: " + hf[0]["batching"]]
    return "\n".join(parts)


def format_markdown(results: dict[str, Any]) -> str:
    from flashdecode.bench.report import md_table  # noqa: PLC0415

    m = results.get("meta", {})
    rows = [row[:-1] + [row[-1] or "-"] for row in table_rows(results, width=160)]
    lines = [f"### End-to-end: {m.get('card', '?')}, {str(m.get('date', '?'))[:10]}", "",
             format_header(results), "",
             md_table(TABLE_HEADERS, rows), "", LEGEND, "", "Targets (issue 6):", ""]
    for t in results.get("targets") or []:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        lines.append(f"- {t['target']}: {_f(t['value'], '.2f')} {t['unit']} (goal >= {t['goal']:g}): {verdict}")
    hf = [r for r in results.get("rows", []) if r.get("batching")]
    if hf:
        lines += ["", f"transformers throughput: {hf[0]['batching']}."]
    return "\n".join(lines) + "\n"


def write_reports(results: dict[str, Any], out_dir: str, final: bool = True) -> list[str]:
    from flashdecode.bench.report import write_json  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    paths = [write_json(results, os.path.join(out_dir, JSON_FILE))]
    for name, text in ((MD_FILE, format_markdown(results)), (TABLE_FILE, format_report(results) + "\n")):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def options_from_args(args) -> E2EOptions:
    return E2EOptions(device=args.device, models=args.e2e_models or [], impls=args.e2e_impls or [],
                      workloads=args.e2e_workloads or [], out=args.out, budget_s=args.budget, tiny=args.tiny,
                      seed=args.seed, dtype=args.e2e_dtype, hf_batch=args.hf_batch, repeats=args.e2e_repeats,
                      max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb, ceiling_gb=args.ceiling_gb,
                      full_warmup=not args.e2e_no_full_warmup)


def main(opts: E2EOptions, log: Callable[[str], None] = print) -> int:
    """Run, write the reports, print the table last. 0 when every row ran (ok or error), 3 when
    rows were skipped (budget, interruption), 2 for bad options."""
    from flashdecode.bench.runner import resolve_device  # noqa: PLC0415

    try:
        device = resolve_device(opts.device)
        resolve_models(opts.models, opts.tiny, device)
        resolve_impls(opts.impls, device)
        resolve_workloads(opts.workloads)
        resolve_dtype(opts.dtype, device)
    except (ValueError, RuntimeError) as exc:
        log(f"flashdecode bench --e2e: {exc}")
        return 2
    previous = None
    with contextlib.suppress(Exception):  # SIGTERM (timeout) -> still write the reports
        def _term(_sig, _frame):
            raise Interrupted()

        previous = signal.signal(signal.SIGTERM, _term)
    try:
        results = run(opts, log=log)
    finally:
        if previous is not None:
            with contextlib.suppress(Exception):
                signal.signal(signal.SIGTERM, previous)
    if opts.write:
        try:
            for p in write_reports(results, opts.out):
                log(f"wrote {p}")
        except Exception as exc:
            log(f"could not write the reports: {_error_text(exc)}")
    log("")
    log(format_report(results))
    return 0 if results.get("status") == "complete" else 3
