"""A pre-quantized, sharded FP8 checkpoint streams into the model in e4m3: the weights resident while
loading never exceed the FP8 model plus one layer (they used to be staged in high precision: ~125 GiB
of bf16 for Llama-3.3-70B, an out-of-memory on an 80 GB GPU).

Measured on the CPU through the loader's own code path (engine.checkpoints.loader.build_model), with
`Linear.set_fp8_weight` doing what it does on CUDA (keep the e4m3 weight, drop the high-precision one;
the CPU path keeps a dequantized fp32 copy by design). After every checkpoint tensor the bytes held by
the model's materialized parameters and e4m3 weights are summed; the peak is compared with the final
model. On a GPU, scripts/gpu_check.py does not repeat this (torch.cuda.max_memory_allocated would).
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

import fp8_turbo.engine.checkpoints.loader as loader
from fp8_turbo.engine.checkpoints.fp8 import compressed_tensors_config, quantized_tensors
from fp8_turbo.engine.checkpoints.source import iter_checkpoint_tensors, read_hf_config, resolve_model
from fp8_turbo.engine.model.config import ModelConfig
from fp8_turbo.engine.model.linear import Linear, QuantConfig
from model_factory import make_checkpoint


def write_sharded_fp8(src, out, shards: int = 3):
    """`src` quantized to compressed-tensors fp8 (per-channel), split over `shards` safetensors files."""
    cfg_dict = read_hf_config(resolve_model(str(src)))
    quant = QuantConfig("fp8-w8a8", ("lm_head",))
    state = dict(quantized_tensors(iter_checkpoint_tensors(resolve_model(str(src))), quant))
    names = sorted(state)
    out.mkdir(parents=True)
    weight_map = {}
    for i in range(shards):
        part = {n: state[n].contiguous() for n in names[i::shards]}
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ignored = ["lm_head"]
    (out / "config.json").write_text(json.dumps(dict(cfg_dict, quantization_config=compressed_tensors_config("fp8-w8a8", ignored))))
    return out


def resident_bytes(model) -> int:
    total, seen = 0, set()
    tensors = list(model.parameters()) + [m.weight_fp8 for m in model.modules() if isinstance(m, Linear)]
    for t in tensors:
        if t is None or t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def test_fp8_checkpoint_peak_is_fp8_weights_plus_one_layer(tmp_path, monkeypatch):
    src = make_checkpoint(tmp_path / "src", "llama31", hidden_size=128, layers=6)
    ckpt = write_sharded_fp8(src, tmp_path / "fp8")

    def keep_e4m3(self, w_fp8, scale):  # Linear.set_fp8_weight on CUDA
        self.weight_fp8, self.weight_scale, self.weight = w_fp8, scale.float(), None

    monkeypatch.setattr(Linear, "set_fp8_weight", keep_e4m3)
    built, samples = [], []

    class Recording(loader.LlamaModel):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    def measured(source, select=None):
        for item in iter_checkpoint_tensors(source, select):
            if built:
                samples.append(resident_bytes(built[0]))
            yield item

    monkeypatch.setattr(loader, "LlamaModel", Recording)
    monkeypatch.setattr(loader, "iter_checkpoint_tensors", measured)
    source = resolve_model(str(ckpt))
    cfg = ModelConfig.from_hf_dict(read_hf_config(source))
    model = loader.build_model(source, cfg, QuantConfig("fp8"), torch.device("cpu"), torch.float32)
    final = resident_bytes(model)
    fp8_linears = [m for m in model.modules() if isinstance(m, Linear) and m.weight_fp8 is not None]
    assert fp8_linears and all(m.weight is None and m.weight_fp8.dtype == torch.float8_e4m3fn for m in fp8_linears)
    layer_hp = max(m.out_features * m.in_features * 4 for m in fp8_linears)  # one layer in fp32
    staged_hp = sum(m.out_features * m.in_features * 4 for m in fp8_linears)  # the old high-precision staging
    peak = max(samples + [final])
    assert peak <= final + layer_hp, (peak, final, layer_hp)
    assert peak < final + staged_hp / 2  # far below staging the linear weights in high precision
