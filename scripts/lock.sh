#!/usr/bin/env bash
# Regenerates requirements.lock, the exact versions `make run` and `make test` install: today's releases
# within pyproject.toml's ranges, resolved in a throwaway venv set up the way scripts/setup_env.sh does it.
# Then run the suite on them before committing the new lock:
#     bash scripts/lock.sh && make test && git commit requirements.lock -m "lock: ..."
# torch is not in the lock: setup installs TORCH_VERSION itself (the CPU build without an NVIDIA GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
VENV="$tmp/venv" LOCK=none bash scripts/setup_env.sh >"$tmp/setup.log" 2>&1 || { cat "$tmp/setup.log"; exit 1; }
{
    echo "# The exact versions scripts/setup_env.sh installs (a pip constraints file). Regenerate with"
    echo "# scripts/lock.sh, run the suite, then commit. Generated $(date -u +%Y-%m-%d) with $("$tmp/venv/bin/python" -V)."
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable --all \
        | grep -viE '^(torch|pip|setuptools|wheel|nvidia-[a-z0-9-]+|fp8-turbo)==' | LC_ALL=C sort -f
} > requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages); run the suite before committing it"
