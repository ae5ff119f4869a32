"""What the server accepts: per-request limits, admission (how much may wait), and client timeouts.

Every limit is a `serve` flag. Defaults follow OpenAI and vLLM where they have one (`n` <= 128, a 4 MiB
body) and are otherwise generous enough that no ordinary client meets them. A request over a
per-request limit gets a 400 naming the field; one that does not fit the queue now gets a 503 with
`Retry-After` (and a 400 if it could never fit, since retrying would not help).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from fp8_turbo.engine.sampling.structured import DEFAULT_CACHE_BYTES, DEFAULT_MAX_GRAMMAR_CHARS
from fp8_turbo.engine.serving.protocol import APIError

MAX_STOP_CHARS = 1024  # longest stop string: the stream holds back this many characters minus one
MAX_JSON_DEPTH = 64  # nesting of the request body (a tool's JSON schema is rarely deeper than 10)
MAX_CONNECTIONS = 1024  # open connections, unless the machine holds fewer (default_max_connections)


def default_max_connections(max_request_bytes: int) -> int:
    """MAX_CONNECTIONS, or fewer where the machine has less room: half the open-file limit (a connection
    is a file descriptor) and as many bodies of `max_request_bytes` as fit in an eighth of the memory."""
    limit = MAX_CONNECTIONS
    try:
        import resource

        files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if files != resource.RLIM_INFINITY:
            limit = min(limit, files // 2)
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limit = min(limit, memory // (8 * max_request_bytes))
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows)
        pass
    return max(limit, 16)


@dataclass(slots=True)
class ServerLimits:
    max_n: int = 128  # completions per prompt (OpenAI's bound)
    max_prompts: int = 128  # prompts in one /v1/completions request
    max_stop: int = 16  # entries of `stop` and of `stop_token_ids`
    max_num_waiting: int = 512  # sequences queued and not started, all requests together
    max_queued_tokens: int = 1 << 20  # the tokens those sequences must compute
    max_request_bytes: int = 4 << 20
    header_timeout: float = 30.0  # seconds for a client to send a request's headers
    body_timeout: float = 60.0  # seconds for a client to send a request's body
    retry_after: int = 1  # seconds, in the Retry-After of a 503
    max_connections: int | None = None  # open connections (None: default_max_connections)
    grammar_cache_bytes: int = DEFAULT_CACHE_BYTES  # compiled grammars kept, by measured size
    max_grammar_chars: int = DEFAULT_MAX_GRAMMAR_CHARS  # the text of one structured output's grammar

    def __post_init__(self) -> None:
        if self.max_connections is None:
            self.max_connections = default_max_connections(self.max_request_bytes)
        for name in ("max_n", "max_prompts", "max_stop", "max_num_waiting", "max_queued_tokens",
                     "max_request_bytes", "retry_after", "max_connections", "grammar_cache_bytes",
                     "max_grammar_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")

    # ---- per request ----------------------------------------------------------------------------
    def check_request(self, n: int, stop: str | list[str] | None, stop_token_ids: list[int] | None,
                      num_prompts: int = 1) -> None:
        """The limits one request's fields must meet (before any tokenization)."""
        if isinstance(n, int) and n > self.max_n:
            raise APIError(400, f"n must be at most {self.max_n}, got {n}", param="n", code="invalid_value")
        if num_prompts > self.max_prompts:
            raise APIError(400, f"prompt holds {num_prompts} prompts; at most {self.max_prompts} per request",
                           param="prompt", code="invalid_value")
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > self.max_stop:
            raise APIError(400, f"stop holds {len(stops)} strings; at most {self.max_stop}", param="stop",
                           code="invalid_value")
        longest = max((len(s) for s in stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise APIError(400, f"stop strings must be at most {MAX_STOP_CHARS} characters, got {longest}",
                           param="stop", code="invalid_value")
        if stop_token_ids is not None and len(stop_token_ids) > self.max_stop:
            raise APIError(400, f"stop_token_ids holds {len(stop_token_ids)} ids; at most {self.max_stop}",
                           param="stop_token_ids", code="invalid_value")

    # ---- admission ------------------------------------------------------------------------------
    def check_capacity(self, waiting_seqs: int, waiting_tokens: int, new_seqs: int, new_tokens: int,
                       prompt_param: str) -> None:
        """400 if the request alone exceeds the queue, 503 + Retry-After if it does not fit the queue now."""
        if new_seqs > self.max_num_waiting or new_tokens > self.max_queued_tokens:
            raise APIError(400, f"this request needs {new_seqs} sequences and {new_tokens} prompt tokens; the "
                                f"server queues at most {self.max_num_waiting} sequences and {self.max_queued_tokens} "
                                f"tokens", param="n" if new_seqs > self.max_num_waiting else prompt_param,
                           code="request_too_large")
        if waiting_seqs + new_seqs > self.max_num_waiting or waiting_tokens + new_tokens > self.max_queued_tokens:
            raise APIError(503, f"the server is busy ({waiting_seqs} sequences with {waiting_tokens} tokens are "
                                f"waiting); retry after {self.retry_after} s", type="server_error",
                           code="server_overloaded", headers={"Retry-After": str(self.retry_after)})


def add_limit_args(p: argparse.ArgumentParser) -> None:
    """The `serve` flags for ServerLimits (and the shutdown timeout, which run_server takes)."""
    from fp8_turbo.engine.serving.cli import memory_size

    d = ServerLimits()
    p.add_argument("--max-n", type=int, default=d.max_n, help=f"largest n per request (default {d.max_n})")
    p.add_argument("--max-prompts", type=int, default=d.max_prompts,
                   help=f"prompts per /v1/completions request (default {d.max_prompts})")
    p.add_argument("--max-stop", type=int, default=d.max_stop,
                   help=f"entries of stop and of stop_token_ids (default {d.max_stop})")
    p.add_argument("--max-num-waiting", type=int, default=d.max_num_waiting,
                   help=f"sequences queued and not started before new requests get 503 (default {d.max_num_waiting})")
    p.add_argument("--max-queued-tokens", type=int, default=d.max_queued_tokens,
                   help=f"prompt tokens of those sequences before new requests get 503 (default {d.max_queued_tokens})")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"largest request body (default {d.max_request_bytes})")
    p.add_argument("--max-connections", type=int, default=None,
                   help=f"open connections; one past it gets 503 (default: {MAX_CONNECTIONS}, or fewer on a machine "
                        f"with under 2x that many files or 8 x max-request-bytes x that much memory; here "
                        f"{d.max_connections})")
    p.add_argument("--grammar-cache-bytes", type=memory_size, default=d.grammar_cache_bytes, metavar="SIZE",
                   help="compiled structured-output grammars kept, by their measured size, e.g. 64MiB (default 64 MiB)")
    p.add_argument("--max-grammar-chars", type=int, default=d.max_grammar_chars,
                   help=f"longest grammar text: a JSON schema, regex, choices or Lark grammar (default {d.max_grammar_chars})")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help=f"seconds a client may take to send request headers (default {d.header_timeout:g})")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help=f"seconds a client may take to send a request body (default {d.body_timeout:g})")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds to let requests in flight finish (default 30)")
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(max_n=args.max_n, max_prompts=args.max_prompts, max_stop=args.max_stop,
                        max_num_waiting=args.max_num_waiting, max_queued_tokens=args.max_queued_tokens,
                        max_request_bytes=args.max_request_bytes, header_timeout=args.header_timeout,
                        body_timeout=args.body_timeout, max_connections=args.max_connections,
                        grammar_cache_bytes=args.grammar_cache_bytes, max_grammar_chars=args.max_grammar_chars)
