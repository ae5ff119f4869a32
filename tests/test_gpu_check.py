"""scripts/gpu_check.py must not rot between GPU leases: its dry run (no GPU; orchestration, imports, every
part at tiny shapes on the CPU reference path, the benchmarks included) runs here, as it would with the
GPU image's python3, and every part must pass."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ["env", "pytest", "kernels_70b", "kv_offsets", "decode_256", "cuda_graph", "bench_gemm", "bench_attention",
         "bench_decode_step"]


def test_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path), "--budget", "800"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {p["name"]: p["status"] for p in doc["parts"]}
    assert status == {name: "ok" for name in PARTS}, status
    parts = {p["name"]: p for p in doc["parts"]}
    assert "collected" in parts["pytest"]["numbers"]["summary"]  # every GPU test collects
    assert parts["bench_decode_step"]["numbers"]["decode_step"]["rows"]  # benchmark rows reach the JSON
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| kernels_70b | ok |" in md and "### bench_gemm" in md
    assert sorted(f.name for f in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
