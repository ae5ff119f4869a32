"""Build and load the CPU kernels' C++ extensions, once per process (torch.utils.cpp_extension).

Each extension is cached in the user's cache directory, never beside the package (an installed copy
must not write into site-packages): $FP8_TURBO_CACHE, else $XDG_CACHE_HOME/fp8-turbo, else
~/.cache/fp8-turbo, under cpu_ext/<name>-<hash>/, the hash covering its sources and headers, the
compiler flags and the torch and Python versions. A cached build is imported directly (no compiler or
ninja needed); otherwise it is compiled there, with one log line saying so (`python -m
fp8_turbo.kernels.cpu --build` does it ahead of time, scripts/setup_env.sh calls that). Concurrent first loads (pytest-xdist workers)
serialize on an flock, which the kernel releases even when a builder dies. A failed build logs one
warning and `load` returns None: the callers then run the torch reference.

FP8_TURBO_CPU_KERNELS=0 turns the extensions off (torch reference everywhere).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SRC_DIR = Path(__file__).resolve().parent
# -ffp-contract=off: no multiply-add is fused unless the source says so (results must not depend on
# the compiler's choice); -fopenmp: at::parallel_for runs on torch's OpenMP threads. No -march: the
# kernels pick their instruction set at run time.
CFLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"]

_loaded: dict[str, ModuleType | None] = {}


def enabled() -> bool:
    return os.environ.get("FP8_TURBO_CPU_KERNELS", "1") not in ("0", "")


def cache_root() -> Path:
    """fp8-turbo's per-user cache directory (the XDG base-directory rule)."""
    if os.environ.get("FP8_TURBO_CACHE"):
        return Path(os.environ["FP8_TURBO_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fp8-turbo"


def build_dir(name: str, files: list[str]) -> Path:
    root = cache_root() / "cpu_ext"
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.encode() + b"\0" + (SRC_DIR / f).read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {sysconfig.get_platform()}".encode())
    return root / f"{name}-{h.hexdigest()[:16]}"


def _import(name: str, so: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(name: str, sources: list[str], directory: Path) -> ModuleType:
    from torch.utils import cpp_extension

    stale = directory / "lock"  # cpp_extension's own baton, left behind if a builder was killed
    stale.unlink(missing_ok=True)
    # ninja from pip lives beside this interpreter, which need not be on PATH (.venv/bin/python ...)
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), path])
    log.warning("compiling the CPU kernels %s into %s (once per version, ~30-90 s)", name, directory)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(SRC_DIR / s) for s in sources],
            extra_cflags=list(CFLAGS),  # copies: cpp_extension appends to the lists it is given, and the
            extra_ldflags=list(LDFLAGS),  # next build_dir hash in this process would then differ
            build_directory=str(directory),
            verbose=False,
        )
    finally:
        os.environ["PATH"] = path


def load(name: str, sources: list[str], headers: list[str] = ()) -> ModuleType | None:
    """The extension module `name` built from `sources` (+ `headers`) in this directory, or None when it
    is turned off or cannot be built (one warning per process)."""
    if name in _loaded:
        return _loaded[name]
    module = None
    if enabled():
        try:
            directory = build_dir(name, list(sources) + list(headers))
            so = directory / f"{name}.so"  # what cpp_extension writes
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                module = _import(name, so) if so.exists() else _compile(name, list(sources), directory)
        except Exception as err:  # noqa: BLE001 -- any build failure means: use the torch path
            msg = str(err).strip().splitlines()
            log.warning("CPU kernels %s unavailable (%s: %s); using the torch reference path",
                        name, type(err).__name__, " | ".join(msg[-3:])[:500])
            module = None
    _loaded[name] = module
    return module
