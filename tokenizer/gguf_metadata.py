"""Scalar metadata of a GGUF file, read from its header only.

The tokenizer needs a handful of scalars (special token ids, the chat template). `gguf.GGUFReader`
parses every array element of the header into its own numpy view, which takes seconds for a
128k-token vocabulary; this reader walks the key/value section with `struct` and skips arrays.
Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 kv count, then
kv pairs: string key, u32 value type, value. Strings are a u64 byte length and UTF-8 bytes.
"""
from __future__ import annotations

import mmap
import struct
from os import PathLike

# value type -> struct format of one element (strings and arrays are handled apart)
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9


class GGUFArray(int):
    """Stands in for an array value that was skipped; its value is the element count."""


def read_gguf_metadata(path: str | PathLike) -> dict[str, object]:
    """Every key/value of the GGUF header; arrays come back as `GGUFArray(count)`.

    Raises ValueError for a file that is not GGUF, an old (v1) GGUF, or a truncated header.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _read_header(buf, path)
            except struct.error as e:
                raise ValueError(f"{path}: truncated or corrupt GGUF header ({e})") from None


def _read_header(buf: mmap.mmap, path: str | PathLike) -> dict[str, object]:
    (version,) = struct.unpack_from("<I", buf, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
    _tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
    pos = 24
    metadata: dict[str, object] = {}
    for _ in range(kv_count):
        key, pos = _read_string(buf, pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        value, pos = _read_value(buf, pos + 4, value_type)
        metadata[key] = value
    return metadata


def _read_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    start = pos + 8
    if start + length > len(buf):
        raise struct.error(f"string of {length} bytes at byte {pos} runs past the end of the file")
    return buf[start:start + length].decode("utf-8", errors="replace"), start + length


def _read_value(buf: mmap.mmap, pos: int, value_type: int) -> tuple[object, int]:
    if value_type == _STRING:
        return _read_string(buf, pos)
    if value_type == _ARRAY:
        element_type, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if element_type in _SCALAR_FORMATS:
            return GGUFArray(count), pos + count * struct.calcsize(_SCALAR_FORMATS[element_type])
        for _ in range(count):  # strings or nested arrays: variable size, walk them
            _, pos = _read_value(buf, pos, element_type)
        return GGUFArray(count), pos
    if value_type not in _SCALAR_FORMATS:
        raise ValueError(f"unknown GGUF metadata value type {value_type} at byte {pos}")
    fmt = _SCALAR_FORMATS[value_type]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
