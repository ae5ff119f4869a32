"""Our own CPU kernels (C++, built on first use by kernels/cpu/build.py): FP8 GEMM / linear layers
with a fixed-order, batch-invariant accumulation (kernels/cpu/gemm.py), paged attention with a fixed
order per query row (kernels/cpu/attention.py) and the fused small ops of a layer (kernels/cpu/ops.py)."""
from kernels.cpu.attention import paged_attention_decode, paged_attention_prefill
from kernels.cpu.gemm import available, dense_linear, fp8_gemm, fp8_linear, quantize_fp8, selected_isa, supported_isas

__all__ = ["available", "dense_linear", "fp8_gemm", "fp8_linear", "paged_attention_decode", "paged_attention_prefill",
           "quantize_fp8", "selected_isa", "supported_isas"]
