"""Kernels: one module per family, each holding the Triton kernel, its launcher and the torch reference.

    quantize_fp8(x, granularity="token" | "tensor" | "group", group_size=128) -> (x_fp8, scale)
    fp8_gemm(a, b, a_scale, b_scale, out_dtype=torch.bfloat16, bias=None) -> c
    fp8_weight_only_gemm(x, b, b_scale, bias=None) -> c  (W8A16: e4m3 weight, 16-bit activations)
    write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0)
    paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=1.0, v_scale=1.0)
    paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, ...)

Dispatch (fp8_turbo/kernels/backend.py): CUDA tensors run Triton; CPU tensors run the torch reference, or
Triton in the interpreter when TRITON_INTERPRET=1 is set before triton is imported. fp8_gemm on CPU
runs our C++ kernel (kernels/cpu/) when it is built; kernels.cpu also holds the fused CPU linear layers.
"""
from fp8_turbo.kernels.gemm import fp8_gemm, fp8_weight_only_gemm
from fp8_turbo.kernels.kv_write import write_kv
from fp8_turbo.kernels.paged_attention import paged_attention_decode, paged_attention_prefill
from fp8_turbo.kernels.quantize import quantize_fp8

__all__ = ["fp8_gemm", "fp8_weight_only_gemm", "quantize_fp8", "write_kv", "paged_attention_decode", "paged_attention_prefill"]
