"""Speculative decoding behind the CLI and the server: --speculative-config parses vLLM's JSON (a bad
value is a usage error naming the problem), a speculative server streams exactly what a plain one
streams, and /metrics counts drafted and accepted tokens."""
from __future__ import annotations

import json

import httpx
import pytest

from fp8_turbo.engine.core.spec_decode import SpeculativeConfig
from fp8_turbo.engine.serving.cli import build_parser
from server_fixture import SEED_MODEL_NAME, start_server, tiny_engine

SPEC = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'


@pytest.mark.parametrize("command", ["serve", "generate", "chat"])
def test_cli_takes_a_speculative_config(command):
    extra = ["--prompt", "hi"] if command == "generate" else []
    args = build_parser().parse_args([command, "--speculative-config", SPEC, *extra])
    assert args.speculative_config == SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=4,
                                                        prompt_lookup_min=2)
    assert build_parser().parse_args([command, *extra]).speculative_config is None


@pytest.mark.parametrize("value, message", [("{", "not valid JSON"), ('{"method": "eagle"}', "method must be one of"),
                                            ('{"num_speculative_tokens": 0}', "num_speculative_tokens must be")])
def test_cli_rejects_a_bad_speculative_config(value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--speculative-config", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--speculative-config" in err and message in err, err


def stream_text(url: str, body: dict) -> tuple[str, list]:
    """The streamed content and the logprob entries of one chat completion."""
    text, logprobs = "", []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
                    logprobs += (choice.get("logprobs") or {}).get("content") or []
    return text, logprobs


def test_speculative_server_streams_the_same_and_counts_drafts(tmp_path):
    # A repetitive prompt: the tiny random model's continuation repeats, so prompt lookup finds drafts.
    body = {"model": SEED_MODEL_NAME, "messages": [{"role": "user", "content": "w5 w6 w7 " * 12}],
            "max_tokens": 48, "temperature": 0, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    results = []
    for spec in (None, SPEC):
        server = start_server(tiny_engine(tmp_path / str(len(results)), speculative_config=spec), metrics_public=True)
        try:
            results.append(stream_text(server.url, body))
            seeded = {**body, "temperature": 0.8, "seed": 7, "n": 2, "stream": False}
            results.append(httpx.post(f"{server.url}/v1/chat/completions", json=seeded, timeout=120).json()["choices"])
            metrics = server.wait_idle()
        finally:
            server.__exit__(None, None, None)
    plain_stream, plain_seeded, spec_stream, spec_seeded = results
    assert spec_stream == plain_stream and spec_seeded == plain_seeded
    assert "fp8_turbo_spec_decode_num_draft_tokens_total" in metrics
    drafted = metrics["fp8_turbo_spec_decode_num_draft_tokens_total"]
    accepted = metrics["fp8_turbo_spec_decode_num_accepted_tokens_total"]
    assert 0 < accepted <= drafted and metrics["fp8_turbo_spec_decode_acceptance_rate"] == accepted / drafted
    assert metrics['fp8_turbo_spec_decode_num_accepted_tokens_per_pos_total{position="0"}'] > 0
    assert metrics["fp8_turbo_kv_cache_used_blocks"] == 0
