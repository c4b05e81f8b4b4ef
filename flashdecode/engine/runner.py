"""Runs one scheduled step: build the attention metadata, run the model, sample on the device."""

from __future__ import annotations

import numpy as np
import torch

from flashdecode.cache import PagedKVPool
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


def block_table(seqs: list[Sequence], max_pages: int | None = None) -> torch.Tensor:
    """``(B, width)`` int32 page ids; entries past a sequence's pages are 0 and never read."""
    rows = [s.blocks.blocks for s in seqs]
    table = np.zeros((len(rows), table_width(max(len(r) for r in rows), max_pages)), dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, :len(r)] = r
    return torch.from_numpy(table)


def build_metadata(seqs: list[Sequence], is_prefill: bool, device: torch.device,
                   max_pages: int | None = None) -> tuple[torch.Tensor, AttentionMetadata]:
    """Packed input ids and the metadata of one step (pages must already cover every new token)."""
    table = block_table(seqs, max_pages)
    cache_seqlens = [s.num_cached for s in seqs]
    if is_prefill:
        chunks = [s.new_token_ids() for s in seqs]
        ids = [t for c in chunks for t in c]
        cu = [0]
        for c in chunks:
            cu.append(cu[-1] + len(c))
        cu_t = torch.tensor(cu, dtype=torch.int32)
        meta = AttentionMetadata(
            cache_seqlens=torch.tensor(cache_seqlens, dtype=torch.int32).to(device, non_blocking=True),
            block_table=table.to(device, non_blocking=True),
            cu_seqlens_q=cu_t.to(device, non_blocking=True),
            max_seqlen_q=max(len(c) for c in chunks),
            logits_indices=(cu_t[1:].long() - 1).to(device, non_blocking=True),
        )
    else:
        ids = [s.token_ids[-1] for s in seqs]
        meta = AttentionMetadata(
            cache_seqlens=torch.tensor(cache_seqlens, dtype=torch.int32).to(device, non_blocking=True),
            block_table=table.to(device, non_blocking=True),
        )
    return torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True), meta


class ModelRunner:
    """Owns the model and its KV pool; turns a list of sequences into next tokens."""

    def __init__(self, model: LlamaForCausalLM, pool: PagedKVPool, shared_generator: torch.Generator,
                 max_pages_per_seq: int | None = None) -> None:
        self.model = model
        self.pool = pool
        self.device = model.device
        self.shared_generator = shared_generator
        self.max_pages_per_seq = max_pages_per_seq

    @torch.inference_mode()
    def logits(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Run the step's forward pass (appending keys/values); logits ``(len(seqs), vocab)``."""
        for s in seqs:
            s.blocks.ensure_capacity(len(s.token_ids))
        input_ids, meta = build_metadata(seqs, is_prefill, self.device, self.max_pages_per_seq)
        return self.model(input_ids, meta, self.pool)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        logits = self.logits(seqs, is_prefill)
        batch = SamplingBatch.build([s.params for s in seqs], [s.generator for s in seqs], self.device)
        tokens = sample(logits, batch, self.shared_generator).tolist()
        for s in seqs:
            s.num_cached = len(s.token_ids)
        return tokens
