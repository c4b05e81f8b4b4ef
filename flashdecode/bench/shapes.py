"""The benchmark's shape grid (issue 4) and the `--shapes` filter.

A shape is one problem size and kind. Kinds:

* ``decode``  — one query token per sequence, equal cache lengths (the main grid);
* ``ragged``  — decode with per-sequence lengths drawn uniformly in [1, L];
* ``spec``    — speculative verification: Sq draft tokens, causal (bottom-right aligned);
* ``append``  — decode step that also appends one new k/v (with rotary) into the cache;
* ``prefill`` — Sq = L, causal: compute bound, reported in TFLOP/s;
* ``memory``  — causal prefill at one sequence, for the peak-memory table (naive vs flash).

Each shape has a stable name, e.g. ``decode:1,4096,32/8,128`` (B, L, Hq/Hkv, D). ``--shapes`` takes
tokens: a kind (``decode``), a substring of names (``32/8``), or a new decode spec ``B,L,Hq/Hkv,D``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

KINDS = ("decode", "ragged", "spec", "append", "prefill", "memory")
_SPEC_RE = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*/\s*(\d+)\s*,\s*(\d+)\s*$")
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    kind: str
    batch: int
    seqlen: int  # L: keys per sequence (max length for ragged)
    heads_q: int
    heads_kv: int
    head_dim: int
    seqlen_q: int = 1
    causal: bool = False
    dtype: str = "bfloat16"
    quick: bool = False  # part of the --quick subset
    seed: int = 0
    label: str = ""  # extra words for the name (custom shapes)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"shape kind must be one of {KINDS}; got {self.kind!r}")
        if min(self.batch, self.seqlen, self.heads_q, self.heads_kv, self.head_dim, self.seqlen_q) < 1:
            raise ValueError(f"shape sizes must be >= 1: {self}")
        if self.heads_q % self.heads_kv:
            raise ValueError(f"heads_q ({self.heads_q}) must be a multiple of heads_kv ({self.heads_kv})")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {self.dtype!r}")

    # ---- naming -------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        return f"{self.batch},{self.seqlen},{self.heads_q}/{self.heads_kv},{self.head_dim}"

    @property
    def name(self) -> str:
        extra = ""
        if self.kind == "spec" or (self.kind not in ("prefill", "memory") and self.seqlen_q != 1):
            extra += f",sq{self.seqlen_q}"
        if self.dtype != "bfloat16":
            extra += f",{self.dtype}"
        if self.label:
            extra += f",{self.label}"
        return f"{self.kind}:{self.spec}{extra}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def memory_bound(self) -> bool:
        return self.kind in ("decode", "ragged", "spec", "append")

    @property
    def new_tokens(self) -> int:
        """k/v appended per sequence by the op (append kind only)."""
        return self.seqlen_q if self.kind == "append" else 0

    # ---- sizes --------------------------------------------------------------------------------
    def kv_lengths(self) -> list[int]:
        """Keys each sequence attends to (after any append); ragged lengths are seeded."""
        if self.kind == "ragged":
            g = torch.Generator().manual_seed(1234 + self.seed)
            return torch.randint(1, self.seqlen + 1, (self.batch,), generator=g).tolist()
        return [self.seqlen] * self.batch

    def kv_bytes(self, lengths: list[int] | None = None) -> int:
        """Bytes of K and V an ideal kernel reads once (lengths actually used, not capacity)."""
        total = sum(self.kv_lengths() if lengths is None else lengths)
        return 2 * total * self.heads_kv * self.head_dim * self.elem_bytes

    def flops(self, lengths: list[int] | None = None) -> float:
        """Matmul FLOPs (QK^T and PV, 2 each per multiply-add) over the visible (query, key) pairs."""
        lengths = self.kv_lengths() if lengths is None else lengths
        pairs = 0
        sq = self.seqlen_q
        for sk in lengths:
            if self.causal:  # query i sees keys j <= i + sk - sq (bottom-right aligned)
                pairs += sum(max(0, min(sk, i + sk - sq + 1)) for i in range(sq))
            else:
                pairs += sq * sk
        return 4.0 * self.heads_q * self.head_dim * pairs

    def with_(self, **kw) -> "Shape":
        return replace(self, **kw)


def _d(b, l, hq, hkv, d, quick=False) -> Shape:
    return Shape("decode", b, l, hq, hkv, d, quick=quick)


def full_grid() -> list[Shape]:
    """Every shape of issue 4, in run order (decode grid, extras, prefill, memory table)."""
    grid = [
        _d(1, 4096, 32, 8, 128, quick=True),
        _d(1, 32768, 32, 8, 128),
        _d(1, 131072, 32, 8, 128),
        _d(8, 8192, 32, 8, 128),
        _d(32, 4096, 32, 8, 128),
        _d(64, 16384, 32, 8, 128),
        _d(128, 2048, 32, 8, 128),
        _d(16, 4096, 32, 32, 128),
        _d(32, 8192, 32, 1, 128, quick=True),
        _d(64, 2048, 9, 3, 64),
        _d(16, 8192, 16, 8, 256),
        Shape("ragged", 64, 16384, 32, 8, 128, quick=True),
        Shape("spec", 32, 4096, 32, 8, 128, seqlen_q=4, causal=True),
        Shape("append", 64, 4096, 32, 8, 128, quick=True),
        Shape("prefill", 4, 4096, 32, 8, 128, seqlen_q=4096, causal=True),
    ]
    for length in (1024, 4096, 16384):
        grid.append(Shape("memory", 1, length, 32, 32, 128, seqlen_q=length, causal=True, quick=length == 1024))
    return grid


def tiny_grid() -> list[Shape]:
    """Small versions of every kind, for CPU smoke runs and tests (seconds, not minutes)."""
    return [
        _d(2, 64, 4, 2, 16, quick=True),
        _d(1, 200, 4, 1, 32),
        _d(3, 48, 9, 3, 16),
        Shape("ragged", 4, 96, 4, 2, 16, quick=True),
        Shape("spec", 2, 64, 4, 2, 16, seqlen_q=4, causal=True),
        Shape("append", 2, 64, 4, 2, 16, quick=True),
        Shape("prefill", 1, 64, 4, 2, 16, seqlen_q=64, causal=True),
        Shape("memory", 1, 64, 4, 4, 16, seqlen_q=64, causal=True, quick=True),
    ]


def parse_spec(text: str, kind: str = "decode") -> Shape:
    """`B,L,Hq/Hkv,D` -> a decode Shape (ValueError when it does not parse)."""
    m = _SPEC_RE.match(text)
    if not m:
        raise ValueError(f"shape spec must look like B,L,Hq/Hkv,D (e.g. 1,4096,32/8,128); got {text!r}")
    b, l, hq, hkv, d = (int(x) for x in m.groups())
    return Shape(kind, b, l, hq, hkv, d)


def split_tokens(values: list[str] | str | None) -> list[str]:
    """`--shapes` values -> tokens. Tokens are separated by spaces or ';' (commas belong to specs)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        out += [t.strip() for t in re.split(r"[;\s]+", v) if t.strip()]
    return out


def select(shapes: list[Shape], tokens: list[str] | str | None, quick: bool = False) -> list[Shape]:
    """Filter `shapes` by tokens (kind, name substring, or a new `B,L,Hq/Hkv,D` decode spec).

    No tokens: all shapes (only the `quick` ones when quick). With tokens, `quick` is ignored:
    what is named is run. A token that matches nothing raises ValueError, so a typo never
    silently runs an empty benchmark.
    """
    tokens = split_tokens(tokens)
    if not tokens:
        return [s for s in shapes if s.quick] if quick else list(shapes)
    chosen: list[Shape] = []
    for tok in tokens:
        low = tok.lower()
        if low == "all":
            hits = list(shapes)
        elif low == "quick":
            hits = [s for s in shapes if s.quick]
        elif low in KINDS:
            hits = [s for s in shapes if s.kind == low]
        else:
            hits = [s for s in shapes if low in s.name.lower()]
            if not hits and _SPEC_RE.match(tok):
                hits = [parse_spec(tok)]
        if not hits:
            names = ", ".join(s.name for s in shapes)
            raise ValueError(f"--shapes token {tok!r} matches no shape (kinds: {', '.join(KINDS)}; shapes: {names})")
        for s in hits:
            if s not in chosen:
                chosen.append(s)
    return chosen
