"""The op: `flash_attn_with_kvcache` and the log-sum-exp merge of partial attention results."""

from flashdecode.attention.interface import flash_attn_with_kvcache
from flashdecode.attention.merge import merge_attention_states

__all__ = ["flash_attn_with_kvcache", "merge_attention_states"]
