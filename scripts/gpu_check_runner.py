"""The GPU check's runner: the clock, the parts, the report, children, signals (scripts/gpu_check.py).

- The clock starts at process start (read from /proc), not after `import torch`: the budget is the
  command's wall time.
- Every part is listed from the start ("pending"), runs under its own time cap, and the report
  (gpu_check.json + gpu_check.md) is rewritten after every part and every few seconds while a child
  runs, so a run killed at any moment leaves a valid report of what finished.
- SIGTERM / SIGINT: the running child's process group is killed, the running part is marked
  "interrupted" with what it had (a benchmark's rows so far), the report is written, and the process
  exits with 128 + the signal. A watchdog thread does the same (exit 2) past the budget plus a grace, in
  case a part hangs inside a call that never returns to Python.
- Children (benchmarks, pytest) run in their own process group with their output streamed line by line
  into the log; their Triton compiles are counted through bench/compile_stats.py's log file.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import compile_stats  # noqa: E402

WATCHDOG_GRACE = 30.0  # seconds past the budget before the watchdog writes the report and exits
REFRESH_S = 5.0  # report rewrite period while a child runs
KILL_GRACE = 3.0  # SIGTERM -> SIGKILL for a child past its cap


def process_start() -> float:
    """time.monotonic() at this process's start (/proc/self/stat), or now where /proc is missing."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22, starttime, in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return now - max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return now


@dataclass
class Part:
    name: str
    status: str = "pending"  # pending | running | ok | fail | error | partial | skipped | interrupted | not run
    seconds: float = 0.0
    started_at: float | None = None  # seconds after process start
    cap: float = 0.0  # the most seconds it may take
    checks: list[dict] = field(default_factory=list)  # one per sub-check: name, ok, detail
    numbers: dict = field(default_factory=dict)  # benchmark documents, measurements
    compiles: dict = field(default_factory=dict)  # Triton compiles during the part (this process and children)
    note: str = ""


class PartTimeout(Exception):
    """An in-process part reached its cap: what ran is kept, the part is 'partial'."""


class Runner:
    def __init__(self, out: Path, budget: float, start: float, tier: str, command: str, compile_log: str):
        self.out, self.budget, self.start, self.tier, self.command = out, budget, start, tier, command
        self.compile_log = compile_log
        self.parts: list[Part] = []
        self.current: Part | None = None
        self.part_deadline = float("inf")
        self.child_proc: subprocess.Popen | None = None
        self.child_json: Path | None = None
        self.child_key = ""
        self.part_log_offset = 0  # compile log offset at the running part's start
        self.goals: list[dict] = []  # filled by the caller's goal reader before each report
        self.goal_reader = None
        self.stopped: str | None = None
        self._lock = threading.RLock()
        self._stopping = False

    # ---- the clock --------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def part_left(self) -> float:
        return min(self.part_deadline - time.monotonic(), self.left())

    def plan(self, names: list[str]) -> None:
        self.parts = [Part(n) for n in names]

    def get(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    # ---- running parts --------------------------------------------------------------------------
    def run(self, name: str, fn, cap: float, min_start: float = 5.0) -> Part:
        part = self.get(name)
        part.cap = cap = max(0.0, min(cap, self.left() - 1.0))
        if cap < min_start:
            part.status, part.note = "skipped", (f"{cap:.0f}s to run in ({self.left():.0f}s of the budget left), "
                                                 f"needs >= {min_start:.0f}s")
            print(f"\n== {name}: SKIPPED ({part.note})", flush=True)
            self.report()
            return part
        print(f"\n== {name} (at {self.elapsed():.0f}s; cap {cap:.0f}s, {self.left():.0f}s of the budget left)",
              flush=True)
        part.status, part.started_at = "running", round(self.elapsed(), 1)
        self.current, self.part_deadline = part, time.monotonic() + cap
        _, self.part_log_offset = compile_stats.read_log(self.compile_log, 0)  # count from here
        t0 = time.monotonic()
        self.report()
        try:
            fn(part)
            bad = [c for c in part.checks if not c["ok"]]
            part.status = "fail" if bad else ("partial" if part.status == "partial" else "ok")
        except PartTimeout as e:
            bad = [c for c in part.checks if not c["ok"]]
            part.status, part.note = ("fail" if bad else "partial"), f"cap reached: {e}"
        except Exception as e:  # record and go on: one broken part must not hide the others
            part.status, part.note = "error", f"{type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stdout)
        finally:
            self._part_cleanup()
        part.seconds = round(time.monotonic() - t0, 1)
        part.compiles, _ = compile_stats.read_log(self.compile_log, self.part_log_offset)
        self.current, self.part_deadline = None, float("inf")
        c = part.compiles
        print(f"== {name}: {part.status.upper()} in {part.seconds:.1f}s; Triton compiles: {c['count']} "
              f"({c['seconds']:.1f}s) {part.note}", flush=True)
        self.report()
        return part

    def _part_cleanup(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        except RuntimeError as e:  # a broken context: later parts will say so themselves
            print(f"cleanup: {e}", flush=True)

    def check(self, part: Part, name: str, ok: bool, detail: str = "") -> None:
        part.checks.append(dict(name=name, ok=bool(ok), detail=detail))
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

    def guard(self, what: str, need: float = 0.0) -> None:
        """Raise PartTimeout when the part's cap (or the budget) leaves less than `need` seconds."""
        if self.part_left() < need:
            raise PartTimeout(f"stopped before {what}")

    # ---- children ---------------------------------------------------------------------------------
    def child(self, part: Part, cmd: list[str], env: dict, json_path: Path | None = None, key: str = "",
              lines_out: list[str] | None = None) -> int:
        """Run cmd (its own process group), stream its output (also into lines_out), stop it at the part's
        cap; its JSON document (written as it goes) lands in part.numbers[key] while it runs and at the end."""
        timeout = self.part_left()
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                process_group=0)
        self.child_proc, self.child_json, self.child_key = proc, json_path, key
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        refreshed = time.monotonic()
        pending = b""
        try:
            while True:
                if time.monotonic() > deadline:
                    print(f"!! {cmd[1]} reached the part's cap ({timeout:.0f}s): stopping it", flush=True)
                    self._kill_child(proc)
                    part.status, part.note = "partial", f"child stopped at the cap ({timeout:.0f}s)"
                    break
                if sel.select(timeout=1.0):
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        text = line.decode(errors="replace")
                        print(text, flush=True)
                        if lines_out is not None:
                            lines_out.append(text)
                if time.monotonic() - refreshed > REFRESH_S:
                    self._load_child_json(part, key)
                    self.report()
                    refreshed = time.monotonic()
            if pending:
                print(pending.decode(errors="replace"), flush=True)
                if lines_out is not None:
                    lines_out.append(pending.decode(errors="replace"))
            rc = proc.wait()
        finally:
            sel.close()
            proc.stdout.close()
            self.child_proc = None
        self._load_child_json(part, key, json_path)
        self.child_json = None
        return rc

    def _load_child_json(self, part: Part, key: str, path: Path | None = None) -> None:
        path = path or self.child_json
        if path is not None and key and path.is_file():
            try:
                part.numbers[key] = json.loads(path.read_text())
            except (OSError, ValueError):  # replaced while we read it: the next refresh gets it
                pass

    def _kill_child(self, proc: subprocess.Popen | None) -> None:
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=KILL_GRACE)
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            pass

    # ---- stopping -------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.stop(f"{signal.Signals(signum).name} at {self.elapsed():.0f}s", 128 + signum)

    def start_watchdog(self) -> None:
        timer = threading.Timer(max(1.0, self.left() + WATCHDOG_GRACE),
                                lambda: self.stop(f"watchdog: still running {WATCHDOG_GRACE:.0f}s past the budget", 2))
        timer.daemon = True
        timer.start()

    def stop(self, why: str, code: int) -> None:
        """Kill the child, mark what was running and what never ran, write the report, exit."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        print(f"\n!! {why}: writing the report and exiting", flush=True)
        self.stopped = why
        proc = self.child_proc
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        part = self.current
        if part is not None:
            part.status, part.note = "interrupted", why
            if part.started_at is not None:
                part.seconds = round(self.elapsed() - part.started_at, 1)
            self._load_child_json(part, self.child_key)
            part.compiles, _ = compile_stats.read_log(self.compile_log, self.part_log_offset)
        for p in self.parts:
            if p.status == "pending":
                p.status = "not run"
        for tmp in list(self.out.glob("*.tmp")) + list(self.out.glob("*/*.tmp")):
            tmp.unlink(missing_ok=True)
        try:
            self.report(final=True)
        finally:
            sys.stdout.flush()
            os._exit(code)

    # ---- the report -------------------------------------------------------------------------------
    def document(self) -> dict:
        env = self.get("env").numbers if any(p.name == "env" for p in self.parts) else {}
        total = compile_stats.read_log(self.compile_log, 0)[0]
        for _ in range(3):  # a part may append while another thread writes the report: retry the copy
            try:
                parts = [asdict(p) for p in self.parts]
                break
            except RuntimeError:
                time.sleep(0.01)
        else:
            parts = [dict(name=p.name, status=p.status) for p in self.parts]
        return dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=self.command, tier=self.tier,
                    budget=self.budget, seconds=round(self.elapsed(), 1), stopped=self.stopped, env=env,
                    compiles=total, goals=self.goals, parts=parts)

    def report(self, final: bool = False) -> int:
        with self._lock:
            if self.goal_reader is not None:
                try:
                    self.goals = self.goal_reader(self)
                except Exception as e:  # noqa: BLE001 -- a report must be written whatever the numbers hold
                    self.goals = [dict(goal="(goal table failed)", measured=f"{type(e).__name__}: {e}")]
            doc = self.document()
            self._write("gpu_check.json", json.dumps(doc, indent=1, default=str))
            summary, tables = markdown(doc)
            self._write("gpu_check.md", "\n".join(summary + tables) + "\n")
        failed = [p for p in self.parts if p.status in ("fail", "error", "interrupted")]
        if final:  # the tables first, the verdicts last: the end of the output is what a caller sees
            ran = [p for p in self.parts if p.status not in ("skipped", "not run", "pending")]
            print("\n" + "\n".join(tables + [""] + summary))
            print(f"\n{len(ran) - len(failed)} of {len(ran)} parts passed, {len(self.parts) - len(ran)} not run or "
                  f"skipped, {doc['seconds']:.0f}s; Triton compiles {doc['compiles']['count']} "
                  f"({doc['compiles']['seconds']:.0f}s); wrote {self.out}/gpu_check.json, gpu_check.md, gpu_check.log",
                  flush=True)
        return 1 if failed else 0

    def _write(self, name: str, text: str) -> None:
        tmp = self.out / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.out / name)


def markdown(doc: dict) -> tuple[list[str], list[str]]:
    """gpu_check.md, the section bench/GPU.md takes: (heading, parts, failed checks, goals; the
    benchmarks' tables)."""
    env = doc["env"]
    head = (f"## {doc['date']}: {env.get('gpu', 'no GPU (dry run)')}, {doc['tier']} tier, {doc['seconds']:.0f}s"
            + (f" (stopped: {doc['stopped']})" if doc["stopped"] else ""))
    lines = [head, "", f"`{doc['command']}`; torch {env.get('torch')}, triton {env.get('triton')}, "
             f"{env.get('nvidia_smi', '')}", "",
             "| part | status | s | Triton compiles (s) | checks | note |", "|---|---|---|---|---|---|"]
    for p in doc["parts"]:
        checks = p.get("checks", [])
        bad = sum(not c["ok"] for c in checks)
        c = p.get("compiles") or {}
        comp = f"{c['count']} ({c['seconds']:.0f})" if c else "-"
        lines.append(f"| {p['name']} | {p['status']} | {p.get('seconds', 0):.1f} | {comp} | "
                     f"{len(checks) - bad}/{len(checks)} ok | {str(p.get('note', ''))[:120]} |")
    fails = [f"- {p['name']}: {c['name']}: {c['detail']}" for p in doc["parts"] for c in p.get("checks", [])
             if not c["ok"]]
    if fails:
        lines += ["", "Failed checks:", *fails[:50]]
    if doc["goals"]:
        lines += ["", "| goal | measured | goal | met |", "|---|---|---|---|"]
        lines += [f"| {g['goal']} | {g.get('measured', '-')} | {g.get('target', '-')} | {g.get('met', '-')} |"
                  for g in doc["goals"]]
    tables = []
    for p in doc["parts"]:
        for key, value in (p.get("numbers") or {}).items():
            if isinstance(value, dict) and value.get("markdown"):
                done = "" if value.get("done", True) else " (partial: the run stopped before it finished)"
                tables += ["", f"### {p['name']}{done}", "", value["markdown"].strip()]
    return lines, tables
