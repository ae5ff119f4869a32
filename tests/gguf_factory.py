"""Write small Llama GGUF files for tests, the way llama.cpp's convert_hf_to_gguf.py does.

    write_llama_gguf(path, hf_config, state_dict, tensor_type=GGMLQuantizationType.Q8_0)

takes an HF config dict and an HF-named state dict (e.g. `random_llama_state_dict(cfg)` or a
transformers model's `state_dict()`), permutes q_proj/k_proj rows for llama.cpp's rotary, stores
Llama 3 rope scaling as a `rope_freqs.weight` tensor, and quantizes every 2-D weight to `tensor_type`
(1-D norms stay F32, as convert_hf_to_gguf keeps them). gguf.quants quantizes F16/BF16/Q8_0/Q4_0/Q4_1/
Q5_0/Q5_1; it has no K-quant quantizers, so Q4_K and Q6_K use the simple ones below (plain
absmax/min-max rounding, not llama.cpp's search, which is fine for testing dequantization).
"""

import math
import os
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter, RopeScalingType, quants

from fp8_turbo.tokenizer.gguf_header import gguf_metadata

QType = GGMLQuantizationType

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.rest
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def random_llama_state_dict(cfg: dict, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """HF-named random fp32 weights for `cfg` (norm weights around 1, lm_head only when untied)."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_out = cfg["num_attention_heads"] * head_dim
    kv_out = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_out, hidden),
            p + "self_attn.k_proj.weight": (kv_out, hidden),
            p + "self_attn.v_proj.weight": (kv_out, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_out),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    sd = {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=g) * std
        sd[name] = w + 1 if len(shape) == 1 else w
    return sd


def permute_rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's `LlamaModel.permute`: HF's rotate_half layout -> llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """The `rope_freqs.weight` tensor convert_hf_to_gguf writes for llama3 rope scaling.

    (convert_hf_to_gguf reads original_max_position_embeddings from the top level of config.json,
    where Llama 3 configs don't have it, so it always uses 8192; we take the rope_scaling value so that
    test models with a small original context get the divisors transformers uses.)
    """
    rs = cfg["rope_scaling"]
    base = cfg.get("rope_theta", 10000.0)
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rs.get("factor", 8.0)
    low_freq_factor = rs.get("low_freq_factor", 1.0)
    high_freq_factor = rs.get("high_freq_factor", 4.0)
    old_context_len = rs.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Simple K-quant quantizers (byte layouts as in ggml-common.h; gguf.quants only dequantizes these)
# --------------------------------------------------------------------------------------------------


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b == 0, 0, a / b)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """[n, 256] fp32 -> [n, 210] Q6_K blocks: 16 sub-blocks of 16, x ~= d * scale_j * (q - 32)."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    sub_scale = np.abs(sub).max(-1) / 31  # keep q - 32 within [-31, 31]
    d = (sub_scale.max(-1) / 127).astype(np.float16).astype(np.float32)  # [n]
    scales = np.clip(np.rint(_safe_div(sub_scale, d[:, None])), -128, 127).astype(np.int8)  # [n, 16]
    eff = d[:, None] * scales  # [n, 16]
    q = (np.clip(np.rint(_safe_div(sub, eff[..., None])), -32, 31) + 32).astype(np.uint8).reshape(n, 256)
    # element h*128 + s*64 + k: low nibble s of ql[h*64 + k]; element h*128 + s*32 + k: bits 2s of qh[h*32 + k]
    lo = (q & 0x0F).reshape(n, 2, 2, 64)
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
    hi = (q >> 4).reshape(n, 2, 4, 32)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, scales.view(np.uint8), _f16_bytes(d)], axis=1)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """[n, 256] fp32 -> [n, 144] Q4_K blocks: 8 sub-blocks of 32, x ~= d * sc_j * q - dmin * m_j."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    sub_min = np.minimum(sub.min(-1), 0)  # the offset -dmin*m is never positive
    sub_scale = (sub.max(-1) - sub_min) / 15
    d = (sub_scale.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (-sub_min.min(-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(sub_scale, d[:, None])), 0, 63).astype(np.uint8)  # [n, 8]
    m = np.clip(np.rint(_safe_div(-sub_min, dmin[:, None])), 0, 63).astype(np.uint8)  # [n, 8]
    eff_scale, eff_min = d[:, None] * sc, dmin[:, None] * m
    q = np.clip(np.rint(_safe_div(sub + eff_min[..., None], eff_scale[..., None])), 0, 15).astype(np.uint8)
    # 12 scale bytes: [sc0-3 | top bits of sc4-7], [m0-3 | top bits of m4-7], [low nibbles of sc4-7 | m4-7]
    packed = np.concatenate(
        [sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6), (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)],
        axis=1,
    )
    q = q.reshape(n, 4, 2, 32)  # byte chunk c holds sub-block 2c (low nibbles) and 2c+1 (high)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=1)


_K_QUANTIZERS = {QType.Q4_K: quantize_q4_k, QType.Q6_K: quantize_q6_k}


def encode_tensor(w: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """fp32 [out, in] -> (data for GGUFWriter.add_tensor, the type actually used).

    Like convert_hf_to_gguf, a row length that is not a multiple of the block size falls back to F16.
    """
    if qtype == QType.F32:
        return w.astype(np.float32), qtype
    if qtype in (QType.I8, QType.I16, QType.I32):  # not weights: lets tests write unsupported types
        return w.astype({QType.I8: np.int8, QType.I16: np.int16, QType.I32: np.int32}[qtype]), qtype
    block_size, _ = GGML_QUANT_SIZES[qtype]
    if w.shape[-1] % block_size:
        return w.astype(np.float16), QType.F16
    if qtype in _K_QUANTIZERS:
        blocks = _K_QUANTIZERS[qtype](w.reshape(-1, block_size).astype(np.float32))
        return blocks.reshape(*w.shape[:-1], -1), qtype
    return quants.quantize(w.astype(np.float32), qtype), qtype


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


def write_llama_gguf(
    path: str | os.PathLike,
    hf_config: dict,
    state_dict: dict[str, torch.Tensor],
    tensor_type: GGMLQuantizationType = QType.F32,
    tokenizer: dict[str, Any] | str | os.PathLike | None = None,
    *,
    tensor_types: dict[str, GGMLQuantizationType] | None = None,
    arch: str = "llama",
    extra_metadata: dict[str, Any] | None = None,
) -> str:
    """Write `state_dict` (HF names, HF layout) as a llama GGUF at `path`; returns the path.

    tokenizer: a dict of GGUF `tokenizer.*` fields, or the path of a GGUF file to copy them from
        (e.g. the SmolLM2 GGUF, to give a tiny random model a real tokenizer).
    tensor_types: per-HF-name type overrides (e.g. a Q4_K_M-like mix of Q4_K and Q6_K).
    arch / extra_metadata: for testing malformed files (another architecture, extra or odd keys).
    """
    cfg = hf_config
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    tie = cfg.get("tie_word_embeddings", False)

    writer = GGUFWriter(os.fspath(path), arch)
    writer.add_name("tiny-test-llama")
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(int(tensor_type))

    rope_scaling = cfg.get("rope_scaling") or {}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_scaling["factor"])
    elif rope_type == "llama3":
        writer.add_rope_scaling_orig_ctx_len(rope_scaling.get("original_max_position_embeddings", 8192))
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    elif rope_type not in (None, "default"):
        raise ValueError(f"write_llama_gguf: unsupported rope_scaling {rope_scaling}")

    for key, (value, vtype, sub_type) in _tokenizer_fields(cfg, tokenizer).items():
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for key, value in (extra_metadata or {}).items():
        writer.add_key_value(key, value, GGUFValueType.get_type(value))

    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and tie:
            continue  # tied: llama.cpp stores no output.weight
        w = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            w = permute_rotary_rows(w, n_head)
        elif hf_name.endswith("k_proj.weight"):
            w = permute_rotary_rows(w, n_kv)
        qtype = (tensor_types or {}).get(hf_name, tensor_type if w.ndim == 2 else QType.F32)
        data, used = encode_tensor(w, qtype)
        writer.add_tensor(gguf_tensor_name(hf_name), data, raw_dtype=used if data.dtype == np.uint8 else None)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


def _tokenizer_fields(cfg: dict, tokenizer: dict | str | os.PathLike | None) -> dict[str, tuple]:
    """GGUF key -> (value, type, array element type) for tokenizer.* keys, bos/eos from `cfg` winning."""
    if tokenizer is not None and not isinstance(tokenizer, dict):
        # gguf_metadata parses in 0.15 s what GGUFReader takes 2 s for (SmolLM2's 100k strings)
        tokenizer = {k: v for k, v in gguf_metadata(tokenizer).items() if k.startswith("tokenizer.")}
    fields: dict[str, tuple] = {}
    for key, value in (tokenizer or {}).items():
        vtype = GGUFValueType.get_type(value)
        sub = GGUFValueType.get_type(value[0]) if vtype == GGUFValueType.ARRAY and value else None
        if key.endswith("_token_id"):
            vtype = GGUFValueType.UINT32  # as llama.cpp writes token ids
        fields[key] = (value, vtype, sub)
    # HF's eos list [eos, eot, eom] maps onto GGUF's eos / eot / eom ids
    eos = cfg.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    ids = {"tokenizer.ggml.bos_token_id": cfg.get("bos_token_id")}
    ids |= dict(zip(("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"), eos_ids))
    for key, value in ids.items():
        if value is not None:
            fields[key] = (int(value), GGUFValueType.UINT32, None)
    return fields
