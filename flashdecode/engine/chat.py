"""Interactive chat sessions that keep the conversation's KV cache between turns."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from flashdecode.engine.sampling import SamplingParams
from flashdecode.engine.sequence import RequestOutput, Sequence

if TYPE_CHECKING:
    from flashdecode.engine.llm import LLM


class ChatSession:
    """A conversation whose tokens stay cached between turns: each turn prefills only what is new.

    The conversation is re-rendered by the chat template every turn; the cached tokens that still
    match its beginning are kept and the rest is recomputed.
    """

    def __init__(self, llm: LLM, system_prompt: str | None = None) -> None:
        self.llm = llm
        self.messages: list[dict[str, str]] = []
        if system_prompt:
            self.messages.append({"role": "system", "content": system_prompt})
        self._seq: Sequence | None = None
        self.last_reused_tokens = 0

    def send(self, content: str, sampling_params: SamplingParams | None = None) -> Generator[str, None, RequestOutput]:
        """Add a user message and stream the reply; the reply joins the conversation when done."""
        llm = self.llm
        params = sampling_params or SamplingParams(max_tokens=512)
        messages = self.messages + [{"role": "user", "content": content}]
        ids = llm.encode_chat(messages)
        llm._check_prompt(ids, params, 0)
        blocks, cached = None, 0
        if self._seq is not None:
            old = self._seq.token_ids[: self._seq.num_cached]
            common = 0
            for a, b in zip(old, ids):
                if a != b:
                    break
                common += 1
            cached = min(common, len(ids) - 1)
            blocks = self._seq.blocks
            cached = blocks.truncate(cached)  # rounded down when it would cut a shared (cached) page
        self.last_reused_tokens = cached
        seq = llm._new_sequence(ids, params, None, stream=True, blocks=blocks, num_cached=cached)
        seq.extra["keep_pages"] = True
        self._seq = seq
        try:
            output = yield from llm._stream_seq(seq)
        except BaseException:
            self.close()
            raise
        self.messages = messages + [{"role": "assistant", "content": output.text}]
        return output

    def close(self) -> None:
        """Give the conversation's pages back to the pool."""
        if self._seq is not None:
            self._seq.blocks.release()
            self._seq = None

    def reset(self) -> None:
        self.close()
        self.messages = [m for m in self.messages if m["role"] == "system"][:1]
