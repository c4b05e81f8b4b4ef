"""Runs one scheduled step: build the attention metadata, run the model, sample on the device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flashdecode.cache import OutOfBlocksError, PagedKVPool
from flashdecode.cuda_device import launch_on
from flashdecode.engine.graphs import DecodeGraphs
from flashdecode.engine.sampling import SamplingBatch, sample
from flashdecode.engine.sequence import Sequence
from flashdecode.models import AttentionMetadata, LlamaForCausalLM


def table_width(pages: int, max_pages: int | None = None) -> int:
    """Block-table columns for a step whose longest sequence holds ``pages`` pages.

    Rounded up to a power of two (at most ``max_pages``): the op picks its split count and
    pipeline depth from the table's capacity, so a width that changed every page would make the
    Triton kernels see a new configuration (and compile again) many times per generation.
    """
    width = 1 << max(0, pages - 1).bit_length()
    return max(pages, min(width, max_pages)) if max_pages else width


def block_table_array(seqs: list[Sequence], max_pages: int | None = None) -> np.ndarray:
    """``(B, width)`` int32 page ids; entries past a sequence's pages are 0 and never read."""
    rows = [s.blocks.blocks for s in seqs]
    table = np.zeros((len(rows), table_width(max(len(r) for r in rows), max_pages)), dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, :len(r)] = r
    return table


def block_table(seqs: list[Sequence], max_pages: int | None = None) -> torch.Tensor:
    return torch.from_numpy(block_table_array(seqs, max_pages))


def build_metadata(seqs: list[Sequence], num_new: list[int], sampled: list[bool], device: torch.device,
                   max_pages: int | None = None) -> tuple[torch.Tensor, AttentionMetadata]:
    """Packed input ids and the metadata of one step (pages must already cover every new token).

    Sequence ``i`` feeds ``token_ids[num_cached : num_cached + num_new[i]]`` on top of its
    ``num_cached`` cached tokens; logits are computed only for the last row of the sequences
    with ``sampled[i]``. One new token each runs the op's padded decode form; anything else the
    packed varlen form (``cu_seqlens_q`` = ``cu_seqlens_k_new``, ``cache_seqlens`` = cached tokens).
    """
    table = block_table(seqs, max_pages)
    cache_seqlens = torch.tensor([s.num_cached for s in seqs], dtype=torch.int32).to(device, non_blocking=True)
    table = table.to(device, non_blocking=True)
    if all(n == 1 for n in num_new):
        ids = [s.token_ids[s.num_cached] for s in seqs]
        logits_indices = None
        if not all(sampled):
            logits_indices = torch.tensor([i for i, x in enumerate(sampled) if x], dtype=torch.long)
            logits_indices = logits_indices.to(device, non_blocking=True)
        meta = AttentionMetadata(cache_seqlens=cache_seqlens, block_table=table, logits_indices=logits_indices,
                                 check_values=False)
    else:
        ids = []
        cu = [0]
        for s, n in zip(seqs, num_new):
            ids.extend(s.token_ids[s.num_cached:s.num_cached + n])
            cu.append(cu[-1] + n)
        cu_t = torch.tensor(cu, dtype=torch.int32)
        rows = torch.tensor([cu[i + 1] - 1 for i, x in enumerate(sampled) if x], dtype=torch.long)
        meta = AttentionMetadata(
            cache_seqlens=cache_seqlens, block_table=table, cu_seqlens_q=cu_t.to(device, non_blocking=True),
            max_seqlen_q=max(num_new), logits_indices=rows.to(device, non_blocking=True), check_values=False,
        )
    return torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True), meta


@dataclass(eq=False)
class PendingStep:
    """A forward pass whose sampled tokens are on their way to the host.

    ``tokens`` is filled once ``ready`` (a CUDA event; None on the CPU) has completed. ``ahead``
    is True for a decode step launched before the previous step's tokens were known: its positions
    are one past each sequence's ``num_cached`` at launch time.
    """

    seqs: list[Sequence]
    num_new: list[int]
    sampled: list[bool]
    tokens: torch.Tensor | None  # (sum(sampled),) int64 on the host
    ready: torch.cuda.Event | None
    graph_decode: bool
    ahead: bool = False


def _to_host(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying ``tokens`` to the host without waiting for them."""
    if tokens.device.type != "cuda":
        return tokens, None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


class ModelRunner:
    """Owns the model and its KV pool; runs a scheduled step and samples the next tokens.

    A step is launched (`launch`) and later resolved (`resolve`: wait for its tokens, then advance
    each sequence's bookkeeping). Between the two, the engine may launch the next decode step
    (`launch_ahead`), fed on the device by this step's tokens, so the GPU never waits for the host.
    """

    def __init__(self, model: LlamaForCausalLM, pool: PagedKVPool, shared_generator: torch.Generator,
                 max_pages_per_seq: int | None = None, graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.pool = pool
        self.device = model.device
        self.shared_generator = shared_generator
        self.max_pages_per_seq = max_pages_per_seq
        self.graphs = graphs  # decode steps replayed as CUDA graphs, else eager

    def _uses_graph(self, seqs: list[Sequence], num_new: list[int], sampled: list[bool]) -> bool:
        return self.graphs is not None and all(sampled) and all(n == 1 for n in num_new) \
            and self.graphs.can_run(len(seqs))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, sampled: list[bool]) -> torch.Tensor:
        rows = [s for s, x in zip(seqs, sampled) if x]
        batch = SamplingBatch.build([s.params for s in rows], [s.generator for s in rows], self.device)
        return sample(logits, batch, self.shared_generator)

    @torch.inference_mode()
    def logits(self, seqs: list[Sequence], num_new: list[int], sampled: list[bool]) -> torch.Tensor:
        """Run the step's forward pass (appending keys/values); logits ``(sum(sampled), vocab)``."""
        with launch_on(self.device):
            return self._logits(seqs, num_new, sampled)

    def _logits(self, seqs: list[Sequence], num_new: list[int], sampled: list[bool]) -> torch.Tensor:
        for s, n in zip(seqs, num_new):
            s.blocks.ensure_capacity(s.num_cached + n)
        if self._uses_graph(seqs, num_new, sampled):
            return self.graphs.run([s.token_ids[s.num_cached] for s in seqs], [s.num_cached for s in seqs],
                                   block_table_array(seqs, self.max_pages_per_seq))
        input_ids, meta = build_metadata(seqs, num_new, sampled, self.device, self.max_pages_per_seq)
        return self.model(input_ids, meta, self.pool)

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], num_new: list[int] | None = None) -> PendingStep:
        """Enqueue the forward pass computing ``num_new[i]`` tokens of each sequence (default: all not
        cached) and the sampling of the next token of each sequence that reaches its last token."""
        if num_new is None:
            num_new = [len(s.token_ids) - s.num_cached for s in seqs]
        sampled = [s.num_cached + n == len(s.token_ids) for s, n in zip(seqs, num_new)]
        graph_decode = self._uses_graph(seqs, num_new, sampled)
        with launch_on(self.device):  # kernels, streams, events and graphs act on the current device
            return self._launch(seqs, num_new, sampled, graph_decode)

    def _launch(self, seqs: list[Sequence], num_new: list[int], sampled: list[bool], graph_decode: bool) -> PendingStep:
        logits = self._logits(seqs, num_new, sampled)
        tokens, ready = None, None
        if any(sampled):
            next_ids = self._sample(seqs, logits, sampled)
            if graph_decode:
                self.graphs.feed(next_ids)  # the inputs of a decode step launched ahead
            tokens, ready = _to_host(next_ids)
        return PendingStep(seqs, num_new, sampled, tokens, ready, graph_decode)

    @torch.inference_mode()
    def launch_ahead(self, prev: PendingStep) -> PendingStep | None:
        """The decode step after ``prev`` (same sequences, one token each), enqueued before ``prev``'s
        tokens reach the host: its input ids are ``prev``'s sampled tokens, already on the device.

        ``prev`` must be the only step not yet resolved, so that it feeds each sequence's position
        ``num_cached`` and this step the next one; ``prev`` may itself have been launched ahead
        (steps chain while the batch stays the same).

        None when that cannot be done safely or usefully: ``prev`` is not a replayed decode step, a
        sequence has finished or may finish with ``prev``'s token (length limits), a page is
        missing, or the step's graph is not captured yet. A sequence that ends with ``prev``'s token
        (end of sequence, stop string) makes this step's row wasted work, dropped by `resolve`; the
        key/value it writes is that of the sequence's real last token, in a page the sequence still
        held when the step was enqueued.
        """
        if not prev.graph_decode:
            return None
        seqs = prev.seqs
        for s in seqs:
            if s.finished or len(s.token_ids) + 1 >= s.max_length or s.num_outputs + 1 >= s.params.max_tokens:
                return None
        try:
            for s in seqs:
                s.blocks.ensure_capacity(s.num_cached + 2)
        except OutOfBlocksError:
            return None
        table = block_table_array(seqs, self.max_pages_per_seq)
        if not self.graphs.is_captured(len(seqs), table.shape[1]):
            return None
        with launch_on(self.device):
            logits = self.graphs.run(None, [s.num_cached + 1 for s in seqs], table)
            next_ids = self._sample(seqs, logits, prev.sampled)
            self.graphs.feed(next_ids)
            tokens, ready = _to_host(next_ids)
        return PendingStep(seqs, [1] * len(seqs), list(prev.sampled), tokens, ready, True, ahead=True)

    def resolve(self, pending: PendingStep) -> list[int | None]:
        """Wait for ``pending``'s tokens; advance ``num_cached`` and register full pages of each
        sequence still running. Returns the sampled token of each sequence that reached its last
        token, None for the others (a prefill chunk short of the end, or a sequence that finished
        before this step's result was wanted)."""
        tokens: list[int] = []
        if pending.tokens is not None:
            if pending.ready is not None:
                pending.ready.synchronize()
            tokens = pending.tokens.tolist()
        it = iter(tokens)
        out: list[int | None] = []
        for s, n, x in zip(pending.seqs, pending.num_new, pending.sampled):
            token = next(it) if x else None
            if s.finished:  # ended with the previous step's token: this row was speculative
                out.append(None)
                continue
            s.num_cached += n
            s.blocks.commit(s.token_ids, s.num_cached)
            out.append(token)
        return out

    def step(self, seqs: list[Sequence], num_new: list[int] | None = None) -> list[int | None]:
        """Launch and resolve one step (see `launch` and `resolve`)."""
        return self.resolve(self.launch(seqs, num_new))
