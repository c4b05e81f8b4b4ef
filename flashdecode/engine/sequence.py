"""One request's state while it runs: tokens, pages, sampling stream, output text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from flashdecode.cache import SequenceBlocks
from flashdecode.engine.detokenizer import IncrementalDetokenizer
from flashdecode.engine.sampling import SamplingParams


@dataclass(frozen=True)
class RequestOutput:
    """The result of one prompt: generated ``text`` and ``token_ids``, and why it ended."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence token or stop string) or "length"


@dataclass(eq=False)
class Sequence:
    """A prompt and its continuation. Tokens ``token_ids[:num_cached]`` have keys/values in the pool."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    blocks: SequenceBlocks
    max_length: int  # total tokens allowed (prompt + output), the model's context at most
    prompt: str | None = None
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    num_cached: int = 0
    finish_reason: str | None = None
    stop_text: str | None = None  # output text cut at a stop string, when one matched
    emitted: int = 0  # characters of text already streamed
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def max_total_tokens(self) -> int:
        """Worst-case length this request can reach (for page reservation)."""
        return min(self.num_prompt_tokens + self.params.max_tokens, self.max_length)

    def new_token_ids(self) -> list[int]:
        """Tokens the next forward pass must feed (all not yet cached)."""
        return self.token_ids[self.num_cached:]
