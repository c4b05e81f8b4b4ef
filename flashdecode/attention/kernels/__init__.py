"""Triton kernels behind `flash_attn_with_kvcache` and `merge_attention_states`.

Importing this package does not import Triton; import the submodules (``launch``, ...) when the
Triton path is taken. Under ``TRITON_INTERPRET=1`` (set before Triton is imported) the kernels run
on CPU tensors.
"""
