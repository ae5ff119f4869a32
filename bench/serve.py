"""Serving load: N concurrent streaming chat clients against the OpenAI-compatible server.

Starts `fp8-turbo serve` (SmolLM2-135M-Instruct, FP8 by default) in a subprocess and, when the peers
directory has it (bench/peers.py: --peers DIR or $FP8_TURBO_PEERS), llama.cpp's own `llama-server` on
the Q8_0 GGUF with one slot per client (`-np`), then for each client count runs `clients x
requests-per-client` streaming chat requests over a fixed prompt set (greedy, `max_tokens` new tokens,
EOS ignored by both). Reports requests/s, output tok/s (aggregate), time to first token and
inter-token latency (p50/p99), as a markdown table, bench/out/serve.json and bench/out/serve.png; and,
in the same run, the engine's in-process single-stream rate on the same requests, which one streaming
client should come close to (the server's own cost per token).

    .venv/bin/python bench/serve.py [--clients 1,8,32,64] [--requests-per-client 2] [--max-tokens 128]
    .venv/bin/python bench/serve.py --clients 1,2 --requests-per-client 1 --max-tokens 8   # smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers as peer_tools  # noqa: E402

OUT = Path(__file__).parent / "out"
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Explain in a few paragraphs why the sky is blue.",
    "Write a short story about a robot learning to paint.",
    "What are the main differences between Python lists and tuples?",
    "Give me a recipe for a simple tomato soup.",
    "Describe the water cycle for a ten-year-old.",
    "List five tips for writing clean code, with a sentence on each.",
    "Why do cats purr? Summarize what scientists know.",
    "Compare trains and planes for a 500 km trip.",
]


def machine() -> str:
    return f"{peer_tools.cpu()}, Python {platform.python_version()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, log: Path, timeout: float, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"{cmd[:4]} did not come up in {timeout:.0f}s; see {log}")


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    times, usage = [], None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage else len(times)
    return {"start": t0, "end": time.perf_counter(), "tokens": tokens, "chunk_times": times}


async def run_load(url: str, model: str, clients: int, per_client: int, max_tokens: int, extra: dict) -> dict:
    results = []

    async def client(c: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            for k in range(per_client):
                prompt = PROMPTS[(c * per_client + k) % len(PROMPTS)]
                results.append(await one_request(http, model, prompt, max_tokens, extra))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    ttft = [r["chunk_times"][0] - r["start"] for r in results if r["chunk_times"]]
    # Chunks can carry several tokens (llama.cpp, multi-byte characters): spread each gap over them.
    itl = []
    for r in results:
        ts = r["chunk_times"]
        if len(ts) > 1 and r["tokens"] > 1:
            itl.append((ts[-1] - ts[0]) / (r["tokens"] - 1))
    tokens = sum(r["tokens"] for r in results)

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q)) if xs else float("nan")

    return {"clients": clients, "requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
            "output_tok_per_s": tokens / wall, "output_tokens": tokens,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99)}


def bench_server(name: str, cmd: list[str], model: str, args, extra: dict, env: dict | None = None) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    OUT.mkdir(parents=True, exist_ok=True)
    proc = start(cmd + ["--port", str(port)], url, OUT / f"serve_{name}.log", args.startup_timeout, env)
    rows = []
    try:
        asyncio.run(run_load(url, model, 1, 1, 4, extra))  # warm-up
        for clients in args.clients:
            try:
                row = {"server": name, **asyncio.run(run_load(url, model, clients, args.requests_per_client,
                                                              args.max_tokens, extra))}
            except httpx.HTTPError as e:  # a peer that cannot take this load: record it, stop loading it
                print(f"  {name:12s} {clients:3d} clients: FAILED ({type(e).__name__}: {e})", flush=True)
                rows.append({"server": name, "clients": clients, "error": f"{type(e).__name__}: {e}"})
                break
            print(f"  {name:12s} {clients:3d} clients: {row['output_tok_per_s']:7.1f} tok/s, "
                  f"TTFT p50 {row['ttft_p50_s']:.2f}s", flush=True)
            rows.append(row)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| server | clients | requests | req/s | output tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['server']} | {r['clients']} | failed: {r['error'][:60]} | | | | | | |")
            continue
        lines.append(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | "
                     f"{r['output_tok_per_s']:.1f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
                     f"{1e3 * r['itl_p50_s']:.1f} | {1e3 * r['itl_p99_s']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == name and "error" not in r]
        xs = [r["clients"] for r in mine]
        ax1.plot(xs, [r["output_tok_per_s"] for r in mine], marker="o", label=name)
        ax2.plot(xs, [r["ttft_p50_s"] for r in mine], marker="o", label=name)
    ax1.set(xscale="log", xlabel="concurrent clients", ylabel="output tok/s (aggregate)", title="throughput")
    ax2.set(xscale="log", xlabel="concurrent clients", ylabel="TTFT p50 (s)", title="time to first token")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"SmolLM2-135M-Instruct, streaming chat; {machine()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def in_process_rate(args) -> float:
    """The engine in this process, one request at a time over the 1-client request sequence (chat
    template, greedy, max_tokens, EOS ignored): output tok/s, median of the requests."""
    from fp8_turbo import LLM, SamplingParams

    llm = LLM(args.model, quantization=args.quantization, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.chat([{"role": "user", "content": PROMPTS[0]}], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    rates = []
    for k in range(max(args.requests_per_client, 3)):
        llm.engine.block_manager.enable_prefix_caching = False
        t0 = time.perf_counter()
        out = llm.chat([{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}], params)
        rates.append(len(out[0].outputs[0].token_ids) / (time.perf_counter() - t0))
    llm.shutdown()
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quantization", default="fp8")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--peers", help="llama.cpp peers directory (bench/peers.py)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama-server even when the peers have it")
    p.add_argument("--no-in-process", action="store_true", help="skip the in-process single-stream reference")
    args = p.parse_args()

    ours = [sys.executable, "-m", "fp8_turbo", "serve", "--model", args.model, "--quantization", args.quantization,
            "--served-model-name", "bench"]
    print(f"fp8-turbo server ({args.model}, {args.quantization}); {machine()}", flush=True)
    # ignore_eos: every request produces exactly max_tokens, so both servers do the same work.
    rows = bench_server("fp8-turbo", ours, "bench", args, {"ignore_eos": True})
    note, build = None, None
    peers = None if args.no_llama_cpp else peer_tools.find(args.peers)
    server = peers.binary("llama-server") if peers is not None else None
    if args.no_llama_cpp:
        note = "llama-server skipped (--no-llama-cpp)"
    elif server is None or peers.q8_0 is None:
        note = "no llama-server / Q8_0 GGUF in the peers directory (bench/peers.py): peer skipped"
    else:
        slots = max(args.clients)
        peer = [str(server), "-m", str(peers.q8_0), "--host", "127.0.0.1", "--alias", "bench", "-np", str(slots),
                "-c", str(slots * 1024), "-t", str(os.cpu_count())]
        rows += bench_server("llama.cpp", peer, "bench", args, {"ignore_eos": True}, env=peers.env())
        build = peers.build()
    in_process = None if args.no_in_process else in_process_rate(args)

    print()
    print(table(rows))
    one = next((r for r in rows if r["server"] == "fp8-turbo" and r.get("clients") == 1 and "error" not in r), None)
    if in_process and one:
        print(f"\n1 streaming client: {one['output_tok_per_s']:.1f} tok/s = {one['output_tok_per_s'] / in_process:.0%} of "
              f"the engine in-process ({in_process:.1f} tok/s, same requests)")
    for clients in args.clients:
        ours = next((r for r in rows if r["server"] == "fp8-turbo" and r.get("clients") == clients and "error" not in r), None)
        peer = next((r for r in rows if r["server"] == "llama.cpp" and r.get("clients") == clients and "error" not in r), None)
        if ours and peer:
            print(f"{clients} clients: fp8-turbo / llama-server = {ours['output_tok_per_s'] / peer['output_tok_per_s']:.2f}x")
    if build:
        print(f"llama-server build {build}")
    if note:
        print(f"\n{note}")
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "model": args.model, "quantization": args.quantization,
              "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client, "note": note,
              "llama_cpp_build": build, "in_process_tok_per_s": in_process, "rows": rows}
    (OUT / "serve.json").write_text(json.dumps(result, indent=2))
    plot(rows, OUT / "serve.png")
    print(f"\nwrote {OUT / 'serve.json'} and {OUT / 'serve.png'}")


if __name__ == "__main__":
    main()
