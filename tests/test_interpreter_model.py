"""The whole model on the Triton path (TRITON_INTERPRET=1: quantize_fp8, fp8_gemm, write_kv and paged
attention run as Triton programs on the CPU) agrees with the CPU torch path.

TRITON_INTERPRET must be set before triton is imported, so each path runs in its own subprocess: the
Triton path records its FP8 roundings, the CPU path replays them (tests/fp8_replay.py says why: a value
on an e4m3 rounding boundary may round apart on the two paths, and that depends on the CPU).

Exact: the reference quantizes each of the Triton path's activations and KV rows to the same bytes and
scale. Bounded, with the same codes on both sides: every activation fed to a quantization, every KV row,
the KV scales and the logits of every forward pass agree to TOL of their largest magnitude.

TOL: with identical quantized inputs, what is left is fp32 rounding in a different summation order. A
length-K fp32 dot product summed in any order is within lambda sqrt(K) 2^-24 sum|a_i b_i| of the exact
value except with probability 2K exp(-lambda^2 / 2) (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019,
Thm 2.4; the worst case (K - 1) 2^-24 needs every rounding to go the same way). lambda = 10 makes a miss
a 1e-19 event; K <= 288 (the MLP); sum|a_i b_i| <= 3.5 x a layer's largest output (measured on this
fixed model and prompt, 2.3-3.4: a property of the data, not of the CPU). So two orders differ by at
most 2 * 10 * 17 * 2^-24 * 3.5 = 7.1e-5 of a GEMM's largest output. Relative errors pass RMSNorm, rotary,
softmax and SiLU unamplified to first order, and at most 6 GEMM errors add up in a compared value (the
residual stream gets o_proj and down_proj of layer 0, o_proj of layer 1, the unquantized last MLP's
gate_up and down, then lm_head): 6 x 7.1e-5 = 4.3e-4 < 2^-11 = 4.9e-4. Measured here: at most 9e-7.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_factory import VOCAB, make_checkpoint

TOL = 2.0**-11
TESTS_DIR = str(Path(__file__).parent)

SCRIPT = r"""
import sys
import torch
sys.path.insert(0, {tests_dir!r})
from fp8_turbo import LLM, SamplingParams
from fp8_replay import Recorder, Replayer, kv_scales

record = {mode!r} == "record"
hooks = Recorder() if record else Replayer(torch.load({recording!r}), {tol!r})
hooks.install()
llm = LLM({path!r}, quantization={scheme!r}, kv_cache_dtype={kv!r}, device="cpu")
if not record:
    hooks.use_kv_scales(llm, torch.load({recording!r})["kv_scales"])
model = llm.engine.model
steps = []  # logits of every forward pass after start-up
forward = model.forward
model.forward = lambda *a, **k: steps.append(forward(*a, **k)) or steps[-1]
llm.engine.sequence_logits({ids!r})
out = llm.generate([{{"prompt_token_ids": {ids!r}}}], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
result = dict(steps=steps, tokens=out.outputs[0].token_ids)
if record:
    torch.save(dict(hooks.state(), kv_scales=kv_scales(llm), **result), {recording!r})
else:
    hooks.finish()
    torch.save(result, {result!r})
"""


def run(tmp_path: Path, mode: str, path: str, scheme: str, kv: str, ids: list[int]) -> dict:
    # The CPU side runs the torch reference (fake-quantized activations, one fp32 matmul), not our C++
    # kernels, which fuse the quantization the replay hooks into: tests/test_cpu_gemm.py checks those
    # against the same reference, and tests/test_cpu_model.py checks the model on them.
    env = dict(os.environ, TRITON_INTERPRET="1" if mode == "record" else "0", FP8_TURBO_CPU_KERNELS="0")
    recording, result = str(tmp_path / "recording.pt"), str(tmp_path / "result.pt")
    code = SCRIPT.format(tests_dir=TESTS_DIR, mode=mode, recording=recording, result=result, tol=TOL,
                         path=path, scheme=scheme, kv=kv, ids=ids)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(recording if mode == "record" else result)


@pytest.mark.parametrize("scheme,kv", [("fp8-w8a8", "auto"), ("fp8-block", "fp8")])
def test_triton_path_matches_cpu_path(tmp_path, scheme, kv):
    path = str(make_checkpoint(tmp_path / "ck", "llama31", hidden_size=128))
    ids = torch.randint(3, VOCAB, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    triton = run(tmp_path, "record", path, scheme, kv, ids)
    cpu = run(tmp_path, "replay", path, scheme, kv, ids)  # checks each quantization on the way
    assert len(cpu["steps"]) == len(triton["steps"]) == 7  # sequence_logits' prefill, generate's prefill, 5 decode steps
    for i, (a, b) in enumerate(zip(cpu["steps"], triton["steps"])):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= TOL, f"forward pass {i}: logits differ by {err:.2e} of their magnitude (> {TOL:.1e})"
    # Greedy tokens are then equal wherever the top two logits are more than 2 TOL apart: check that this
    # prompt has no closer tie (a property of the fixed model, not of the CPU), then the tokens.
    for i, logits in enumerate(triton["steps"]):
        top2 = logits[-1].topk(2).values
        assert top2[0] - top2[1] > 2 * TOL * logits.abs().max(), f"step {i}: near-tie, pick another prompt seed"
    assert cpu["tokens"] == triton["tokens"]
