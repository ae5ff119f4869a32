"""Our own CPU kernels (C++, built on first use by fp8_turbo/kernels/cpu/build.py): FP8 GEMM / linear layers
with a fixed-order, batch-invariant accumulation (fp8_turbo/kernels/cpu/gemm.py), paged attention with a fixed
order per query row (fp8_turbo/kernels/cpu/attention.py), the fused small ops of a layer (fp8_turbo/kernels/cpu/ops.py),
and the native decoder step that runs them all for a whole forward in one call (fp8_turbo/kernels/cpu/step.py)."""
from fp8_turbo.kernels.cpu.attention import paged_attention_decode, paged_attention_prefill
from fp8_turbo.kernels.cpu.gemm import available, dense_linear, fp8_gemm, fp8_linear, quantize_fp8, selected_isa, supported_isas

__all__ = ["available", "dense_linear", "fp8_gemm", "fp8_linear", "paged_attention_decode", "paged_attention_prefill",
           "quantize_fp8", "selected_isa", "supported_isas"]
