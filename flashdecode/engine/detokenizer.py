"""Incremental detokenization: turn a growing list of token ids into text deltas."""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Emits the text added by each new token, consistent with decoding all ids at once.

    A token may end in the middle of a UTF-8 character or change how the previous token renders;
    so each step decodes a short window of recent ids and holds text back while it ends in the
    replacement character.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, ids: list[int]) -> str:
        """Text added since the last call, for the full id list ``ids`` (which only grows)."""
        prefix = self._decode(ids[self.prefix_offset:self.read_offset])
        full = self._decode(ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        if not full.startswith(prefix):  # the window's rendering changed; fall back to a full decode
            whole = self._decode(ids)
            delta = whole[len(self.text):] if whole.startswith(self.text) else ""
        else:
            delta = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(ids)
        self.text += delta
        return delta
