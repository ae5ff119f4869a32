"""`load_tokenizer(path)`: a `Tokenizer` from an HF checkpoint directory or a GGUF file, offline.

- HF directory: transformers' AutoTokenizer on tokenizer.json + tokenizer_config.json (chat template
  from tokenizer_config.json, chat_template.jinja or chat_template.json); extra eos ids from
  generation_config.json and config.json (either may hold a list).
- GGUF file: transformers builds the fast tokenizer from the GGUF vocabulary, merges and token types
  (`PreTrainedTokenizerFast.from_pretrained(dir, gguf_file=name)`, ~0.3 s; `AutoTokenizer` would also
  parse the whole file for the model config, ~3 s). Chat template from `tokenizer.chat_template`;
  bos/eos/eot/eom ids from `tokenizer.ggml.*` metadata.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fp8_turbo.tokenizer.gguf_header import gguf_metadata
from fp8_turbo.tokenizer.tokenizer import Tokenizer

# Any one of these makes a directory loadable by AutoTokenizer (tokenizer.json is the fast path).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer of the checkpoint at `path` (an HF directory or a .gguf file). Never downloads.

    Raises FileNotFoundError for a missing path or a directory without tokenizer files, and
    ValueError for a file that is not GGUF or a GGUF whose tokenizer transformers cannot build.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    if path.is_dir():
        return _load_hf_dir(path)
    return _load_gguf(path)


def _load_hf_dir(path: Path) -> Tokenizer:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {path}: expected one of {', '.join(TOKENIZER_FILES)} (with tokenizer_config.json)"
        )
    hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not hf.chat_template:
        hf.chat_template = _chat_template_json(path / "chat_template.json")
    extra_eos = [*_json_ids(path / "generation_config.json", "eos_token_id"),
                 *_json_ids(path / "config.json", "eos_token_id")]
    return Tokenizer(hf, extra_eos_ids=extra_eos)


def _chat_template_json(file: Path) -> str | dict[str, str] | None:
    """The template in chat_template.json (which transformers 5 no longer reads): a string, or a list of
    {"name", "template"} entries (returned as a dict, as transformers keeps named templates)."""
    if not file.is_file():
        return None
    template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        return {entry["name"]: entry["template"] for entry in template}
    return template


def _json_ids(file: Path, key: str) -> list[int]:
    """The int or list of ints under `key` in a JSON file; [] when the file or key is absent."""
    if not file.is_file():
        return []
    value = json.loads(file.read_text(encoding="utf-8")).get(key)
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _load_gguf(path: Path) -> Tokenizer:
    metadata = gguf_metadata(path)  # raises GGUFError (a ValueError) for a file that is not GGUF
    if "tokenizer.ggml.model" not in metadata:
        raise ValueError(f"{path}: GGUF file has no tokenizer (no tokenizer.ggml.model metadata)")
    try:
        hf = PreTrainedTokenizerFast.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ValueError(
            f"{path}: cannot build the tokenizer from GGUF metadata "
            f"(tokenizer.ggml.model={metadata['tokenizer.ggml.model']!r}): {e}"
        ) from e
    eos = [metadata[k] for k in ("tokenizer.ggml.eos_token_id",) if k in metadata]
    stops = [metadata[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in metadata]
    return Tokenizer(hf, extra_eos_ids=eos, extra_stop_ids=stops)
