"""Pre-quantized FP8 checkpoints: our compressed-tensors writer round-trips bit-exactly, and every
format (compressed-tensors tensor/channel/block, static input scales, transformers fp8, fbgemm_fp8)
loads to the fake-quant reference: each HF weight quantized on its own with kernels.fp8.quantize_weight.

Tolerance: none. Dequantized weights must be equal (torch.equal: the loader never requantizes), and
then the logits of the loaded checkpoint and of the reference model are equal too: the same fp32 ops
on the same shapes and the same values, in the same process, so the same summation order. (A tolerance
would not be safe here anyway: were the orders to differ, an activation on an e4m3 rounding boundary
could round apart and move the logits by ~2e-4 of their magnitude, see tests/fp8_replay.py.)
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8_turbo import LLM
from fp8_turbo.engine.lab.accuracy import sequence_logits
from fp8_turbo.engine.checkpoints.fp8 import Fp8CheckpointError, fuse_scales, quantized_tensors, save_quantized, shard_names
from fp8_turbo.engine.model.linear import Linear, QuantConfig
from fp8_turbo.engine.checkpoints.source import iter_checkpoint_tensors, resolve_model
from fp8_turbo.kernels.fp8 import FP8_DTYPE, dequantize_fp8, quantize_weight
from model_factory import VOCAB, make_checkpoint

GRAN = {"fp8-w8a8": "channel", "fp8-tensor": "tensor", "fp8-block": "block", "fp8-weight-only": "channel"}
IDS = torch.randint(3, VOCAB, (24,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    # llama31 style: GQA (q 64 rows, k/v 16 rows each) so block scales of q/k/v straddle shard boundaries
    return make_checkpoint(tmp_path_factory.mktemp("src"), "llama31")


def hf_weights(path) -> dict[str, torch.Tensor]:
    return dict(iter_checkpoint_tensors(resolve_model(str(path))))


def fake_quant_weight(hf: dict, linear: Linear, gran: str) -> torch.Tensor:
    """Reference: every stored shard quantized on its own, dequantized, stacked."""
    return torch.cat([dequantize_fp8(*quantize_weight(hf[f"{s}.weight"], gran)) for s in shard_names(linear.name)])


def linears(llm) -> list[Linear]:
    return [m for m in llm.engine.model.modules() if isinstance(m, Linear)]


def reference_llm(src, scheme: str, ignore=("lm_head",)):
    """Our model of the source checkpoint with every quantized weight replaced by the fake-quant reference."""
    llm = LLM(str(src), device="cpu", quantization=scheme, quantization_ignore=ignore)
    hf = hf_weights(src)
    for m in linears(llm):
        if m.scheme != "none":
            shards = [quantize_weight(hf[f"{s}.weight"], GRAN[scheme]) for s in shard_names(m.name)]
            rows = [q.shape[0] for q, _ in shards]
            m.set_fp8_weight(torch.cat([q for q, _ in shards]), fuse_scales([s for _, s in shards], rows, m.in_features))
            assert torch.equal(m.dequantized_weight(), fake_quant_weight(hf, m, GRAN[scheme])), m.name
    return llm


def assert_same_logits(a, b):
    la, lb = sequence_logits(a, IDS), sequence_logits(b, IDS)
    assert torch.equal(la, lb), f"max difference {(la - lb).abs().max():.3e}: the same weights computed differently"


def test_fp8_round_trip_is_bit_exact(src, tmp_path):
    """quantize -> save -> load: the same e4m3 weights, scales and logits as quantizing in memory."""
    out = save_quantized(str(src), tmp_path / "ckpt", "fp8")
    mem, loaded = LLM(str(src), device="cpu", quantization="fp8"), LLM(str(out), device="cpu")
    for a, b in zip(linears(mem), linears(loaded)):
        assert a.name == b.name and a.scheme == b.scheme
        assert torch.equal(a.dequantized_weight(), b.dequantized_weight()), a.name
        if a.scheme != "none":
            assert torch.equal(a.weight_fp8.view(torch.uint8), b.weight_fp8.view(torch.uint8)), a.name
            assert torch.equal(a.weight_scale, b.weight_scale), a.name
    assert torch.equal(sequence_logits(mem, IDS), sequence_logits(loaded, IDS))


def test_fp8_means_weight_only_on_cpu_but_a_w8a8_checkpoint_runs_w8a8(src, tmp_path, caplog):
    """quantization="fp8" on the CPU quantizes weight-only (the scheme decision, engine.model.schemes);
    a W8A8 checkpoint loaded with the same default still runs W8A8, without a warning; an explicit
    other scheme is overridden by the checkpoint with one."""
    assert LLM(str(src), device="cpu", quantization="fp8").engine.quant_scheme == "fp8-weight-only"
    out = save_quantized(str(src), tmp_path / "w8a8", "fp8-w8a8", ignore=("lm_head",))
    with caplog.at_level("WARNING"):
        loaded = LLM(str(out), device="cpu", quantization="fp8")
    assert not [r for r in caplog.records if "pre-quantized" in r.message]
    assert loaded.engine.quant_scheme == "fp8-w8a8"
    assert {m.scheme for m in linears(loaded) if m.name != "lm_head"} == {"fp8-w8a8"}
    assert_same_logits(loaded, reference_llm(src, "fp8-w8a8"))
    with caplog.at_level("WARNING"):
        assert LLM(str(out), device="cpu", quantization="fp8-block").engine.quant_scheme == "fp8-w8a8"
    assert [r for r in caplog.records if "pre-quantized" in r.message]


@pytest.mark.parametrize("scheme", ["fp8-w8a8", "fp8-tensor", "fp8-block", "fp8-weight-only"])
def test_each_scheme_loads_to_fake_quant_reference(src, tmp_path, scheme):
    out = save_quantized(str(src), tmp_path / scheme, scheme, ignore=("lm_head",))
    loaded, hf = LLM(str(out), device="cpu"), hf_weights(src)
    for m in linears(loaded):
        if m.name == "lm_head":
            assert m.scheme == "none"
            continue
        assert m.scheme == scheme
        assert torch.equal(m.dequantized_weight(), fake_quant_weight(hf, m, GRAN[scheme])), m.name
    assert_same_logits(loaded, reference_llm(src, scheme))


def test_checkpoint_layout_follows_compressed_tensors(src, tmp_path):
    out = save_quantized(str(src), tmp_path / "ckpt", "fp8-block", ignore=("lm_head", "model.layers.1.mlp.down_proj"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert group["weights"]["strategy"] == "block" and group["weights"]["block_structure"] == [128, 128]
    assert group["input_activations"]["strategy"] == "group" and group["input_activations"]["group_size"] == 128
    assert group["input_activations"]["dynamic"] is True
    assert qc["ignore"] == ["model.layers.1.mlp.down_proj", "lm_head"]
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "model.layers.0.self_attn.q_proj.weight" in names and not any("qkv_proj" in n for n in names)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == FP8_DTYPE
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").dtype == torch.float32
        assert tuple(f.get_tensor("model.layers.0.mlp.gate_proj.weight_scale").shape) == (2, 1)  # [ceil(160/128), ceil(64/128)]
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype == torch.float32
        assert "model.layers.1.mlp.down_proj.weight_scale" not in names


def test_ignore_keeps_layers_in_high_precision(src, tmp_path):
    hf = hf_weights(src)
    llm = LLM(str(src), device="cpu", quantization="fp8", quantization_ignore=("lm_head", "*.down_proj"))
    for m in linears(llm):
        assert (m.scheme == "none") == (m.name == "lm_head" or m.name.endswith("down_proj")), m.name
        if m.name.endswith("down_proj"):
            assert torch.equal(m.dequantized_weight(), hf[f"{m.name}.weight"])
    # a compressed-tensors `re:` ignore entry, read back from a checkpoint
    out = save_quantized(str(src), tmp_path / "ckpt", "fp8-w8a8", ignore=("lm_head",))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["lm_head", "re:.*layers\\.0\\.mlp\\.down_proj$"]
    state = dict(iter_checkpoint_tensors(resolve_model(str(out))))
    state["model.layers.0.mlp.down_proj.weight"] = hf["model.layers.0.mlp.down_proj.weight"]
    del state["model.layers.0.mlp.down_proj.weight_scale"]
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    loaded = {m.name: m for m in linears(LLM(str(out), device="cpu"))}
    assert loaded["model.layers.0.mlp.down_proj"].scheme == "none"
    assert loaded["model.layers.1.mlp.down_proj"].scheme == "fp8-w8a8"


def _write_variant(src, out, quant_config: dict, scheme: str, scale_leaf: str, input_scales=None):
    quant = QuantConfig(scheme, ("lm_head",))
    state = dict(quantized_tensors(iter_checkpoint_tensors(resolve_model(str(src))), quant, scale_leaf, input_scales))
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, quantization_config=quant_config)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((src / name).read_bytes())
    return LLM(str(out), device="cpu")


def test_transformers_fp8_block_format(src, tmp_path):
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
          "modules_to_not_convert": ["lm_head"]}
    loaded, hf = _write_variant(src, tmp_path / "hf_fp8", qc, "fp8-block", "weight_scale_inv"), hf_weights(src)
    for m in linears(loaded):
        if m.name != "lm_head":
            assert m.scheme == "fp8-block" and torch.equal(m.dequantized_weight(), fake_quant_weight(hf, m, "block")), m.name
    assert_same_logits(loaded, reference_llm(src, "fp8-block"))


def test_fbgemm_fp8_rowwise_format(src, tmp_path):
    qc = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head", "layers.0.mlp"]}
    quant_cfg_ignore = ("lm_head", "model.layers.0.mlp.*")
    quant = QuantConfig("fp8-w8a8", quant_cfg_ignore)
    state = dict(quantized_tensors(iter_checkpoint_tensors(resolve_model(str(src))), quant))
    out = tmp_path / "fbgemm"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, quantization_config=qc)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((src / name).read_bytes())
    loaded, hf = LLM(str(out), device="cpu"), hf_weights(src)
    for m in linears(loaded):
        kept = m.name == "lm_head" or m.name.startswith("model.layers.0.mlp")
        assert m.scheme == ("none" if kept else "fp8-w8a8"), m.name
        if kept and m.name != "lm_head":
            assert torch.equal(m.dequantized_weight(), torch.cat([hf[f"{s}.weight"] for s in shard_names(m.name)])), m.name
        elif not kept:
            assert torch.equal(m.dequantized_weight(), fake_quant_weight(hf, m, "channel")), m.name
    assert_same_logits(loaded, reference_llm(src, "fp8-w8a8", ("lm_head", "model.layers.0.mlp.*")))


def test_static_input_scale_is_loaded(src, tmp_path):
    names = [m.name for m in linears(LLM(str(src), device="cpu"))]
    scales = {n: torch.tensor([0.01 * (i + 1)]) for i, n in enumerate(names)}
    out = save_quantized(str(src), tmp_path / "static", "fp8-tensor", input_scales=scales)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] is False
    for m in linears(LLM(str(out), device="cpu")):
        if m.scheme != "none":
            assert m.scheme == "fp8-tensor" and torch.equal(m.input_scale, scales[m.name].float()), m.name


def test_fused_scales_are_exact():
    torch.manual_seed(0)
    rows, cols = [64, 16, 16], 200
    ws = [torch.randn(r, cols) * (i + 1) for i, r in enumerate(rows)]
    for gran in ("tensor", "channel", "block"):
        qs = [quantize_weight(w, gran) for w in ws]
        fused = fuse_scales([s for _, s in qs], rows, cols)
        want = torch.cat([dequantize_fp8(q, s) for q, s in qs])
        assert torch.equal(dequantize_fp8(torch.cat([q for q, _ in qs]), fused), want), gran
    # per-tensor scales that differ become per-row; equal ones stay per-tensor
    assert tuple(fuse_scales([torch.tensor([1.0]), torch.tensor([2.0])], [3, 5], 8).shape) == (8, 1)
    assert tuple(fuse_scales([torch.tensor([1.0]), torch.tensor([1.0])], [3, 5], 8).shape) == (1,)
    # 128-aligned block shards concatenate into a block layout
    assert tuple(fuse_scales([torch.ones(1, 2), torch.ones(1, 2)], [128, 100], 200).shape) == (2, 2)


def test_nan_weight_is_a_clear_error(tmp_path):
    path = make_checkpoint(tmp_path / "nan", "llama2")
    state = dict(iter_checkpoint_tensors(resolve_model(str(path))))
    state["model.layers.1.self_attn.k_proj.weight"][3, 5] = float("nan")
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj.*NaN"):
        LLM(str(path), device="cpu", quantization="fp8")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*NaN"):
        save_quantized(str(path), tmp_path / "out", "fp8")


def test_unsupported_and_inconsistent_configs_raise(src, tmp_path):
    out = save_quantized(str(src), tmp_path / "ckpt", "fp8", ignore=("lm_head",))
    cfg = json.loads((out / "config.json").read_text())
    bad = json.loads(json.dumps(cfg))
    bad["quantization_config"]["ignore"] = ["model.layers.0.self_attn.q_proj"]  # only one shard of qkv
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(Fp8CheckpointError, match="some shards"):
        LLM(str(out), device="cpu")
    bad = json.loads(json.dumps(cfg))
    bad["quantization_config"]["ignore"] = ["lm_head", "model.layers.0.mlp.down_proj"]  # but stored as F8
    (out / "config.json").write_text(json.dumps(bad))
    loaded = {m.name: m for m in linears(LLM(str(out), device="cpu"))}
    assert loaded["model.layers.0.mlp.down_proj"].scheme == "none"  # F8 weight dequantized exactly
    bad["quantization_config"]["quant_method"] = "awq"
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(Fp8CheckpointError, match="awq"):
        LLM(str(out), device="cpu")


def test_default_ignore_keeps_the_last_blocks_mlp(src):
    """DEFAULT_IGNORE: lm_head and the last decoder block's MLP stay in high precision (bench/ACCURACY.md)."""
    llm = LLM(str(src), device="cpu", quantization="fp8")
    last = llm.engine.model_config.num_layers - 1
    kept = {m.name for m in linears(llm) if m.scheme == "none"}
    assert kept == {"lm_head", f"model.layers.{last}.mlp.gate_up_proj", f"model.layers.{last}.mlp.down_proj"}
