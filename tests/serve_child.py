"""A server process for the shutdown and engine-death tests: the tiny model behind `build_app` and
`lifecycle.serve`, the path `fp8-turbo serve` takes after loading (signals, drain, exit status), with
a small KV cache, a delay per engine step (so streams are still running when a test signals) and an
optional fatal fault (a prompt holding `--fatal-token` kills the engine loop), and a broken forward
(`--broken-forward N`: every model forward after the first N raises, so N=0 fails the start-up check).

    python tests/serve_child.py CHECKPOINT PORT [--shutdown-timeout S] [--step-delay S] [--fatal-token ID]
                                               [--broken-forward N]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from fp8_turbo.engine.core.async_engine import FatalEngineError
from fp8_turbo.engine.core.engine_config import EngineConfig
from fp8_turbo.engine.core.llm_engine import LLMEngine
from fp8_turbo.engine.serving.lifecycle import check_engine, serve
from fp8_turbo.engine.serving.server import build_app

MODEL = "tiny"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("port", type=int)
    p.add_argument("--shutdown-timeout", type=float, default=30.0)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--fatal-token", type=int, default=None)
    p.add_argument("--broken-forward", type=int, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    engine = LLMEngine(EngineConfig(model=args.checkpoint, device="cpu", kv_cache_memory_bytes=4 << 20))
    step, sampler = engine.step, engine.sampler

    def slow_step():
        time.sleep(args.step_delay)
        return step()

    def faulty_sampler(logits, rows):
        if any(args.fatal_token in row.prompt_token_ids for row in rows):
            raise FatalEngineError("injected fatal fault")
        return sampler(logits, rows)

    engine.step = slow_step
    if args.fatal_token is not None:
        engine.sampler = faulty_sampler
    if args.broken_forward is not None:
        forward, calls = engine.runner.model.forward, [0]

        def broken_forward(*a, **kw):
            calls[0] += 1
            if calls[0] > args.broken_forward:
                raise AttributeError("module 'kernels' has no attribute 'write_kv'")  # what issue 20 saw
            return forward(*a, **kw)

        engine.runner.model.forward = broken_forward
    if not check_engine(engine):
        return 1
    app = build_app(engine, served_model_name=MODEL, shutdown_timeout=args.shutdown_timeout)
    return serve(app, host="127.0.0.1", port=args.port, header_timeout=10, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
