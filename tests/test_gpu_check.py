"""scripts/gpu_check.py must not rot between GPU leases, and must leave a report however it ends.

- The dry run (no GPU; every part at tiny shapes on the CPU path, the benchmarks included) runs here as
  it would with the GPU image's python3, and every part passes.
- SIGTERM in the middle of a run: the running part is marked interrupted, the report is valid, the
  child is gone.
- The runner stops a child at its part's cap and keeps the rows it wrote.
- The numbers mean what they say: the decode step's 80-layer model, the GEMM goal metrics.
- The quick tier's compile plan fits its ~150 s window for the numbers.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
from gpu_check_tiers import ORDER  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file())


def _assert_comes_back(out: Path) -> None:
    """What the device tool brings back from $OUT: <= 8 files, <= 2 folders down, plain names."""
    files = _files(out)
    assert len(files) <= 8, [str(f.relative_to(out)) for f in files]
    for f in files:
        rel = f.relative_to(out)
        assert len(rel.parts) <= 3, rel  # $OUT/a/b/file at most
        assert all(set(part) <= NAME_OK for part in rel.parts), rel
        assert not f.name.endswith(".tmp"), rel


def test_dry_run(tmp_path):
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [p["name"] for p in doc["parts"]] == ORDER  # numbers first, pytest last
    status = {p["name"]: p["status"] for p in doc["parts"]}
    assert status == {name: "ok" for name in ORDER}, status
    parts = {p["name"]: p for p in doc["parts"]}
    assert all("count" in p["compiles"] for p in doc["parts"])  # compile count per part
    assert "collected" in parts["pytest"]["numbers"]["summary"]  # every GPU test collects
    assert parts["pytest"]["numbers"]["files"] and all("test_cpu" not in f for f in parts["pytest"]["numbers"]["files"])
    assert parts["bench_decode_step"]["numbers"]["decode_step"]["rows"]  # benchmark rows reach the report
    assert parts["bench_gemm"]["numbers"]["gemm"]["split_k"]  # the split-K sweep ran
    assert parts["env"]["numbers"]["peaks"]["copy_gbps"] > 0
    assert doc["seconds"] >= max(p["started_at"] for p in doc["parts"])  # one clock, from process start
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| kernels_70b | ok |" in md and "### bench_gemm" in md and "| goal | measured | goal | met |" in md
    assert "Triton interpreter" not in md  # the dry run is the CPU path, not the interpreter
    names = {str(f.relative_to(tmp_path)) for f in _files(tmp_path)}
    assert {"gpu_check.json", "gpu_check.md", "gpu_check.log", "bench/gemm.json", "bench/attention.json",
            "bench/decode_step.json"} <= names, names
    _assert_comes_back(tmp_path)
    log = (tmp_path / "gpu_check.log").read_text()
    assert "done qkv tp1 M=1" in log  # a child's output is in the log


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if text in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_sigterm_leaves_a_valid_partial_report(tmp_path):
    """A few seconds into a dry run (a benchmark child running), SIGTERM: exit 143, a valid report."""
    parts = ["env", "kernels_70b", "bench_gemm", "bench_attention", "pytest"]
    proc = subprocess.Popen([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path),
                             "--only", *parts], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    report = tmp_path / "gpu_check.json"
    deadline = time.monotonic() + 300
    try:
        while True:  # until the first benchmark is running (the report says so when a part starts)
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "bench_gemm never started"
            if report.exists():
                status = {p["name"]: p["status"] for p in json.loads(report.read_text())["parts"]}
                if status["bench_gemm"] == "running":
                    break
            time.sleep(0.1)
        time.sleep(1.0)  # its child is importing torch or timing
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 128 + signal.SIGTERM, rc
    doc = json.loads(report.read_text())
    assert doc["stopped"].startswith("SIGTERM"), doc["stopped"]
    status = [(p["name"], p["status"]) for p in doc["parts"]]
    assert [s for _, s in status if s == "interrupted"] == ["interrupted"], status
    cut = next(i for i, (_, s) in enumerate(status) if s == "interrupted")
    assert all(s in ("ok", "skipped") for _, s in status[:cut]), status  # what finished, as it finished
    assert all(s in ("not run", "skipped") for _, s in status[cut + 1:]), status
    assert dict(status)["env"] == "ok" and dict(status)["kernels_70b"] == "ok"
    md = (tmp_path / "gpu_check.md").read_text()
    assert "(stopped: SIGTERM" in md and f"| {status[cut][0]} | interrupted |" in md
    _assert_comes_back(tmp_path)
    time.sleep(0.5)
    assert _processes_mentioning(str(tmp_path)) == []  # the benchmark child was killed with it


def test_a_child_past_its_cap_is_stopped_and_keeps_its_rows(tmp_path, capsys):
    from gpu_check_runner import Runner

    runner = Runner(tmp_path, budget=120, start=time.monotonic(), tier="test", command="test",
                    compile_log=str(tmp_path / "compiles.jsonl"))
    runner.plan(["child"])
    rows = tmp_path / "rows.json"
    script = (f"import json, time; open({str(rows)!r}, 'w').write(json.dumps(dict(rows=[1, 2], markdown='| a |')));"
              "print('first row', flush=True); time.sleep(60)")
    t0 = time.monotonic()
    part = runner.run("child", lambda p: runner.child(p, [sys.executable, "-c", script], ENV, rows, key="doc"), cap=4,
                      min_start=1)
    assert time.monotonic() - t0 < 20
    assert part.status == "partial" and "cap" in part.note, (part.status, part.note)
    assert part.numbers["doc"]["rows"] == [1, 2]
    assert "first row" in capsys.readouterr().out  # streamed
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["parts"][0]["status"] == "partial"


def test_decode_step_scales_the_fixed_parts_once():
    """step(80) = host + head + 79 x layer + last layer, from graph times of 2, 4 and 5 layers."""
    from bench.decode_step import scale

    head, layer, last, host = 0.7, 0.3, 0.45, 0.05
    g = {2: head + 2 * layer, 4: head + 4 * layer, 5: head + 4 * layer + last}
    r = scale(g, host, batch=4)
    assert math.isclose(r["layer_ms"], layer) and math.isclose(r["last_layer_ms"], last)
    assert math.isclose(r["head_ms"], head)
    assert math.isclose(r["step_ms_80"], host + head + 79 * layer + last)
    assert math.isclose(r["tok_s_80"], 4e3 / r["step_ms_80"])


def test_gemm_goals_read_as_written():
    """Geomean vs _scaled_mm over M >= 512 only; bandwidth share over M <= 16 against the measured copy rate."""
    from bench.gemm import PEER, summarize

    def row(m, impl, ms, gbps):
        return dict(layer="o", tp=1, m=m, n=8192, k=8192, impl=impl, ms=ms, gbps=gbps)

    rows = [row(1, "fp8_gemm[channel]", 1.0, 2000), row(1, PEER, 4.0, 500),  # 4x at M=1: not in the geomean
            row(512, "fp8_gemm[channel]", 1.0, 0), row(512, PEER, 2.0, 0),
            row(4096, "fp8_gemm[channel]", 2.0, 0), row(4096, PEER, 1.0, 0)]
    s = summarize(rows, [], copy_gbps=4000.0)
    assert math.isclose(s["geomean_vs_scaled_mm_m_ge_512"], 1.0)  # sqrt(2 x 0.5)
    assert math.isclose(s["copy_bw_fraction_m_le_16_median"], 0.5)


def test_compile_stats_counts_logged_compiles(tmp_path, monkeypatch):
    from bench import compile_stats

    assert compile_stats.install()  # triton >= 3.4 has the JIT hooks (3.6 on the GPU image)
    log = tmp_path / "compiles.jsonl"
    monkeypatch.setenv(compile_stats.ENV, str(log))
    before = compile_stats.snapshot()["count"]
    compile_stats._before()
    compile_stats._after(fn=type("Info", (), {"name": "k"})())
    stats, offset = compile_stats.read_log(str(log))
    assert stats["count"] == 1 and stats["by_kernel"] == {"k": 1} and offset == log.stat().st_size
    assert compile_stats.snapshot()["count"] == before + 1


def test_quick_tier_compiles_fit_its_window():
    """The quick tier returns its numbers by ~150 s: the variants compiled before the last benchmark
    stay within what that leaves. Measured here (scripts/gpu_compile_plan.py --compile, 2 cores): ~2 s
    per variant; budgeted: ~15 s start-up and peaks, ~20 s autotuning, ~35 s timing, ~10 s for three
    child processes, so ~70 s of compiles: 32 variants at 2.2 s."""
    from gpu_compile_plan import plan_tier
    from gpu_check_tiers import QUICK

    plan = plan_tier(QUICK)
    before_numbers = ORDER[:ORDER.index("bench_decode_step") + 1]
    counts = {part: len(plan.parts.get(part, [])) for part in ORDER}
    assert sum(counts[p] for p in before_numbers) <= 32, counts
    assert sum(QUICK.caps[p] for p in before_numbers) <= 150  # capped parts keep what they measured
    assert counts["kernels_70b"] > 0 and counts["bench_gemm"] > 0  # the plan sees the parts' launches
