"""Runs one scheduled step: build the attention metadata, run the model, sample on the device."""

from __future__ import annotations

import numpy as np
import torch

from flashdecode.cache import PagedKVPool
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


class ModelRunner:
    """Owns the model and its KV pool; runs a scheduled step and samples the next tokens."""

    def __init__(self, model: LlamaForCausalLM, pool: PagedKVPool, shared_generator: torch.Generator,
                 max_pages_per_seq: int | None = None, graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.pool = pool
        self.device = model.device
        self.shared_generator = shared_generator
        self.max_pages_per_seq = max_pages_per_seq
        self.graphs = graphs  # decode steps replayed as CUDA graphs (experimental), else eager

    @torch.inference_mode()
    def logits(self, seqs: list[Sequence], num_new: list[int], sampled: list[bool]) -> torch.Tensor:
        """Run the step's forward pass (appending keys/values); logits ``(sum(sampled), vocab)``."""
        for s, n in zip(seqs, num_new):
            s.blocks.ensure_capacity(s.num_cached + n)
        if self.graphs is not None and all(sampled) and all(n == 1 for n in num_new) \
                and self.graphs.can_run(len(seqs)):
            return self.graphs.run([s.token_ids[s.num_cached] for s in seqs], [s.num_cached for s in seqs],
                                   block_table_array(seqs, self.max_pages_per_seq))
        input_ids, meta = build_metadata(seqs, num_new, sampled, self.device, self.max_pages_per_seq)
        return self.model(input_ids, meta, self.pool)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], num_new: list[int] | None = None) -> list[int | None]:
        """Compute ``num_new[i]`` tokens of each sequence (default: all not cached); returns the
        sampled next token of each sequence that reached its last token, None for the others
        (a prefill chunk short of the end). Advances ``num_cached`` and registers full pages."""
        if num_new is None:
            num_new = [len(s.token_ids) - s.num_cached for s in seqs]
        sampled = [s.num_cached + n == len(s.token_ids) for s, n in zip(seqs, num_new)]
        logits = self.logits(seqs, num_new, sampled)
        out: list[int | None] = [None] * len(seqs)
        if any(sampled):
            rows = [s for s, x in zip(seqs, sampled) if x]
            batch = SamplingBatch.build([s.params for s in rows], [s.generator for s in rows], self.device)
            tokens = iter(sample(logits, batch, self.shared_generator).tolist())
            out = [next(tokens) if x else None for x in sampled]
        for s, n in zip(seqs, num_new):
            s.num_cached += n
            s.blocks.commit(s.token_ids, s.num_cached)
        return out
