"""The user-facing engine: `LLM.generate`, `LLM.chat`, `LLM.stream` and interactive chat sessions."""

from __future__ import annotations

import os
import random
from contextlib import closing
from collections.abc import Generator, Iterator, Mapping, Sequence as Seq
from itertools import count
from typing import TYPE_CHECKING, Union

import torch

from flashdecode.cache import BlockAllocator, PagedKVPool, SequenceBlocks
from flashdecode.engine.detokenizer import IncrementalDetokenizer
from flashdecode.engine.graphs import DecodeGraphs
from flashdecode.engine.runner import ModelRunner
from flashdecode.engine.sampling import SamplingParams
from flashdecode.engine.scheduler import Scheduler
from flashdecode.engine.sequence import RequestOutput, Sequence
from flashdecode.models import load_model

if TYPE_CHECKING:
    from flashdecode.engine.chat import ChatSession

Message = Mapping[str, str]
Prompt = Union[str, Seq[int]]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
CPU_KV_CACHE_GB = 0.5


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None picks CUDA when available, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported (cpu or cuda)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None (or "auto") is bfloat16 on CUDA and float32 on the CPU."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")


def _is_conversation(x: object) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, Mapping) for m in x)


class LLM:
    """Load a model once, then generate from batches of prompts.

    ``model`` is a GGUF file, a Hugging Face directory (``config.json`` + ``*.safetensors``), or
    None for the embedded SmolLM2-135M-Instruct. The KV pool is one paged allocation: its size is
    ``num_kv_blocks`` pages if given, else ``kv_cache_gb``, else on CUDA ``gpu_memory_utilization``
    of the free memory (minus room for activations) and on the CPU 0.5 GiB.

    Full pages are kept in a prefix cache (``enable_prefix_caching``) keyed by a chained hash of
    their token ids, so prompts that share a beginning compute it once. ``max_num_batched_tokens``
    is the per-step token budget: longer prompts are prefilled in chunks. `stats` counts prefix
    hits, prefilled tokens and preemptions. Decode steps (one new token per running request, up to
    512 requests) replay CUDA graphs captured per batch-size bucket; ``cuda_graphs`` is None (on
    for CUDA), True (CUDA only) or False (every step eager, e.g. to compare).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        page_size: int = 16,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 8192,
        kv_cache_gb: float | None = None,
        num_kv_blocks: int | None = None,
        gpu_memory_utilization: float = 0.85,
        enable_prefix_caching: bool = True,
        cuda_graphs: bool | None = None,
        seed: int | None = None,
    ) -> None:
        for name, value in (("page_size", page_size), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        loaded = load_model(model, device=self.device, dtype=self.dtype)
        self.model, self.config, self.tokenizer, self.source = loaded.model, loaded.config, loaded.tokenizer, loaded.source
        context = self.config.max_position_embeddings
        if max_model_len is not None and not 1 < max_model_len <= context:
            raise ValueError(f"max_model_len must be in [2, {context}] for this model, got {max_model_len}")
        self.max_model_len = max_model_len or context
        self.model.build_rotary(self.max_model_len)
        self.page_size = page_size
        blocks = self._pool_blocks(page_size, max_num_seqs, max_num_batched_tokens, kv_cache_gb, num_kv_blocks,
                                   gpu_memory_utilization)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        # with graphs, one extra page (never handed out) receives the writes of padded rows
        self.pool = self.model.new_kv_pool(blocks + (1 if cuda_graphs else 0), page_size)
        self.allocator = BlockAllocator(blocks, enable_prefix_caching=enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, page_size, max_num_seqs, max_num_batched_tokens)
        shared = torch.Generator(device=self.device)
        shared.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
        graphs = DecodeGraphs(self.model, self.pool, scratch_page=blocks, max_batch=min(max_num_seqs, 512)) \
            if cuda_graphs else None
        self.runner = ModelRunner(self.model, self.pool, shared, max_pages_per_seq=-(-self.max_model_len // page_size),
                                  graphs=graphs)
        eos = set(self.config.eos_token_ids)
        if not eos and getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos = {int(self.tokenizer.eos_token_id)}
        self.eos_token_ids = frozenset(eos)
        self._ids = count()
        self._busy = False

    # ------------------------------------------------------------------ setup helpers
    def _pool_blocks(self, page_size: int, max_num_seqs: int, max_batched: int, kv_cache_gb: float | None,
                     num_kv_blocks: int | None, utilization: float) -> int:
        c = self.config
        per_block = PagedKVPool.bytes_per_block(c.num_layers, page_size, c.num_kv_heads, c.head_dim, self.dtype)
        if num_kv_blocks is not None:
            if isinstance(num_kv_blocks, bool) or not isinstance(num_kv_blocks, int) or num_kv_blocks < 1:
                raise ValueError(f"num_kv_blocks must be an int >= 1, got {num_kv_blocks!r}")
            return num_kv_blocks
        if kv_cache_gb is not None:
            if not kv_cache_gb > 0:
                raise ValueError(f"kv_cache_gb must be > 0, got {kv_cache_gb}")
            budget = kv_cache_gb * 2**30
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            activations = 2**30 + max_batched * (2 * c.intermediate_size + 4 * c.hidden_size) * 4 \
                + max_num_seqs * c.vocab_size * 8
            budget = free * utilization - activations
        else:
            budget = CPU_KV_CACHE_GB * 2**30
        useful = max_num_seqs * -(-self.max_model_len // page_size)  # more pages than this are never used
        blocks = min(int(budget // per_block), useful)
        if blocks < 1:
            raise ValueError("not enough memory for a single KV page; lower max_num_batched_tokens or pass kv_cache_gb")
        return blocks

    @property
    def stats(self):
        """Counters since the engine was built (`SchedulerStats`): steps, prompt tokens, prefix-cache hit
        tokens, prefilled tokens, decode tokens, preemptions, decode steps launched ahead."""
        return self.scheduler.stats

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (pages held by chat sessions stay)."""
        self.allocator.reset_prefix_cache()

    @property
    def kv_capacity_tokens(self) -> int:
        return self.allocator.num_blocks * self.page_size

    # ------------------------------------------------------------------ tokenization
    def encode(self, text: str) -> list[int]:
        """Token ids of raw text, exactly as the model's tokenizer produces them (its default special tokens)."""
        return list(self.tokenizer(text)["input_ids"])

    def apply_chat_template(self, messages: Seq[Message], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; pass raw text to generate() instead")
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: Seq[Message]) -> list[int]:
        """Token ids of a conversation rendered by the chat template, ready for the assistant's turn."""
        for m in messages:
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(f"each message needs 'role' and 'content', got {m!r}")
        text = self.apply_chat_template(messages)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    # ------------------------------------------------------------------ requests
    def _check_prompt(self, ids: list[int], params: SamplingParams, index: int) -> None:
        if not ids:
            raise ValueError(f"prompt {index} is empty (no tokens)")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt {index} has token id {bad[0]} outside the vocabulary of {self.config.vocab_size}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; the model's context is {self.max_model_len} "
                             "tokens, which leaves no room to generate")
        worst = min(len(ids) + params.max_tokens, self.max_model_len)
        pages = -(-worst // self.page_size)
        if pages > self.allocator.num_blocks:
            raise ValueError(f"prompt {index} may reach {worst} tokens but the KV cache holds "
                             f"{self.kv_capacity_tokens}; lower max_tokens or enlarge the cache (kv_cache_gb)")

    def _new_sequence(self, ids: list[int], params: SamplingParams, prompt: str | None, stream: bool,
                      blocks: SequenceBlocks | None = None, num_cached: int = 0) -> Sequence:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        need_text = stream or bool(params.stop_strings)
        return Sequence(
            seq_id=next(self._ids), token_ids=list(ids), num_prompt_tokens=len(ids), params=params,
            blocks=blocks or SequenceBlocks(self.allocator, self.page_size), max_length=self.max_model_len,
            prompt=prompt, generator=generator, num_cached=num_cached,
            detokenizer=IncrementalDetokenizer(self.tokenizer) if need_text else None,
        )

    def _on_token(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        params = seq.params
        delta = seq.detokenizer.update(seq.output_ids) if seq.detokenizer is not None else ""
        if token in self.eos_token_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
        elif params.stop_strings and delta:
            text = seq.detokenizer.text  # type: ignore[union-attr]
            longest = max(len(s) for s in params.stop_strings)
            start = max(0, len(text) - len(delta) - longest + 1)  # only matches that end in the new text
            hits = [i for i in (text.find(s, start) for s in params.stop_strings) if i >= 0]
            if hits:
                seq.stop_text = text[:min(hits)]
                seq.finish_reason = "stop"
        if seq.finish_reason is None and (seq.num_outputs >= params.max_tokens or len(seq.token_ids) >= seq.max_length):
            seq.finish_reason = "length"
        if seq.finished:
            self.scheduler.finish(seq, release=not seq.extra.get("keep_pages", False))

    def _final_text(self, seq: Sequence) -> str:
        if seq.stop_text is not None:
            return seq.stop_text
        return self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)

    def _output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(prompt=seq.prompt, prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
                             text=self._final_text(seq), token_ids=list(seq.output_ids),
                             finish_reason=seq.finish_reason or "length")

    def _run(self, seqs: list[Sequence]) -> Iterator[list[Sequence]]:
        """Run ``seqs`` to completion, yielding the sequences touched by each step."""
        if self._busy:
            raise RuntimeError("this LLM is already generating (finish or close the running stream first)")
        self._busy = True
        try:
            for s in seqs:
                self.scheduler.add(s)
            pending = None
            while True:
                if pending is None:
                    step = self.scheduler.schedule()
                    if step is None:
                        return
                    pending = self.runner.launch(step.seqs, step.num_new_tokens)
                # While the batch stays the same (nothing waiting to join), the next decode step is
                # enqueued before this one's tokens are read, so the GPU does not wait for the host.
                ahead = None if self.scheduler.waiting else self.runner.launch_ahead(pending)
                if ahead is not None:
                    self.scheduler.record_decode_step(len(ahead.seqs))
                tokens = self.runner.resolve(pending)
                done = [(seq, token) for seq, token in zip(pending.seqs, tokens) if token is not None]
                for seq, token in done:
                    self._on_token(seq, token)
                pending = ahead
                yield [seq for seq, _ in done]
        finally:
            self.scheduler.abort_all()  # no-op after a normal finish; frees pages after an error
            self._busy = False

    # ------------------------------------------------------------------ public API
    def _params_list(self, sampling_params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(f"sampling_params must be one SamplingParams or a list of {n}")
        return params

    def _tokenize_prompts(self, prompts: Prompt | Seq[Prompt]) -> list[tuple[list[int], str | None]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a string or a list of strings / token-id lists, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt")
        out: list[tuple[list[int], str | None]] = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out.append((self.encode(p), p))
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                out.append((list(p), None))
            else:
                raise TypeError(f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}")
        return out

    def _generate_ids(self, items: list[tuple[list[int], str | None]],
                      sampling_params: SamplingParams | Seq[SamplingParams] | None) -> list[RequestOutput]:
        params = self._params_list(sampling_params, len(items))
        for i, ((ids, _), p) in enumerate(zip(items, params)):
            self._check_prompt(ids, p, i)
        seqs = [self._new_sequence(ids, p, text, stream=False) for (ids, text), p in zip(items, params)]
        with closing(self._run(seqs)) as steps:
            for _ in steps:
                pass
        return [self._output(s) for s in seqs]

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Continue raw text prompts (no chat template); one output per prompt, in order.

        A prompt is a string or a list of token ids. All prompts run together (continuous
        batching): each step decodes one token of every running request and prefills chunks of
        new prompts within ``max_num_batched_tokens``; prompt pages already in the prefix cache
        are reused, and requests are preempted and recomputed when pages run out.
        """
        return self._generate_ids(self._tokenize_prompts(prompts), sampling_params)

    def chat(self, messages: Seq[Message] | Seq[Seq[Message]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` dicts) or a list of them."""
        if _is_conversation(messages):
            conversations = [messages]
        elif isinstance(messages, (list, tuple)) and messages and all(_is_conversation(c) for c in messages):
            conversations = list(messages)
        else:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts, or a list of such lists")
        items = [(self.encode_chat(c), None) for c in conversations]
        return self._generate_ids(items, sampling_params)

    def stream(self, prompt: Prompt | Seq[Message],
               sampling_params: SamplingParams | None = None) -> Generator[str, None, RequestOutput]:
        """Yield text pieces as one request generates; the generator returns its `RequestOutput`.

        ``prompt`` is raw text, token ids, or a conversation (list of message dicts, templated).
        """
        if _is_conversation(prompt):
            ids, text = self.encode_chat(prompt), None  # type: ignore[arg-type]
        else:
            [(ids, text)] = self._tokenize_prompts([prompt])  # type: ignore[list-item]
        params = self._params_list(sampling_params, 1)[0]
        self._check_prompt(ids, params, 0)
        return self._stream_seq(self._new_sequence(ids, params, text, stream=True))

    def _stream_seq(self, seq: Sequence) -> Generator[str, None, RequestOutput]:
        hold = max((len(s) for s in seq.params.stop_strings), default=1) - 1
        # closed explicitly: an abandoned stream must release its pages now, not when collected
        with closing(self._run([seq])) as steps:
            for _ in steps:
                if seq.finished:
                    continue  # the final text (cut at a stop string) goes out below
                text = seq.detokenizer.text if seq.detokenizer else ""
                safe = len(text) - hold
                if safe > seq.emitted:
                    yield text[seq.emitted:safe]
                    seq.emitted = safe
        final = self._final_text(seq)
        if len(final) > seq.emitted:
            yield final[seq.emitted:]
            seq.emitted = len(final)
        return self._output(seq)

    def chat_session(self, system_prompt: str | None = None) -> ChatSession:
        """An interactive conversation that keeps its KV cache between turns."""
        from flashdecode.engine.chat import ChatSession

        return ChatSession(self, system_prompt)

    def __repr__(self) -> str:
        c = self.config
        return (f"LLM({self.source.path!r}, arch={c.architecture}, layers={c.num_layers}, device={self.device}, "
                f"dtype={self.dtype}, kv_pages={self.allocator.num_blocks}x{self.page_size})")
