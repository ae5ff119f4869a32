"""Read Llama GGUF files (llama.cpp's format) as an HF config dict and HF-named fp tensors.

`gguf_hf_config(path)` builds the `config.json` equivalent from GGUF metadata;
`iter_gguf_tensors(path)` yields `(hf_name, tensor)` one tensor at a time, dequantized and with
llama.cpp's rotary row permutation of q_proj/k_proj undone, so the rest of the engine sees exactly
what an HF checkpoint holds; `gguf_metadata(path)` gives every metadata key (tokenizer included).

Rope scaling: llama.cpp stores linear scaling as `llama.rope.scaling.{type,factor}`, but Llama 3's
scaling as a `rope_freqs.weight` tensor of per-frequency divisors (convert_hf_to_gguf computes it from
factor, low/high_freq_factor and original_max_position_embeddings). We recover those four parameters
from the tensor (see `_llama3_rope_scaling`) and check that they reproduce it; `rope_freqs.weight`
itself is not yielded as a weight.
"""

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from tqdm import tqdm

from fp8_turbo.tokenizer.gguf_header import GGUFError, gguf_metadata, read_gguf_header

ROPE_FREQS = "rope_freqs.weight"

# GGUF tensor name -> HF name (per layer: "blk.{i}." -> "model.layers.{i}.")
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


# --------------------------------------------------------------------------------------------------
# Reading the file: the header parser is shared with the tokenizer (fp8_turbo/tokenizer/gguf_header.py); here
# each tensor info gets its bytes, whose size follows from the ggml type's block layout.
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # HF / torch order
    qtype: GGMLQuantizationType
    data: np.ndarray  # the raw bytes, uint8 [nbytes], a view of the file map


@dataclass(slots=True)
class _GGUFFile:
    metadata: dict[str, Any]
    tensors: dict[str, _TensorInfo]  # in file order


def _read_gguf(path: str | os.PathLike) -> _GGUFFile:
    header = read_gguf_header(path)
    path, buf = os.fspath(path), header.buf
    tensors = {}
    for info in header.tensors:
        try:
            qtype = GGMLQuantizationType(info.raw_type)
        except ValueError:
            raise GGUFError(f"tensor {info.name!r} in {path!r} has unknown GGUF tensor type #{info.raw_type}") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(info.shape) // block_size * type_size
        start = header.data_start + info.offset
        if start + nbytes > buf.size:
            raise GGUFError(f"{path!r} is truncated: tensor {info.name!r} ends at byte {start + nbytes}, file has {buf.size}")
        tensors[info.name] = _TensorInfo(info.name, info.shape, qtype, buf[start : start + nbytes])
    return _GGUFFile(header.metadata, tensors)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def _float32(value: float) -> float:
    # GGUF stores floats as float32: give back the shortest decimal that rounds to the same float32,
    # i.e. what config.json said (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


class _Metadata:
    """Typed, validated access to the `llama.*` and `tokenizer.*` keys of one file."""

    def __init__(self, gguf: _GGUFFile, path: str | os.PathLike):
        self.values, self.path = gguf.metadata, os.fspath(path)
        arch = self.values.get("general.architecture")
        if arch != "llama":
            raise GGUFError(f"unsupported GGUF architecture {arch!r} in {self.path!r}: only 'llama' is supported")

    def get(self, key: str, default: Any = None) -> Any:
        value = self.values.get(key, default)
        # some GGUFs store per-layer arrays (e.g. head_count_kv); a Llama needs one value
        if isinstance(value, list) and key.startswith("llama."):
            if len(set(value)) != 1:
                raise GGUFError(f"{key} varies per layer ({value}) in {self.path!r}: only uniform layers are supported")
            value = value[0]
        return value

    def require(self, key: str) -> Any:
        if key not in self.values:
            raise GGUFError(f"GGUF metadata of {self.path!r} is missing required key {key!r}")
        return self.get(key)

    def heads(self) -> tuple[int, int]:
        n_head = int(self.require("llama.attention.head_count"))
        return n_head, int(self.get("llama.attention.head_count_kv", n_head))


def gguf_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The HF `config.json` equivalent of a Llama GGUF file, built from its metadata."""
    gguf = _read_gguf(path)
    meta = _Metadata(gguf, path)
    if "token_embd.weight" not in gguf.tensors:
        raise GGUFError(f"{os.fspath(path)!r} has no token_embd.weight tensor")

    hidden = int(meta.require("llama.embedding_length"))
    n_head, n_kv = meta.heads()
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_head))
    rope_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(f"llama.rope.dimension_count={rope_dim} != head_dim={head_dim}: partial rotary is unsupported")
    value_dim = int(meta.get("llama.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise GGUFError(f"llama.attention.value_length={value_dim} != key_length={head_dim}: unsupported")
    vocab = int(meta.get("llama.vocab_size", gguf.tensors["token_embd.weight"].shape[0]))
    rope_theta = _float32(meta.get("llama.rope.freq_base", 10000.0))

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(meta.require("llama.feed_forward_length")),
        "num_hidden_layers": int(meta.require("llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _float32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(meta, gguf.tensors.get(ROPE_FREQS), rope_theta, head_dim),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_token_ids(meta),
    }


def _eos_token_ids(meta: _Metadata) -> int | list[int] | None:
    # GGUF has one eos id plus optional end-of-turn / end-of-message ids (Llama 3's <|eot_id|> and
    # <|eom_id|>); HF lists them all in eos_token_id. One id stays an int, as in most config.json files.
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = meta.get(key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def _rope_scaling(meta: _Metadata, rope_freqs: _TensorInfo | None, rope_theta: float, head_dim: int) -> dict | None:
    kind = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor")
    if kind is None and meta.get("llama.rope.scale_linear") is not None:
        kind, factor = "linear", meta.get("llama.rope.scale_linear")  # pre-2024 key
    if rope_freqs is not None:
        if kind not in (None, "none"):
            raise GGUFError(f"GGUF has both {ROPE_FREQS} and llama.rope.scaling.type={kind!r}")
        divisors = dequantize(rope_freqs.data, rope_freqs.qtype).to(torch.float64)
        original = int(meta.get("llama.rope.scaling.original_context_length", 8192))
        return _llama3_rope_scaling(divisors, rope_theta, head_dim, original)
    if kind in (None, "none") or (kind == "linear" and float(factor) == 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32(factor)}
    raise GGUFError(f"unsupported rope scaling llama.rope.scaling.type={kind!r} (supported: none, linear, llama3)")


def _llama3_rope_scaling(freq_divisors: torch.Tensor, rope_theta: float, head_dim: int, original: int) -> dict | None:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's `rope_freqs` divisors.

    convert_hf_to_gguf computes, for each inverse frequency f with wavelength w = 2*pi/f:
    1 if w < L/high, `factor` if w > L/low, else 1 / ((1 - s)/factor + s) with s = (L/w - low)/(high - low),
    where L = original_max_position_embeddings. So `factor` is the largest divisor, and in the smooth band
    s is linear in 1/w: s = a/w - b with a = L/(high - low), b = low/(high - low). (L, low, high) scaled
    together give the same divisors, so L is `original` (the GGUF's rope.scaling.original_context_length,
    else Llama 3's 8192) and low/high follow from a and b. The result is checked against the divisors.
    """
    if freq_divisors.numel() != head_dim // 2:
        raise GGUFError(f"{ROPE_FREQS} has {freq_divisors.numel()} entries, expected head_dim/2 = {head_dim // 2}")
    if torch.allclose(freq_divisors, torch.ones_like(freq_divisors)):
        return None
    factor = _float32(freq_divisors.max().item())
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    inv_wavelen = inv_freq / (2 * math.pi)
    smooth = (1 / freq_divisors - 1 / factor) / (1 - 1 / factor)
    band = (freq_divisors > 1 + 1e-4) & (freq_divisors < factor * (1 - 1e-4))
    if int(band.sum()) < 2:
        raise GGUFError(f"cannot recover llama3 rope scaling from {ROPE_FREQS}: fewer than 2 smoothed frequencies")
    # least squares for s = a * (1/w) - b over the smooth band
    lhs = torch.stack([inv_wavelen[band], -torch.ones_like(inv_wavelen[band])], dim=1)
    a, b = torch.linalg.lstsq(lhs, smooth[band].unsqueeze(1)).solution.flatten().tolist()
    low = b * original / a
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": round(low, 6),
        "high_freq_factor": round(low + original / a, 6),
        "original_max_position_embeddings": original,
    }
    rebuilt = llama3_rope_freq_divisors(scaling, rope_theta, head_dim)
    if not torch.allclose(rebuilt, freq_divisors, rtol=1e-4, atol=0):
        raise GGUFError(f"{ROPE_FREQS} does not match llama3 rope scaling (best fit {scaling})")
    return scaling


def llama3_rope_freq_divisors(scaling: dict, rope_theta: float, head_dim: int) -> torch.Tensor:
    """llama.cpp's `rope_freqs` tensor for an HF llama3 rope_scaling dict (as convert_hf_to_gguf writes it)."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    original = scaling.get("original_max_position_embeddings", 8192)
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    divisors = 1 / ((1 - smooth) / factor + smooth)
    divisors = torch.where(wavelen < original / high, torch.ones_like(wavelen), divisors)
    return torch.where(wavelen > original / low, torch.full_like(wavelen, factor), divisors)


# --------------------------------------------------------------------------------------------------
# Dequantization
# --------------------------------------------------------------------------------------------------


# Vectorized torch versions of ggml's block formats (ggml-common.h); gguf.quants has numpy
# equivalents that the tests compare against bit for bit. On SmolLM2 (2-core CPU) torch takes
# 0.18 s with 2 threads / 0.36 s with 1 against gguf.quants' 0.61 s; other types gguf.quants knows
# (Q5_*, Q2_K, Q3_K, Q5_K, IQ*) fall back to it.
# Each function maps [n_blocks, type_size] uint8 -> [n_blocks, block_size] fp32.


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 (little-endian fp16 bytes) -> [n, 1] fp32."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., k] uint8 -> [..., 2, k]: low nibbles, then high nibbles (ggml's element order)."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: fp16 scale, then 32 int8 values
    return _f16(blocks[:, :2]) * blocks[:, 2:].contiguous().view(torch.int8).float()


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # d, then 16 bytes: element i in the low nibble of byte i, element i+16 in its high nibble
    q = _nibbles(blocks[:, 2:]).reshape(-1, 32).float() - 8
    return _f16(blocks[:, :2]) * q


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # d, m (min), then nibbles as in Q4_0 without the -8 offset
    q = _nibbles(blocks[:, 4:]).reshape(-1, 32).float()
    return _f16(blocks[:, :2]) * q + _f16(blocks[:, 2:4])


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # super-block of 256 = 8 sub-blocks of 32: d, dmin (fp16), 12 bytes packing eight 6-bit scales
    # and eight 6-bit mins, then 128 bytes of nibbles (byte chunk c holds sub-blocks 2c and 2c+1).
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    packed = blocks[:, 4:16].reshape(n, 3, 4)
    lo, hi, mixed = packed[:, 0], packed[:, 1], packed[:, 2]
    # sub-blocks 0-3: low 6 bits of lo/hi; 4-7: low/high nibble of `mixed` + top 2 bits of lo/hi
    scale = torch.cat((lo & 0x3F, (mixed & 0x0F) | ((lo >> 2) & 0x30)), dim=1).float()  # [n, 8]
    mins = torch.cat((hi & 0x3F, (mixed >> 4) | ((hi >> 2) & 0x30)), dim=1).float()  # [n, 8]
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return ((d * scale).unsqueeze(-1) * q - (dmin * mins).unsqueeze(-1)).reshape(n, 256)


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # super-block of 256 = 16 sub-blocks of 16: 128 bytes low nibbles (ql), 64 bytes of 2-bit high
    # parts (qh), 16 int8 sub-block scales, fp16 d. Element h*128 + s*32 + k (h<2, s<4, k<32) takes
    # its low 4 bits from ql[h*64 + (s%2)*32 + k] (nibble s//2) and its high 2 from bits 2s of qh[h*32 + k].
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, :128].reshape(n, 2, 64)).reshape(n, 256)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = ((qh >> shifts) & 0x03).reshape(n, 256)
    q = (ql | (qh << 4)).float() - 32
    scale = blocks[:, 192:208].contiguous().view(torch.int8).float() * _f16(blocks[:, 208:210])  # [n, 16]
    return (scale.unsqueeze(-1) * q.reshape(n, 16, 16)).reshape(n, 256)


_DEQUANT = {
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    GGMLQuantizationType.Q4_K: _dequant_q4_k,
    GGMLQuantizationType.Q6_K: _dequant_q6_k,
}
_BLOCKS_PER_CHUNK = 1 << 16  # bounds the fp32 temporaries when dequantizing a huge tensor


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Raw GGUF tensor bytes (any shape; reinterpreted as uint8) -> flat fp32 tensor.

    Raises NotImplementedError for a type neither this module nor gguf.quants can dequantize.
    """
    raw = raw.reshape(-1).view(np.uint8)
    if qtype == GGMLQuantizationType.F32:
        return torch.from_numpy(raw).view(torch.float32).clone()  # clone: not backed by the file map
    if qtype == GGMLQuantizationType.F16:
        return torch.from_numpy(raw).view(torch.float16).float()
    if qtype == GGMLQuantizationType.BF16:
        return torch.from_numpy(raw).view(torch.bfloat16).float()
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if (fn := _DEQUANT.get(qtype)) is None:
        # gguf.quants loops over groups of 16 rows: hand it all blocks as one row
        values = quants.dequantize(raw.reshape(1, -1), qtype)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(-1)
    blocks = torch.from_numpy(raw).reshape(-1, type_size)
    out = torch.empty(blocks.shape[0], block_size)
    for start in range(0, blocks.shape[0], _BLOCKS_PER_CHUNK):
        out[start : start + _BLOCKS_PER_CHUNK] = fn(blocks[start : start + _BLOCKS_PER_CHUNK])
    return out.reshape(-1)


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[suffix]}"
    raise GGUFError(f"unexpected tensor {gguf_name!r} in a llama GGUF (biases and extra tensors are unsupported)")


def unpermute_rotary_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's `permute` of q_proj/k_proj rows.

    HF's rotary pairs dimension i with i + head_dim/2 (rotate_half); llama.cpp pairs adjacent
    dimensions (2i, 2i+1), so the converter interleaves each head's two halves. Reverse it:
    per head, rows [h0_0, h1_0, h0_1, h1_1, ...] -> [h0_0, h0_1, ..., h1_0, h1_1, ...].
    """
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _dequantize_slice(t: _TensorInfo, spec: tuple[int, int, int] | None) -> torch.Tensor:
    """Dequantize tensor `t`, or only rows/columns start:stop of it (spec = (dim, start, stop)): the
    bytes of those rows, or of those blocks of every row when the columns fall on block edges."""
    if spec is None:
        return dequantize(t.data, t.qtype).reshape(t.shape)
    dim, start, stop = spec
    rows, cols = t.shape
    block_size, type_size = GGML_QUANT_SIZES[t.qtype]
    per_row = t.data.reshape(rows, cols // block_size * type_size)
    if dim == 0:
        return dequantize(per_row[start:stop], t.qtype).reshape(stop - start, cols)
    if start % block_size == 0 and stop % block_size == 0:
        raw = np.ascontiguousarray(per_row[:, start // block_size * type_size : stop // block_size * type_size])
        return dequantize(raw, t.qtype).reshape(rows, stop - start)
    # columns inside a block (e.g. a 256-wide K-quant block): dequantize rows in chunks, keep the columns
    chunk = max(1, (1 << 22) // cols)
    return torch.cat([dequantize(per_row[r : r + chunk], t.qtype).reshape(-1, cols)[:, start:stop]
                      for r in range(0, rows, chunk)])


@torch.inference_mode()
def iter_gguf_tensors(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = True,
    select: Callable[[str, tuple[int, ...]], tuple[int, int, int] | None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every weight of a Llama GGUF, one at a time, in file order.

    Tensors have HF checkpoint shapes ([out, in] for linears) and `dtype`; `lm_head.weight` only
    appears when the file has `output.weight` (otherwise embeddings are tied). `select(hf_name, shape)`
    may ask for a slice (dim, start, stop) of a 2-D tensor: only its bytes are dequantized.
    """
    gguf = _read_gguf(path)
    n_head, n_kv = _Metadata(gguf, path).heads()
    tensors = [t for t in gguf.tensors.values() if t.name != ROPE_FREQS]  # rope_freqs is config (module doc)
    for t in tqdm(tensors, desc=f"Loading {os.path.basename(os.fspath(path))}", unit="tensor", disable=not progress):
        hf_name = _hf_name(t.name)
        spec = select(hf_name, t.shape) if select is not None and len(t.shape) == 2 else None
        try:
            w = _dequantize_slice(t, spec)
        except NotImplementedError as e:
            raise GGUFError(f"tensor {t.name!r} has unsupported GGUF tensor type {t.qtype.name}") from e
        # The rotary permutation is within each head, and a slice of q/k rows holds whole heads.
        if hf_name.endswith("q_proj.weight"):
            w = unpermute_rotary_rows(w, n_head * w.shape[0] // t.shape[0])
        elif hf_name.endswith("k_proj.weight"):
            w = unpermute_rotary_rows(w, n_kv * w.shape[0] // t.shape[0])
        yield hf_name, w.to(dtype)
