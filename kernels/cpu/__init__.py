"""Our own CPU kernels (C++, built on first use by kernels/cpu/build.py): FP8 GEMM / linear layers
with a fixed-order, batch-invariant accumulation. See kernels/cpu/gemm.py for the entry points."""
from kernels.cpu.gemm import available, dense_linear, fp8_gemm, fp8_linear, quantize_fp8, selected_isa, supported_isas

__all__ = ["available", "dense_linear", "fp8_gemm", "fp8_linear", "quantize_fp8", "selected_isa", "supported_isas"]
