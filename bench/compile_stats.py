"""Counts the Triton JIT compilations of this process and of its children.

A compilation is what the JIT does on a miss of its in-memory kernel cache: a full compile (~1-3 s for
an FP8 GEMM variant) or a load from Triton's disk cache (tens of ms); both are counted, with their
seconds, so a run's log says how much of its time went to compiling. Hooks: triton.knobs.runtime's
jit_cache_hook (before) and jit_post_compile_hook (after), present in triton >= 3.4 (3.6 on the GPU
image, 3.9 here); an older triton counts nothing and says so.

Children count too: when FP8_TURBO_COMPILE_LOG names a file, every compile appends one JSON line
{"pid", "kernel", "seconds", "time"} to it (O_APPEND, so processes do not interleave lines), and the
parent reads the lines a part added (scripts/gpu_check.py). `install()` is idempotent; the benchmarks
call it through bench/timing.py, and pytest loads this module as a plugin (`-p bench.compile_stats`),
xdist workers included.
"""
from __future__ import annotations

import json
import os
import threading
import time

ENV = "FP8_TURBO_COMPILE_LOG"
_lock = threading.Lock()
_started: dict[int, float] = {}  # thread id -> start of the compile in flight
_count = 0
_seconds = 0.0
_installed: bool | None = None


def _before(*args, **kwargs):
    _started[threading.get_ident()] = time.perf_counter()
    return None  # anything truthy would tell Triton to skip the compile


def _after(*args, **kwargs):
    global _count, _seconds
    t0 = _started.pop(threading.get_ident(), None)
    seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    fn = kwargs.get("fn")
    name = getattr(fn, "name", None) or "?"
    with _lock:
        _count += 1
        _seconds += seconds
    path = os.environ.get(ENV)
    if path:
        line = json.dumps(dict(pid=os.getpid(), kernel=name, seconds=round(seconds, 3), time=time.time())) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    return None


def install() -> bool:
    """Hook Triton's JIT (once per process). False when this triton has no such hooks."""
    global _installed
    if _installed is not None:
        return _installed
    try:
        from triton import knobs

        runtime = knobs.runtime
        if not hasattr(runtime, "jit_post_compile_hook"):
            raise AttributeError("triton.knobs.runtime.jit_post_compile_hook")
    except (ImportError, AttributeError):
        _installed = False
        return False
    previous_before, previous_after = runtime.jit_cache_hook, runtime.jit_post_compile_hook

    def before(*args, **kwargs):
        skip = previous_before(*args, **kwargs) if previous_before else None
        _before(*args, **kwargs)
        return skip

    def after(*args, **kwargs):
        if previous_after:
            previous_after(*args, **kwargs)
        return _after(*args, **kwargs)

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after
    _installed = True
    return True


def snapshot() -> dict:
    """Compiles of this process so far: {"count", "seconds", "hooked"}."""
    with _lock:
        return dict(count=_count, seconds=round(_seconds, 2), hooked=bool(_installed))


def read_log(path: str, offset: int = 0) -> tuple[dict, int]:
    """Compiles logged in `path` from byte `offset` on: ({"count", "seconds", "by_kernel"}, new offset)."""
    stats = dict(count=0, seconds=0.0, by_kernel={})
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return stats, offset
    end = data.rfind(b"\n") + 1  # a line still being written stays for the next read
    for line in data[:end].splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        stats["count"] += 1
        stats["seconds"] += rec.get("seconds", 0.0)
        name = rec.get("kernel", "?")
        stats["by_kernel"][name] = stats["by_kernel"].get(name, 0) + 1
    stats["seconds"] = round(stats["seconds"], 2)
    return stats, offset + end


def pytest_configure(config):  # pytest plugin: `-p bench.compile_stats` (main process and xdist workers)
    install()
