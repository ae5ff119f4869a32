"""Prometheus metrics of the server, in the text exposition format (version 0.0.4), written by hand.

Counters and histograms are updated by request handlers on the event loop; gauges (running and
waiting requests, KV-cache usage) are read from the engine when /metrics is scraped.
"""
from __future__ import annotations

import bisect
import time
from collections import defaultdict

from fp8_turbo.engine.core.llm_engine import LLMEngine
from fp8_turbo.engine.core.outputs import RequestOutput

PREFIX = "fp8_turbo"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, HTTP status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.aborted_requests = 0
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from request arrival to its first token.",
                              TTFT_BUCKETS)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between consecutive output tokens.",
                             ITL_BUCKETS)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             E2E_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def render(self, engine: LLMEngine, in_flight: int) -> str:
        stats = engine.block_manager.stats()
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {PREFIX}_{name} {help}", f"# TYPE {PREFIX}_{name} {kind}"])
            lines.extend(f"{PREFIX}_{name}{labels} {value}" for labels, value in samples)

        metric("requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
               [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
        metric("requests_aborted_total", "counter", "Requests whose client went away before the end.",
               [("", self.aborted_requests)])
        metric("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", [("", self.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Generated tokens.", [("", self.generation_tokens)])
        metric("num_requests_running", "gauge", "Sequences in the running batch.", [("", engine.num_running)])
        metric("num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", [("", engine.num_waiting)])
        metric("num_requests_in_flight", "gauge", "Requests the server is answering.", [("", in_flight)])
        metric("kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use (1 = full).", [("", stats.usage)])
        metric("kv_cache_used_blocks", "gauge", "KV-cache blocks held by sequences.",
               [("", stats.num_blocks - stats.num_free_blocks)])
        metric("kv_cache_total_blocks", "gauge", "KV-cache blocks in all.", [("", stats.num_blocks)])
        metric("prefix_cache_queries_total", "counter", "Full prompt blocks looked up in the prefix cache.",
               [("", stats.prefix_cache_queries)])
        metric("prefix_cache_hits_total", "counter", "Prompt blocks found in the prefix cache.",
               [("", stats.prefix_cache_hits)])
        drafter = engine.drafter
        if drafter is not None:  # speculative decoding (vLLM's metric names, our prefix)
            metric("spec_decode_num_drafts_total", "counter", "Sequence steps that verified speculative drafts.",
                   [("", drafter.num_drafts)])
            metric("spec_decode_num_draft_tokens_total", "counter", "Draft tokens verified.",
                   [("", drafter.num_draft_tokens)])
            metric("spec_decode_num_accepted_tokens_total", "counter", "Draft tokens accepted (kept as output).",
                   [("", drafter.num_accepted_tokens)])
            metric("spec_decode_num_accepted_tokens_per_pos_total", "counter",
                   "Accepted draft tokens by position in the draft (0 = first).",
                   [(f'{{position="{j}"}}', n) for j, n in enumerate(drafter.accepted_per_position)])
            metric("spec_decode_acceptance_rate", "gauge", "Accepted / drafted tokens since start.",
                   [("", drafter.acceptance_rate)])
        for hist in (self.ttft, self.itl, self.e2e):
            lines.extend(hist.render())
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """{'name{labels}': value} of an exposition text; for tests and the load generator."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


class RequestTiming:
    """Per-request latency bookkeeping feeding the TTFT / inter-token histograms."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self.metrics, self.arrival = metrics, arrival
        self.tokens = 0
        self.last: float | None = None

    def update(self, out: RequestOutput) -> None:
        tokens = sum(len(c.token_ids) for c in out.outputs)
        new = tokens - self.tokens
        if new <= 0:
            return
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:
            step = (now - self.last) / new
            for _ in range(new):
                self.metrics.itl.observe(step)
        self.metrics.generation_tokens += new
        self.tokens, self.last = tokens, now
        if out.finished:
            self.metrics.e2e.observe(now - self.arrival)
