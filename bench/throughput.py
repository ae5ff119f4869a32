"""Batched generation throughput: fp8-turbo's continuous batching vs transformers' static batch, and vs
llama.cpp's own batched decoding on the same work.

SmolLM2-135M-Instruct on CPU. For each concurrency N, N chat requests with mixed prompt lengths and
mixed output lengths run at once (EOS ignored so both engines produce the same number of tokens).
fp8-turbo: aggregate output tok/s, time to first token and inter-token latency (p50/p99), taken
from per-request step timestamps. transformers: one left-padded `generate` call over the same
prompts with max_new_tokens = the longest request (it cannot stop rows early), output tok/s counted
on the tokens the requests asked for. Both run in this process, one after the other.

llama.cpp (`llama-batched-bench` from the peers directory, bench/peers.py, on the Q8_0 GGUF): the
shapes it measures, run by ours as requests through the engine: B sequences of P random prompt
tokens each generating G tokens (output tok/s with the prompts' time included: B*G / (T_PP + T_TG)),
and a 512-token prompt's time to its first token (llama.cpp's T_PP of -npp 512 -npl 1). llama.cpp
decodes without sampling; ours samples (greedy) and detokenizes every token.

    .venv/bin/python bench/throughput.py [--concurrency 1,8,32,64] [--max-tokens 64] [--schemes fp8,none]
                                         [--peers DIR] [--no-llama-cpp] [--skip-transformers]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from fp8_turbo import LLM, SamplingParams
from fp8_turbo.engine.checkpoints.source import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers as peer_tools  # noqa: E402

OUT = Path(__file__).parent / "out"
# llama-batched-bench shapes: (label, prompt tokens P, generated tokens G, sequences B)
PEER_SHAPES = (("1 x (128 + 64)", 128, 64, 1), ("32 x (128 + 64)", 128, 64, 32), ("pp512 TTFT", 512, 1, 1))
TOPICS = ["the water cycle", "binary search", "the French revolution", "photosynthesis", "TCP handshakes",
          "black holes", "sourdough bread", "public-key cryptography"]


def make_prompts(llm: LLM, n: int, max_tokens: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) pairs: prompt lengths vary with the request, outputs 50-100% of max."""
    out = []
    for i in range(n):
        detail = " Please be thorough and give examples." * (i % 4)
        msg = [{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} to a student.{detail}"}]
        out.append((llm.tokenizer.apply_chat_template(msg), max_tokens // 2 + (i * 7) % (max_tokens // 2 + 1)))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_ours(llm: LLM, prompts: list[tuple[list[int], int]]) -> dict:
    engine = llm.engine
    engine.block_manager.enable_prefix_caching = False  # every run computes its prompts
    start = time.perf_counter()
    times: dict[str, list[float]] = {}
    for i, (ids, max_tokens) in enumerate(prompts):
        engine.add_request(str(i), ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        times[str(i)] = []
    produced: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            n = len(out.outputs[0].token_ids)
            times[out.request_id].extend([now] * (n - produced.get(out.request_id, 0)))
            produced[out.request_id] = n
    wall = time.perf_counter() - start
    ttft = [t[0] - start for t in times.values()]
    itl = [b - a for t in times.values() for a, b in zip(t, t[1:])]
    total = sum(produced.values())
    return {"tok_s": total / wall, "wall_s": wall, "tokens": total, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99)}


def run_transformers(model, prompts: list[tuple[list[int], int]]) -> dict:
    width = max(len(ids) for ids, _ in prompts)
    input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, (ids, _) in enumerate(prompts):  # left padding
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    new = max(m for _, m in prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    wall = time.perf_counter() - start
    total = sum(m for _, m in prompts)
    return {"tok_s": total / wall, "wall_s": wall, "tokens": total}


def run_shape(llm: LLM, prompt: int, gen: int, seqs: int, seed: int = 0) -> dict:
    """B requests of P random prompt tokens generating G tokens each, all at once: output tok/s over the
    whole run (prompts included) and the first token's time."""
    rng = random.Random(seed)
    vocab = llm.engine.model_config.vocab_size
    prompts = [([rng.randrange(100, vocab) for _ in range(prompt)], gen) for _ in range(seqs)]
    r = run_ours(llm, prompts)
    return {"tok_s": r["tokens"] / r["wall_s"], "wall_s": r["wall_s"], "ttft_s": r["ttft_p50"]}


def run_batched_bench(peers: peer_tools.Peers, prompt: int, gen: int, seqs: int) -> dict | None:
    """llama-batched-bench's row for one shape (jsonl output), None when it is missing or fails."""
    exe, gguf = peers.binary("llama-batched-bench"), peers.q8_0
    if exe is None or gguf is None:
        return None
    cmd = [str(exe), "-m", str(gguf), "-c", str(max(2048, seqs * (prompt + gen) + 64)), "-b", "2048", "-ub", "512",
           "-npp", str(prompt), "-ntg", str(gen), "-npl", str(seqs), "-t", str(os.cpu_count()),
           "--output-format", "jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=peers.env())
    rows = [json.loads(line) for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        print(f"  llama-batched-bench failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    r = rows[-1]
    return {"tok_s": seqs * gen / r["t"], "wall_s": r["t"], "ttft_s": r["t_pp"], "speed_tg": r["speed_tg"],
            "speed_pp": r["speed_pp"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--schemes", "--scheme", default="fp8,none",
                    help="comma-separated quantization schemes of ours (transformers runs fp32)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--peers", help="llama.cpp peers directory (bench/peers.py)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama-batched-bench comparison")
    args = ap.parse_args()
    peers = None if args.no_llama_cpp else peer_tools.find(args.peers)
    schemes = args.schemes.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]

    rows = [{"concurrency": n, "ours": {}, "transformers": None, "ratio": {}} for n in levels]
    prompts: dict[int, list] = {}
    peer_rows: dict[str, dict] = {}
    for scheme in schemes:  # one engine at a time: each has the machine (and its memory) to itself
        llm = LLM("smollm2-135m-instruct", quantization=scheme, device="cpu", max_num_seqs=64)
        prompts = prompts or {n: make_prompts(llm, n, args.max_tokens) for n in levels}
        run_ours(llm, make_prompts(llm, 2, 4))  # warm-up
        for row in rows:
            row["ours"][scheme] = run_ours(llm, prompts[row["concurrency"]])
        if peers is not None:
            for label, p, g, b in PEER_SHAPES:
                peer_rows.setdefault(label, {"shape": (p, g, b), "ours": {}})["ours"][scheme] = run_shape(llm, p, g, b)
        print(f"{scheme}: KV capacity {llm.engine.kv_capacity_tokens} tokens ({llm.engine.kv_dtype})")
        llm.shutdown()
        del llm
    ref = None
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        path = resolve_model("smollm2-135m-instruct").path
        ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        for row in rows:
            row["transformers"] = run_transformers(ref, prompts[row["concurrency"]])
            for scheme in schemes:
                row["ratio"][scheme] = row["ours"][scheme]["tok_s"] / row["transformers"]["tok_s"]

    build = None
    if peer_rows:
        for label, row in peer_rows.items():
            row["llama_cpp"] = run_batched_bench(peers, *row["shape"])
        build = peers.build()
    machine = f"{peer_tools.cpu()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"\nThroughput, SmolLM2-135M-Instruct on CPU, up to {args.max_tokens} new tokens per request")
    print(f"machine: {machine}\n")
    print("| clients | scheme | ours tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | transformers tok/s | ratio |")
    print("|---:|---|---:|---|---|---:|---:|")
    for r in rows:
        t = r["transformers"]
        for scheme in schemes:
            o = r["ours"][scheme]
            ref_s = f"{t['tok_s']:.1f}" if t else "-"
            ratio = f"{r['ratio'][scheme]:.2f}x" if t else "-"
            print(f"| {r['concurrency']} | {scheme} | {o['tok_s']:.1f} | {o['ttft_p50']:.2f} / {o['ttft_p99']:.2f} | "
                  f"{1e3 * o['itl_p50']:.0f} / {1e3 * o['itl_p99']:.0f} | {ref_s} | {ratio} |")

    if peer_rows:
        print(f"\nvs llama.cpp's own batched decoding (llama-batched-bench, Q8_0, build {build}), the same shapes: "
              f"B sequences x (P prompt + G generated tokens), output tok/s with the prompts' time included; "
              f"pp512: time to the first token\n")
        print("| shape | engine | output tok/s | first token (s) | ratio vs llama.cpp |")
        print("|---|---|---:|---:|---:|")
        for label, row in peer_rows.items():
            peer = row["llama_cpp"]
            for scheme in schemes:
                o = row["ours"][scheme]
                if label.startswith("pp"):
                    ratio = peer["ttft_s"] / o["ttft_s"] if peer else None  # > 1: ours is faster
                else:
                    ratio = o["tok_s"] / peer["tok_s"] if peer else None
                row.setdefault("ratio", {})[scheme] = ratio
                print(f"| {label} | fp8-turbo {scheme} | {o['tok_s']:.1f} | {o['ttft_s']:.3f} | "
                      f"{f'{ratio:.2f}x' if ratio else '-'} |")
            if peer:
                print(f"| {label} | llama.cpp Q8_0 | {peer['tok_s']:.1f} | {peer['ttft_s']:.3f} | 1.00x |")

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "throughput.json").write_text(json.dumps({"benchmark": "throughput", "machine": machine, "schemes": schemes,
                                                     "max_tokens": args.max_tokens, "rows": rows,
                                                     "llama_cpp_build": build, "vs_llama_cpp": peer_rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [r["concurrency"] for r in rows]
    for scheme in schemes:
        ax.plot(xs, [r["ours"][scheme]["tok_s"] for r in rows], "o-", label=f"fp8-turbo {scheme} (continuous batching)")
    if ref is not None:
        ax.plot(xs, [r["transformers"]["tok_s"] for r in rows], "s--", label="transformers fp32 generate (static batch)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.legend(fontsize=7)
    ax.set_title("SmolLM2-135M on CPU")
    fig.tight_layout()
    fig.savefig(OUT / "throughput.png", dpi=120)
    print(f"wrote {OUT / 'throughput.json'} and {OUT / 'throughput.png'}")


if __name__ == "__main__":
    main()
