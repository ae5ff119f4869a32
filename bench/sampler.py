"""Sampler time per decode step, as a share of the step, for mixed per-request parameters.

Batches 1/16/64 at vocab 49152 (SmolLM2) and 128256 (Llama 3). Rows cycle through eight kinds:
top_p seeded, greedy, top_k, greedy + repetition penalty, plain temperature, top_p + frequency/presence
penalties seeded, min_p, top_k + top_p + repetition penalty + 5 logprobs (prompt 256 tokens, 128
generated). Batch 1 is the first kind (top_p, seeded).

Two steps to compare with, both measured in the same run:
- proxy: the linear layers of SmolLM2's 30 layers (hidden 576, MLP 1536, 9 heads x 64, 3 KV heads)
  plus the lm_head at that vocab, fp32, at that batch. Attention, norms and rotary are left out, so
  the real step is longer and the real share smaller. Gives the 128256 column too.
- engine: the real thing, vocab 49152: `LLM("smollm2-135m-instruct")` generating 24 tokens for B
  short prompts with the same parameter mix; the sampler call and `engine.step()` are timed inside
  the engine (median over the steps that sample all B rows).

Logits: `real` = SmolLM2-135M-Instruct's logits at 64 positions of a text (teacher-forced, from the
embedded GGUF through transformers, cached in bench/out/); for vocab 128256 each row gets 79104
extra tokens drawn from its own lower half, so the head of the distribution stays real. `random` =
N(0, 2^2) logits, where top_p nuclei span most of the vocabulary (a worst case for top_p).

    .venv/bin/python bench/sampler.py [--logits real,random] [--runs 9] [--device cpu] [--clock wall|cpu]
                                      [--engine none,fp8]
Prints a markdown table, writes bench/out/sampler.json and bench/out/sampler.png.
`--clock cpu` runs torch on one thread and times the thread's CPU time: on a shared, busy machine
that is the stable number (wall time there mostly measures waiting for a core).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fp8_turbo.engine.sampling.sampler import Sampler, SamplingRow
from fp8_turbo.engine.sampling.params import SamplingParams

OUT = Path(__file__).parent / "out"
BATCHES = (1, 16, 64)
VOCABS = (49152, 128256)
HIDDEN, MLP, LAYERS, QKV = 576, 1536, 30, 576 + 2 * 3 * 64
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his father "
    "had taught him. From the lamp room he could see the whole bay: the fishing boats returning with their "
    "catch, the gulls circling above the harbour, and the long line of cliffs that faded into the mist to the "
    "north. He trimmed the wick, polished the great lens until it shone, and wrote the weather in his logbook. "
    "Some nights the sea was calm and silver under the moon; on others the wind howled around the tower and "
    "waves broke white against the rocks below. In all his years he had never once let the light go out, and "
    "the sailors who passed the point knew his name, though few of them had ever seen his face. When the "
    "letter arrived telling him that the light would soon be automated, he read it twice, folded it carefully, "
    "and put it in the drawer beside his bed."
)
KINDS = [
    dict(temperature=0.7, top_p=0.9, seed=1),
    dict(temperature=0.0),
    dict(temperature=0.8, top_k=40),
    dict(temperature=0.0, repetition_penalty=1.1),
    dict(temperature=1.0),
    dict(top_p=0.95, frequency_penalty=0.5, presence_penalty=0.3, seed=2),
    dict(temperature=0.9, min_p=0.05),
    dict(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2, logprobs=5),
]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def make_rows(batch: int, vocab: int, device: torch.device) -> list[SamplingRow]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(batch):
        kind = dict(KINDS[i % len(KINDS)])
        seed = kind.pop("seed", None)
        seed = None if seed is None else seed + i
        rows.append(SamplingRow(
            SamplingParams(**kind, seed=seed, max_tokens=1024),
            torch.randint(vocab, (256,), generator=g).tolist(),
            torch.randint(vocab, (128,), generator=g).tolist(),
            seed,
            eos_token_ids=[2],
        ))
    return rows


def real_logits() -> torch.Tensor:
    """[64, 49152] SmolLM2 logits, computed once and cached."""
    cache = OUT / "smollm2_logits.pt"
    if cache.exists():
        return torch.load(cache)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fp8_turbo.engine.checkpoints.source import resolve_model

    path = resolve_model("smollm2-135m-instruct").path
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :128]
    with torch.inference_mode():
        logits = model(ids).logits[0, -64:].contiguous()  # positions with some context behind them
    OUT.mkdir(exist_ok=True)
    torch.save(logits, cache)
    return logits


def logits_for(source: str, batch: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if source == "random":
        return torch.randn(batch, vocab, generator=g) * 2.0
    base = real_logits()
    rows = base[torch.arange(batch) % base.shape[0]]
    if vocab > rows.shape[1]:  # a longer tail from each row's own lower half
        low = rows.sort(dim=-1).values[:, : rows.shape[1] // 2]
        pick = torch.randint(low.shape[1], (batch, vocab - rows.shape[1]), generator=g)
        rows = torch.cat([rows, low.gather(1, pick)], dim=1)
    return rows


class ProxyStep:
    """The linear layers of a SmolLM2-sized decode step, fp32: 30 x (qkv, o, gate_up, down) + lm_head."""

    def __init__(self, vocab: int, device: torch.device):
        g = torch.Generator().manual_seed(2)

        def weight(n: int, k: int) -> torch.Tensor:
            return (torch.randn(n, k, generator=g) / k**0.5).to(device)

        self.layers = [(weight(QKV, HIDDEN), weight(HIDDEN, HIDDEN), weight(2 * MLP, HIDDEN), weight(HIDDEN, MLP))
                       for _ in range(LAYERS)]
        self.lm_head = weight(vocab, HIDDEN)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for qkv, o, gate_up, down in self.layers:
            attn = (x @ qkv.T)[:, :HIDDEN]  # stands in for attention's output
            x = x + attn @ o.T
            gate, up = (x @ gate_up.T).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ down.T
        return x @ self.lm_head.T


def timed(fn, device: torch.device, clock) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def measure(source: str, batch: int, vocab: int, step: ProxyStep, runs: int, device: torch.device, clock) -> dict:
    logits = logits_for(source, batch, vocab).to(device)
    rows = make_rows(batch, vocab, device)
    sampler = Sampler(seed=0)
    hidden = torch.randn(batch, HIDDEN, device=device)
    sampler_times, step_times = [], []
    for run in range(runs + 1):  # alternate the two so both see the same machine load; run 0 warms up
        scratch = logits.clone()  # the sampler overwrites its input
        t_sample = timed(lambda: sampler(scratch, rows), device, clock)
        t_step = timed(lambda: step(hidden), device, clock)
        if run:
            sampler_times.append(t_sample)
            step_times.append(t_step)
    sampler_ms, step_ms = statistics.median(sampler_times) * 1e3, statistics.median(step_times) * 1e3
    return dict(step="proxy", logits=source, vocab=vocab, batch=batch, sampler_ms=sampler_ms, step_ms=step_ms,
                share=sampler_ms / step_ms)


def measure_engine(quantization: str, batches: tuple[int, ...], clock) -> list[dict]:
    """Sampler time inside the real engine's decode steps, for each batch size."""
    from fp8_turbo import LLM

    llm = LLM("smollm2-135m-instruct", quantization=quantization, device="cpu")
    engine, sampler, step = llm.engine, llm.engine.sampler, llm.engine.step
    calls: list[tuple[int, float, float]] = []  # (rows sampled, sampler seconds, step seconds)

    def timed_sampler(logits, rows):
        start = clock()
        out = sampler(logits, rows)
        calls.append((len(rows), clock() - start, 0.0))
        return out

    def timed_step():
        start = clock()
        out = step()
        if calls and calls[-1][2] == 0.0:
            calls[-1] = (calls[-1][0], calls[-1][1], clock() - start)
        return out

    engine.sampler, engine.step = timed_sampler, timed_step
    results = []
    for batch in batches:
        calls.clear()
        prompts = [f"Write a short story about lighthouse keeper number {i}." for i in range(batch)]
        params = []
        for i in range(batch):
            kind = dict(KINDS[i % len(KINDS)])
            if "seed" in kind:
                kind["seed"] += i
            params.append(SamplingParams(**kind, max_tokens=24, ignore_eos=True))
        llm.generate(prompts, params)
        full = [(s, t) for n, s, t in calls if n == batch and t > 0][1:]  # skip the prefill step
        sampler_ms = statistics.median(s for s, _ in full) * 1e3
        step_ms = statistics.median(t for _, t in full) * 1e3
        results.append(dict(step=f"engine ({quantization})", logits="model", vocab=49152, batch=batch,
                            sampler_ms=sampler_ms, step_ms=step_ms, share=sampler_ms / step_ms))
    engine.sampler, engine.step = sampler, step
    return results


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["step"], r["logits"], r["vocab"]) for r in results))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(BATCHES)
    for j, batch in enumerate(BATCHES):
        share = {(r["step"], r["logits"], r["vocab"]): 100 * r["share"] for r in results if r["batch"] == batch}
        xs = [g + (j - (len(BATCHES) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [share.get(key, 0.0) for key in groups], width, label=f"batch {batch}")
    ax.set_xticks(range(len(groups)), [f"{step}\n{logits} logits\nV={vocab}" for step, logits, vocab in groups],
                  fontsize=8)
    ax.axhline(5, color="tab:red", linestyle="--", label="goal: 5% at batch 64")
    ax.set_ylabel("sampler time / step time (%)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logits", default="real,random")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--engine", default="none,fp8", help="quantizations to run the real engine with ('' = skip)")
    args = parser.parse_args()
    device = torch.device(args.device)
    clock = time.perf_counter
    if args.clock == "cpu":
        assert device.type == "cpu", "--clock cpu times CPU work only"
        torch.set_num_threads(1)
        clock = time.thread_time

    results = []
    for vocab in VOCABS:
        step = ProxyStep(vocab, device)
        for source in args.logits.split(","):
            for batch in BATCHES:
                results.append(measure(source, batch, vocab, step, args.runs, device, clock))
        del step
    for quantization in filter(None, args.engine.split(",")):
        results += measure_engine(quantization, BATCHES, clock)

    where = machine(device) + (", CPU time of one thread" if args.clock == "cpu" else ", wall time")
    print(f"Sampler vs a SmolLM2-sized decode step (linear layers + lm_head, fp32), {where}, median of {args.runs}\n")
    print("| step | logits | vocab | batch | sampler ms | step ms | sampler / step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['step']} | {r['logits']} | {r['vocab']} | {r['batch']} | {r['sampler_ms']:.2f} | {r['step_ms']:.1f} "
              f"| {100 * r['share']:.1f}% |")
    OUT.mkdir(exist_ok=True)
    (OUT / "sampler.json").write_text(json.dumps({"machine": where, "clock": args.clock, "runs": args.runs, "results": results}, indent=2))
    plot(results, OUT / "sampler.png", f"sampler share of a decode step, {where}")
    print(f"\nwrote {OUT / 'sampler.json'} and {OUT / 'sampler.png'}")


if __name__ == "__main__":
    main()
