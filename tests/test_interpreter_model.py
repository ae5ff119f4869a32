"""The whole model on the Triton path (TRITON_INTERPRET=1: quantize_fp8, fp8_gemm, write_kv and paged
attention run as Triton programs on the CPU) agrees with the CPU torch path.

TRITON_INTERPRET must be set before triton is imported, so the Triton side runs in a subprocess.
Tolerance: both paths quantize bit-identically; they differ only in fp32 summation order (the
interpreter's tl.dot vs one fp32 matmul), ~1e-6 relative, so logits agree to 1e-4 of their magnitude.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from model_factory import VOCAB, make_checkpoint

SCRIPT = r"""
import json, sys
import torch
from engine import LLM, SamplingParams
llm = LLM({path!r}, quantization={scheme!r}, kv_cache_dtype={kv!r}, device="cpu")
ids = {ids!r}
logits = llm.engine.sequence_logits(ids)
out = llm.generate([{{"prompt_token_ids": ids}}], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
print(json.dumps({{"logits": logits.tolist(), "tokens": out.outputs[0].token_ids}}))
"""


def run(path: str, scheme: str, kv: str, ids: list[int], interpret: bool) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0")
    code = SCRIPT.format(path=path, scheme=scheme, kv=kv, ids=ids)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("scheme,kv", [("fp8", "auto"), ("fp8-block", "fp8")])
def test_triton_path_matches_cpu_path(tmp_path, scheme, kv):
    path = str(make_checkpoint(tmp_path / "ck", "llama31", hidden_size=128))
    ids = torch.randint(3, VOCAB, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    cpu = run(path, scheme, kv, ids, interpret=False)
    triton = run(path, scheme, kv, ids, interpret=True)
    a, b = torch.tensor(cpu["logits"]), torch.tensor(triton["logits"])
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4
    assert cpu["tokens"] == triton["tokens"]
