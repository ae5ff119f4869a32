"""The GGUF container, read without the `gguf` package: metadata and tensor infos, no tensor data.

A GGUF file is: magic, version, tensor count, metadata count; typed key/value metadata; tensor
infos (name, dims innermost first, type, offset); padding to `general.alignment`; tensor data.
gguf.GGUFReader parses the same, but builds numpy views for every element of every metadata
array (the tokenizer's ~100k strings: 1.7 s for SmolLM2); this plain struct walk takes ~0.15 s.

The tokenizer reads its vocabulary and chat template from the metadata; the checkpoint loader
(fp8_turbo/engine/checkpoints/gguf.py) reads the tensor infos and decodes the tensor bytes itself.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types (the spec's numbering) -> struct format of a little-endian scalar
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip


class GGUFError(ValueError):
    """A GGUF file that is missing, malformed or describes something this engine does not run."""


@dataclass(slots=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # HF / torch order (GGUF lists dims innermost first)
    raw_type: int  # ggml tensor type number (gguf.GGMLQuantizationType)
    offset: int  # byte offset of the data from `GGUFHeader.data_start`


@dataclass(slots=True)
class GGUFHeader:
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]  # in file order
    data_start: int  # byte offset of the tensor data
    buf: np.ndarray  # the whole file, uint8, a copy-on-write map


class _Cursor:
    """Sequential little-endian reads from the mapped file."""

    def __init__(self, buf: np.ndarray):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > self.buf.size:
            raise ValueError(f"a string of {n} bytes at offset {self.pos} runs past the end of the file")
        raw = self.buf[self.pos : self.pos + n].tobytes()
        self.pos += n
        return raw.decode("utf-8", errors="replace")  # a few vocabularies hold invalid UTF-8 tokens

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            return self.scalar(_SCALAR_FORMATS[vtype])
        item_type, n = self.scalar("<I"), self.scalar("<Q")
        if item_type in (_STRING, _ARRAY):
            return [self.value(item_type) for _ in range(n)]
        dtype = np.dtype(_SCALAR_FORMATS[item_type])
        values = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
        self.pos += n * dtype.itemsize
        return values


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse a GGUF file's header. Raises GGUFError for a missing, foreign or truncated file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file not found: {path!r}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path!r} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    # Copy-on-write map: arrays are writable (torch.from_numpy wants that), the file never changes.
    buf = np.memmap(path, dtype=np.uint8, mode="c")
    try:
        return _parse(buf, path)
    except GGUFError:
        raise
    except (struct.error, ValueError, IndexError, KeyError) as e:  # the header ran past the end, or garbage
        raise GGUFError(f"{path!r} is not a readable GGUF file (truncated or corrupt?): {e!r}") from e


def _parse(buf: np.ndarray, path: str) -> GGUFHeader:
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path!r}: GGUF version {version} is unsupported (expected 2 or 3, little-endian)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        raw_type, offset = cur.scalar("<I"), cur.scalar("<Q")
        tensors.append(GGUFTensorInfo(name, tuple(reversed(dims)), raw_type, offset))
    alignment = metadata.get("general.alignment", 32)
    data_start = -(-cur.pos // alignment) * alignment  # round up to the alignment
    return GGUFHeader(metadata, tensors, data_start, buf)


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata of a GGUF file as plain Python values (str, int, float, bool, lists of them),
    e.g. `tokenizer.ggml.tokens` or `tokenizer.chat_template`. Raises GGUFError like the loaders."""
    return read_gguf_header(path).metadata
