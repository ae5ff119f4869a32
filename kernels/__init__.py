"""Kernels: one module per family, each holding the Triton kernel, its launcher and the torch reference.

Dispatch (kernels/backend.py): CUDA tensors run Triton; CPU tensors run the torch reference, or
Triton in the interpreter when TRITON_INTERPRET=1.
"""
from kernels.kv_write import write_kv
from kernels.paged_attention import paged_attention_decode, paged_attention_prefill

__all__ = ["write_kv", "paged_attention_decode", "paged_attention_prefill"]
