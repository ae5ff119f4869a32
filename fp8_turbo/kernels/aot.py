"""Ahead-of-time compile of one Triton kernel variant for a CUDA target, with no GPU present (ptxas ships in
the triton wheel): design.md, "Backends". Used by tests/test_aot_*.py and scripts/gpu_compile_plan.py.

    kernel, ptxas_log = aot_compile(fn, types, constexprs, arch=90, num_warps=4, num_stages=3)

`types` gives the type of each non-constexpr argument ("*fp8e4nv", "*bf16", "fp32", ...), default "i32";
`constexprs` the constexpr values (a kernel's defaulted constexprs are filled in). As the JIT does at run
time, pointers and strides (arguments named stride_*, unless align_strides=False) plus any name in
`aligned` get tt.divisibility=16 (the engine passes 16-byte-aligned tensors and strides that are multiples
of 16); without it the compiler cannot prove alignment and emits narrow loads. Options are the JIT's defaults (FMA contraction on).
sm_90 compiles as sm_90a (wgmma). Works with triton 3.6 (the GPU image) and 3.9 (here).
"""
from __future__ import annotations

import contextlib
import inspect
import io

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def signature(fn, types: dict, constexprs: dict) -> dict:
    """The ASTSource signature: "constexpr" for constexprs, else the type from `types` (default i32)."""
    return {name: "constexpr" if name in constexprs else types.get(name, "i32")
            for name in inspect.signature(fn.fn).parameters}


def aot_compile(fn, types: dict, constexprs: dict, *, arch: int = 90, num_warps: int = 4, num_stages: int = 3,
                aligned: tuple[str, ...] = (), align_strides: bool = True, capture_ptxas: bool = False):
    """(compiled kernel, ptxas log) of `fn` (a @triton.jit function) for cuda:arch. The log is what triton
    prints when triton.knobs.nvidia.dump_ptxas_log is set (captured when capture_ptxas)."""
    constexprs = dict(constexprs)
    for param in inspect.signature(fn.fn).parameters.values():  # defaulted constexprs (UPCAST, VIA_F32, ...)
        if param.default is not inspect.Parameter.empty and param.name not in constexprs and param.name not in types:
            constexprs[param.name] = param.default
    sig = signature(fn, types, constexprs)
    names = list(sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if sig[name] != "constexpr" and (sig[name].startswith("*") or name in aligned
                                              or (align_strides and name.startswith("stride_")))}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
    log = io.StringIO()
    with contextlib.redirect_stdout(log) if capture_ptxas else contextlib.nullcontext():
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return kernel, log.getvalue()
