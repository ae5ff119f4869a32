"""The native CPU decoder step (C++ in step.cpp / step_kernel.h): the whole forward of one packed step,
every layer, the final norm and the lm_head, in one call.

A model is described once, as plain tensors (fp8_turbo/engine/model/native_step.py builds it from a
LlamaModel):

    Linear(weight, weight_scale, act, input_scale, bias, act_group, act_pow2)
        weight [N, K] e4m3 with weight_scale in any layout kernels/cpu/gemm.py takes ([1], [N, 1],
        [N/128, K/128], [N, K/g] fp32 or E8M0), or bf16 / fp32 (scale None); act: ACT[None] (the fp32
        input as it is: dense and weight-only layers), ACT["token"], ACT["tensor"] (dynamic, or static
        with input_scale [1]) or ACT["group"] (1 x act_group); act_pow2: power-of-two activation scales
        (MXFP8). The quantization of fp8_linear, bit for bit.
    Layer(qkv, o, gate_up, down, input_norm, post_norm)        norms: fp32 [hidden]
    Model(hidden, heads, kv_heads, head_dim, intermediate, eps, sm_scale, embed, embed_scale,
          final_norm, lm_head, layers)
        embed [V, hidden] fp32 | bf16 | e4m3 with embed_scale [V, 1] (one scale per row).
    model.set_rotary(cos, sin)       fp32 [positions, head_dim] tables (row p: position p)
    model.set_kv(k_caches, v_caches, k_scales, v_scales)    one cache pair [blocks, block_size, KVH, D]
                                                             (fp32 | bf16 | e4m3) and scale pair per layer
    model.step(input_ids, positions, slot_mapping, block_tables, seq_lens, cu_seqlens_q, logits_indices,
               num_threads, isa) -> logits [len(logits_indices), V] fp32

`step` takes one packed step exactly as fp8_turbo/engine/core/model_runner.py builds it (int64 ids,
positions, slots, logits rows; int32 block tables, lengths, cu_seqlens_q; sequence b's chunk is the
tokens cu[b]:cu[b+1], the last ones of its seq_lens[b]), writes the step's K/V into the caches and
returns the logits of the rows `logits_indices` asks for, in that order; any chunk may ask for any of
its rows (prefill, decode, prompt logprobs, speculative verification). It releases the GIL.

Guarantees: every value is computed by the same kernel functions as the module path (GEMM, attention,
small ops), so the logits are bit-identical to LlamaModel's forward on those kernels, and every row is
invariant to the batch, the chunking, the thread count (`num_threads`) and the instruction set.
Inputs are checked before any work (token ids, positions, slots, block ids, lengths, logits rows); a
bad step raises RuntimeError and changes nothing.

    model.profiling = True; model.phase_seconds(reset=True) -> [seconds per PHASES entry]
        thread 0's wall time in each phase, summed over the steps since the last reset ("wait": at
        the barriers between phases; "rows": norms, activation quantization, SiLU, the embedding).

FP8_TURBO_NATIVE_STEP=0 turns the native step off (the module path runs).
"""
from __future__ import annotations

import os

from fp8_turbo.kernels.cpu import build

ACT = {None: 1, "token": 2, "tensor": 3, "group": 4}  # gemm.cpp's Act codes the step takes
PHASES = ("rows", "gemm qkv", "attention", "gemm o", "gemm gate_up", "gemm down", "lm_head", "wait")
HEADERS = ["step_kernel.h", "gemm.cpp", "gemm_kernel.h", "attention_kernel.h", "attention_types.h",
           "ops_kernel.h", "ops_types.h", "common.h", "vec8.h", "vec8_math.h"]

_EXT = None


def extension():
    global _EXT
    if _EXT is None:
        _EXT = build.load("fp8t_cpu_step", ["step.cpp"], HEADERS)
    return _EXT


def enabled() -> bool:
    return os.environ.get("FP8_TURBO_NATIVE_STEP", "1") not in ("0", "")


def available() -> bool:
    """The native step can run: turned on and built."""
    return enabled() and extension() is not None
