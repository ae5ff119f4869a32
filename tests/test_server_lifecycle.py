"""Shutdown and engine death, against a real server process (tests/serve_child.py): SIGTERM drains --
streams end with `data: [DONE]`, new requests get 503, the process exits 0 within the timeout -- and a
dead engine loop fails every pending request at once and exits non-zero. Every wait has a timeout, so
a hang fails the test instead of blocking the suite."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from model_factory import make_checkpoint

CHILD = Path(__file__).with_name("serve_child.py")
ROOT = CHILD.parent.parent
MODEL = "tiny"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck"), "llama31")


def spawn(checkpoint: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """tests/serve_child.py on a free port: the process and its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{CHILD.parent}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(CHILD), str(checkpoint), str(port), *options], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


class ChildServer:
    def __init__(self, checkpoint: Path, *options: str):
        self.proc, self.url = spawn(checkpoint, *options)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"the server exited at start-up:\n{self.proc.stdout.read()}"
            assert time.monotonic() < deadline, "the server did not start in 120 s"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the server did not exit within {timeout} s:\n{self.proc.communicate()[0][-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Stream(threading.Thread):
    """A streamed chat completion read in a thread: `events` (data payloads) and `first` (set on the first event)."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.first = threading.Event()
        self.events: list[str] = []
        self.ended_at = 0.0  # time.monotonic() of the last event
        self.status: int | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "w5 w6 w7"}], "stream": True,
                "max_tokens": self.max_tokens, "ignore_eos": True}
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=60) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: "):])
                        self.ended_at = time.monotonic()
                        self.first.set()
        except Exception as e:  # noqa: BLE001 -- reported by the test
            self.error = e
        finally:
            self.first.set()

    def finish_reasons(self) -> list[str]:
        chunks = [json.loads(e) for e in self.events if e != "[DONE]"]
        return [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices") and c["choices"][0].get("finish_reason")]

    def errors(self) -> list[dict]:
        return [json.loads(e)["error"] for e in self.events if e != "[DONE]" and "error" in json.loads(e)]


def test_sigterm_drains_streams_then_exits_0(checkpoint):
    """8 streams in flight at SIGTERM: the 4 short ones finish, the 4 long ones are ended after the
    shutdown timeout with an error event; all 8 end with [DONE]; meanwhile new requests get 503."""
    timeout = 2.0
    server = ChildServer(checkpoint, "--shutdown-timeout", str(timeout), "--step-delay", "0.02")
    try:
        streams = [Stream(server.url, max_tokens=8 if i % 2 else 400) for i in range(8)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.first.wait(60) and s.status == 200, (s.status, s.error)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the drain starts within uvicorn's 0.1 s tick
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=10,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] and r.headers["x-request-id"]
        assert r.json()["error"]["code"] == "service_unavailable"
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
        assert server.wait(timeout + 15) == 0  # (the interpreter's own exit takes seconds on a busy machine)
        for s in streams:
            s.join(10)
            assert not s.is_alive() and s.error is None, s.error
            assert s.events[-1] == "[DONE]", s.events[-3:]
        short, long = streams[1::2], streams[0::2]
        assert all(s.finish_reasons() == ["length"] and not s.errors() for s in short)
        for s in long:
            assert s.finish_reasons() == [] and [e["code"] for e in s.errors()] == ["service_unavailable"]
            assert timeout <= s.ended_at - t0 < timeout + 2, s.ended_at - t0
    finally:
        server.close()


def test_dead_engine_loop_fails_pending_requests_and_exits_nonzero(checkpoint):
    fatal = 99  # token id "w99": a prompt holding it kills the engine loop
    server = ChildServer(checkpoint, "--step-delay", "0.02", "--fatal-token", str(fatal))
    try:
        streams = [Stream(server.url, max_tokens=400) for _ in range(3)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.first.wait(60) and s.status == 200, (s.status, s.error)
        t0 = time.monotonic()
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": [5, fatal], "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert r.headers["x-request-id"] in r.json()["error"]["message"]  # generic: the id, not the exception
        assert "injected" not in r.text
        assert server.wait(15) != 0
        for s in streams:
            s.join(10)
            assert not s.is_alive() and s.events[-1] == "[DONE]" and s.errors(), s.events[-3:]
        assert time.monotonic() - t0 < 15
    finally:
        server.close()


def test_a_server_that_cannot_compute_exits_1_before_serving(checkpoint):
    """Every forward raises (as when a shadowing `kernels` package broke every step): the start-up check's
    one-token forward fails, the process logs why and exits 1, and it never listened."""
    proc, url = spawn(checkpoint, "--broken-forward", "0")
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, out[-3000:]
    assert "the engine cannot compute" in out and "has no attribute 'write_kv'" in out, out[-3000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def test_a_forward_that_starts_failing_turns_health_503_and_exits_nonzero(checkpoint):
    """The start-up check passes (its one forward works), then every forward raises. One failing step fails
    its request (500 with the request id) and the server goes on; MAX_FAILED_STEPS in a row mean the
    engine cannot compute: /health turns 503 (a stream kept open holds the server up to see it) and the
    process exits non-zero for a supervisor to restart it."""
    from fp8_turbo.engine.core.async_engine import MAX_FAILED_STEPS

    server = ChildServer(checkpoint, "--broken-forward", "1")
    try:
        for i in range(MAX_FAILED_STEPS):
            r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": [5, 6], "max_tokens": 2},
                           timeout=30)
            assert r.status_code == 500 and r.headers["x-request-id"] in r.json()["error"]["message"], r.text
            if i < MAX_FAILED_STEPS - 1:
                assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
            else:
                try:  # the server exits once its last responses are out: 503 while it still listens
                    health = httpx.get(f"{server.url}/health", timeout=10).status_code
                except httpx.TransportError:
                    health = None
                assert health in (503, None), health
        assert server.wait(30) != 0
        out = server.proc.stdout.read()
        assert f"{MAX_FAILED_STEPS} engine steps in a row failed" in out, out[-3000:]
    finally:
        server.close()
