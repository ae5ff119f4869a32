"""Run a test module again under the Triton interpreter.

TRITON_INTERPRET must be set before triton is imported (triton.language's own jit'd helpers are bound
then), and xdist workers share processes between modules, so interpreter tests run in a fresh
`python -m pytest` process with TRITON_INTERPRET=1. In the normal run they are skipped (`in_interpreter`).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fp8_turbo.kernels.backend import interpreting

SKIP_REASON = "runs in test_interpreter_subprocess (TRITON_INTERPRET=1)"
in_interpreter = pytest.mark.skipif(not interpreting(), reason=SKIP_REASON)


def rerun_in_interpreter(test_file: str) -> None:
    """Run `test_file` with TRITON_INTERPRET=1 and fail unless its interpreter tests ran and passed."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test_file],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
    assert SKIP_REASON not in r.stdout, r.stdout[-2000:]  # they did run
