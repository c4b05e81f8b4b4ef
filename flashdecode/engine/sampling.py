"""Sampling parameters and the on-device sampler (greedy, temperature, top-k, top-p, seeds)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop.

    ``temperature=0`` is greedy. ``top_k=0`` and ``top_p=1.0`` switch those filters off. ``seed``
    gives the request its own random stream, so its tokens do not depend on what else is in the
    batch. ``stop`` strings end generation (the text is cut before them); the model's end-of-
    sequence tokens end it too unless ``ignore_eos``.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        stop = self.stop
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stops = tuple(stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        object.__setattr__(self, "stop", stops)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self.stop  # type: ignore[return-value]  # normalised to a tuple in __post_init__


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling settings of one step, as device tensors."""

    temperature: torch.Tensor  # (B,) float32, 0 = greedy
    top_k: torch.Tensor  # (B,) int64, 0 = off
    top_p: torch.Tensor  # (B,) float32
    generators: tuple[torch.Generator | None, ...]  # per row; None = the shared stream
    all_greedy: bool
    any_filter: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
              device: torch.device) -> SamplingBatch:
        if all(p.greedy for p in params):  # argmax only: no per-step host-to-device copies
            none = torch.empty(0, device=device)
            return cls(temperature=none, top_k=none, top_p=none, generators=tuple(generators),
                       all_greedy=True, any_filter=False)
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            generators=tuple(generators),
            all_greedy=all(p.greedy for p in params),
            any_filter=any(not p.greedy and (p.top_k > 0 or p.top_p < 1) for p in params),
        )


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k, then outside its top-p nucleus."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = rank[None, :] >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
    drop = mass_before >= top_p[:, None]  # the smallest prefix reaching top_p stays; the best token always
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch, shared: torch.Generator | None = None) -> torch.Tensor:
    """Next token ``(B,)`` int64 for logits ``(B, vocab)``, all on the logits' device.

    Sampling draws ``argmax(p / E)`` with ``E ~ Exponential(1)`` per token (equivalent to drawing
    from ``p``), so each row's noise comes from that row's own generator.
    """
    if batch.all_greedy:  # the float32 copy below changes no value, so argmax may skip it
        return logits.argmax(dim=-1)
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    temperature = torch.where(batch.temperature > 0, batch.temperature, torch.ones_like(batch.temperature))
    scaled = logits / temperature[:, None]
    if batch.any_filter:
        scaled = _filter_top_k_top_p(scaled, batch.top_k, batch.top_p)
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs)
    shared_rows = [i for i, g in enumerate(batch.generators) if g is None]
    if shared_rows:
        if len(shared_rows) == len(batch.generators):
            noise.exponential_(generator=shared)
        else:
            rows = torch.tensor(shared_rows, device=probs.device)
            noise[rows] = torch.empty((len(shared_rows), probs.shape[1]), device=probs.device).exponential_(
                generator=shared)
    for i, g in enumerate(batch.generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    sampled = (probs / noise.clamp_min_(1e-30)).argmax(dim=-1)
    return torch.where(batch.temperature > 0, sampled, greedy)
