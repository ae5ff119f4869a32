"""What `quantization="fp8"` means per backend (engine.model.schemes), the finer schemes end to end on a
tiny model, and the start-up log that says which scheme runs."""
from __future__ import annotations

import logging

import pytest
import torch

from fp8_turbo import LLM
from fp8_turbo.engine.core.engine_config import EngineConfig
from fp8_turbo.engine.core.memory_plan import weight_bytes
from fp8_turbo.engine.lab.accuracy import sequence_logits
from fp8_turbo.engine.model import schemes
from fp8_turbo.engine.model.config import ModelConfig
from fp8_turbo.engine.model.linear import Linear, QuantConfig
from fp8_turbo.engine.model.model import LlamaModel
from fp8_turbo.engine.model.parallel import check_tensor_parallel
from fp8_turbo.engine.model.schemes import SCHEMES, fp8_scheme, resolve_scheme
from fp8_turbo.engine.serving.scheme import served_scheme
from fp8_turbo.kernels.fp8 import dequantize_fp8, quantize_weight
from fp8_turbo.kernels.quantize import fake_quantize_fp8
from model_factory import hf_config_dict, make_checkpoint

FINER = [s for s in SCHEMES if s.endswith(("-g32", "-g64", "-g128", "-mx"))]


def test_fp8_means_weight_only_on_cpu_and_w8a8_on_fp8_gpus(monkeypatch):
    assert fp8_scheme("cpu")[0] == "fp8-weight-only"
    assert resolve_scheme("fp8", "cpu") == "fp8-weight-only" and resolve_scheme(None) == "none"
    assert resolve_scheme("fp8-w8a8", "cpu") == "fp8-w8a8"  # a name runs as named on every backend
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, scheme in [((9, 0), "fp8-w8a8"), ((8, 9), "fp8-w8a8"), ((10, 0), "fp8-w8a8"),
                               ((8, 0), "fp8-weight-only"), ((7, 5), "fp8-weight-only")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert fp8_scheme("cuda")[0] == scheme, capability
    monkeypatch.setattr(schemes, "CPU_FP8_SCHEME", "fp8-w8a8")  # the one switch a CPU benchmark flips
    assert fp8_scheme("cpu")[0] == "fp8-w8a8"


def test_quant_config_resolves_and_remembers_the_request():
    q = QuantConfig("fp8", device="cpu")
    assert q.scheme == "fp8-weight-only" and q.requested == "fp8" and q.is_alias
    assert q.describe().startswith("fp8 -> fp8-weight-only (CPU")
    assert q.for_model(4).scheme == "fp8-weight-only" and q.for_model(4).is_alias
    named = QuantConfig("fp8-w8a8-mx")
    assert named.scheme == "fp8-w8a8-mx" and not named.is_alias and named.describe() == "fp8-w8a8-mx"
    with pytest.raises(ValueError, match="quantization must be one of"):
        QuantConfig("fp8-g32")
    for name in ("fp8", *SCHEMES):
        EngineConfig(model="x", quantization=name)
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(model="x", quantization="int8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # hidden 64 and intermediate 160: K = 64 and 160, so 1x32 / 1x64 / 1x128 groups are whole and ragged
    return make_checkpoint(tmp_path_factory.mktemp("schemes"), "llama31")


IDS = [1, 17, 42, 99, 7, 250, 3, 3, 81, 12, 300, 64]


@pytest.mark.parametrize("scheme", FINER)
def test_finer_schemes_run_their_reference(tiny, scheme):
    """Each finer scheme on the CPU kernels == the same model on the torch reference (dequantized weight,
    fake-quantized activations with the scheme's groups and power-of-two scales) within fp32
    summation order; its weights are the kernels.fp8 quantization of the checkpoint's."""
    spec = SCHEMES[scheme]
    llm = LLM(str(tiny), device="cpu", quantization=scheme, lm_head_dtype="model")
    assert llm.engine.quant_scheme == scheme
    card = served_scheme(llm.engine)  # the model card of /v1/models names the finer layout
    assert card["scheme"] == scheme and f"per 1x{spec.group}" in card["weights"]
    ref = LLM(str(tiny), device="cpu", quantization="none", lm_head_dtype="model")
    quantized = [m for m in llm.engine.model.modules() if isinstance(m, Linear) and m.scheme != "none"]
    assert quantized and all(m.scheme == scheme for m in quantized)
    ref_linears = {x.name: x for x in ref.engine.model.modules() if isinstance(x, Linear)}
    for m in quantized:
        r = ref_linears[m.name]
        q, s = quantize_weight(r.weight.data, spec.weight, spec.group)
        assert torch.equal(m.weight_fp8.view(torch.uint8), q.view(torch.uint8)) and torch.equal(m.weight_scale, s)
        if spec.weight == "mx":
            assert m.weight_scale.dtype == torch.float8_e8m0fnu
        # the torch reference of this layer: the model computes it with these weights
        r.weight.data = dequantize_fp8(q, s)
        if spec.act is not None:
            r.register_forward_pre_hook(lambda mod, args, spec=spec: (
                fake_quantize_fp8(args[0], spec.act, spec.group, pow2=spec.act_pow2),))
    ours, theirs = sequence_logits(llm, IDS), sequence_logits(ref, IDS)
    # fp32 summation order only, per layer; through 2 layers the logits agree to ~1e-5 relative, unless an
    # activation lands on the other side of an e4m3 rounding boundary (W8A8): allow that one flip
    tol = (2e-3 if spec.act else 1e-4) * theirs.abs().max()
    assert (ours - theirs).abs().max() <= tol, (ours - theirs).abs().max()


def test_weight_bytes_count_finer_scales():
    cfg = ModelConfig.from_hf_dict(hf_config_dict("llama31", hidden_size=256, layers=2))
    bytes_of = {}
    for scheme in ("fp8-weight-only", "fp8-weight-only-g32", "fp8-weight-only-g128", "fp8-weight-only-mx"):
        with torch.device("meta"):
            model = LlamaModel(cfg, QuantConfig(scheme, ("lm_head",)))
        bytes_of[scheme] = weight_bytes(model, torch.float32)
    shapes = [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, Linear) and m.scheme != "none"]
    assert any(k % 128 for _, k in shapes)  # a ragged last group (intermediate 544)

    def groups(g):
        return sum(n * -(-k // g) for n, k in shapes)
    base = bytes_of["fp8-weight-only"] - 4 * sum(n for n, _ in shapes)  # everything but the per-channel scales
    assert bytes_of["fp8-weight-only-g32"] == base + 4 * groups(32)
    assert bytes_of["fp8-weight-only-g128"] == base + 4 * groups(128)
    assert bytes_of["fp8-weight-only-mx"] == base + groups(32)  # one E8M0 byte per 32 weights


def test_tensor_parallel_needs_whole_groups():
    cfg = ModelConfig.from_hf_dict(hf_config_dict("llama31", hidden_size=64, overrides={"intermediate_size": 192}))
    check_tensor_parallel(cfg, 2, "fp8-weight-only-g32")  # 96 input columns per rank: 3 groups of 32
    with pytest.raises(ValueError, match="multiple of 64"):
        check_tensor_parallel(cfg, 2, "fp8-w8a8-g64")


def test_engine_logs_which_scheme_runs(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="fp8_turbo"):
        LLM(str(tiny), device="cpu", quantization="fp8")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quantization:")]
    assert lines == [f"quantization: fp8 -> fp8-weight-only ({fp8_scheme('cpu')[1]})"]
