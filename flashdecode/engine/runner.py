"""Runs one scheduled step: build the attention metadata, run the model, sample on the device."""

from __future__ import annotations

import torch

from flashdecode.cache import PagedKVPool
from flashdecode.engine.sampling import SamplingBatch, sample
from flashdecode.engine.sequence import Sequence
from flashdecode.models import AttentionMetadata, LlamaForCausalLM


def build_metadata(seqs: list[Sequence], is_prefill: bool,
                   device: torch.device) -> tuple[torch.Tensor, AttentionMetadata]:
    """Packed input ids and the metadata of one step (pages must already cover every new token)."""
    block_rows = [s.blocks.blocks for s in seqs]
    width = max(len(r) for r in block_rows)
    table = [r + [0] * (width - len(r)) for r in block_rows]  # padding entries are never read
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
            block_table=torch.tensor(table, dtype=torch.int32).to(device, non_blocking=True),
            cu_seqlens_q=cu_t.to(device, non_blocking=True),
            max_seqlen_q=max(len(c) for c in chunks),
            logits_indices=(cu_t[1:].long() - 1).to(device, non_blocking=True),
        )
    else:
        ids = [s.token_ids[-1] for s in seqs]
        meta = AttentionMetadata(
            cache_seqlens=torch.tensor(cache_seqlens, dtype=torch.int32).to(device, non_blocking=True),
            block_table=torch.tensor(table, dtype=torch.int32).to(device, non_blocking=True),
        )
    return torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True), meta


class ModelRunner:
    """Owns the model and its KV pool; turns a list of sequences into next tokens."""

    def __init__(self, model: LlamaForCausalLM, pool: PagedKVPool, shared_generator: torch.Generator) -> None:
        self.model = model
        self.pool = pool
        self.device = model.device
        self.shared_generator = shared_generator

    @torch.inference_mode()
    def logits(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Run the step's forward pass (appending keys/values); logits ``(len(seqs), vocab)``."""
        for s in seqs:
            s.blocks.ensure_capacity(len(s.token_ids))
        input_ids, meta = build_metadata(seqs, is_prefill, self.device)
        return self.model(input_ids, meta, self.pool)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        logits = self.logits(seqs, is_prefill)
        batch = SamplingBatch.build([s.params for s in seqs], [s.generator for s in seqs], self.device)
        tokens = sample(logits, batch, self.shared_generator).tolist()
        for s in seqs:
            s.num_cached = len(s.token_ids)
        return tokens
