"""The generation engine: `LLM` (generate, chat, stream), `SamplingParams`, scheduler and sampler."""

from flashdecode.engine.chat import ChatSession
from flashdecode.engine.llm import LLM
from flashdecode.engine.sampling import SamplingParams
from flashdecode.engine.sequence import RequestOutput

__all__ = ["LLM", "ChatSession", "RequestOutput", "SamplingParams"]
