"""The memory plan of the flagship, from its config alone (meta device: no memory, no GPU)."""
from __future__ import annotations

import json

import torch

from fp8_turbo.engine.core.memory_plan import GiB, plan_memory
from fp8_turbo.engine.model.config import ModelConfig
from fp8_turbo.engine.model.linear import QuantConfig
from fp8_turbo.engine.serving.cli import main

LLAMA_33_70B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=8192,
    intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)


def test_llama_70b_on_one_h200():
    cfg = ModelConfig.from_hf_dict(LLAMA_33_70B)
    plan = plan_memory(cfg, QuantConfig("fp8"), gpu_bytes=141 * 10**9, kv_dtype=torch.float8_e4m3fn)
    # linear weights in e4m3 (the last block's MLP kept in bf16: +0.7 GB), embeddings + lm_head in bf16
    linear = 80 * (10240 * 8192 + 8192 * 8192 + 57344 * 8192 + 8192 * 28672)
    last_mlp = 3 * 8192 * 28672
    expected = linear + last_mlp + 2 * 2 * 128256 * 8192
    assert abs(plan.weight_bytes - expected) / expected < 0.01, (plan.weight_bytes, expected)
    assert 72e9 < plan.weight_bytes < 75e9
    assert plan.kv_bytes_per_token == 160 * 1024  # FP8 KV: 2 x 80 layers x 8 heads x 128
    assert 0.5 * GiB < plan.activation_bytes < 4 * GiB
    assert 280_000 < plan.kv_tokens < 360_000, plan.kv_tokens
    assert plan.max_concurrent_seqs() == plan.kv_tokens // 131072 >= 2
    bf16 = plan_memory(cfg, QuantConfig("fp8"), gpu_bytes=141 * 10**9, kv_dtype=torch.bfloat16)
    assert abs(bf16.kv_tokens * 2 - plan.kv_tokens) <= 32  # bf16 KV holds half the tokens
    assert plan_memory(cfg, QuantConfig("none"), gpu_bytes=141 * 10**9).kv_tokens == 0  # bf16 70B does not fit


def test_plan_command(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_33_70B))
    assert main(["plan", "--model", str(tmp_path), "--gpu-memory-gb", "141"]) == 0
    out = capsys.readouterr().out
    assert "memory plan (estimated)" in out and "| weights |" in out and "tokens" in out, out
