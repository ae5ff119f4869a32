"""Tensor parallelism on the CPU (gloo): step time TP=1 vs TP=N, the share spent in collectives, and
per-rank memory after loading.

SmolLM2-135M-Instruct (9 heads, 3 KV heads, so N=3), schemes none and fp8. Each (N, scheme) runs in a
process of its own, so its peak memory is its own. Measured there:
- load: wall time; per rank the weight bytes it holds, its peak resident set (VmHWM, which counts the
  checkpoint's file pages it touched: shared page cache) and its anonymous resident set after loading
  (what it holds), and rank 0's resident set before loading (imports: the floor of every rank);
- prefill: one step of a 256-token prompt (median of --runs);
- decode: B sequences (16-token prompts) for 32 steps after their prefill: median step wall time, each
  rank's CPU time per step, and the time inside collectives (all-reduce, gather) per step -- on rank 0,
  which includes waiting for slower ranks -- plus rank 0's step-message broadcast; the share is the
  collectives' total over the same steps' total wall time (the run with the median step of --runs);
- probe: one all-reduce of a decode step's activation [B, 576] fp32 with every rank in step (a barrier
  first): the transfer cost alone.
One torch thread per rank (TP=1 too): on a 2-core machine TP=3 runs 3 ranks on 2 cores, so it is slower
by construction; the point is the collective share and the memory per rank.

    OMP_NUM_THREADS=1 flock /tmp/fp8turbo-bench.lock .venv/bin/python bench/tp.py [--tp 1,3] [--schemes none,fp8]
        [--batches 1,16] [--runs 3]
Prints a markdown table, writes bench/out/tp.json, bench/out/tp.md and bench/out/tp.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "out"
MODEL = "smollm2-135m-instruct"
DECODE_STEPS = 32


# ---------------------------------------------------------------------------------------- on every rank


def cpu_seconds(model) -> float:
    return time.process_time()


def allreduce_probe(model, rows: list[int], iters: int) -> dict[int, float]:
    """Seconds per all-reduce of [rows, hidden] fp32 on the model group, all ranks in step."""
    import torch.distributed as dist

    tp, out = model.tp, {}
    for r in rows:
        x = torch.zeros(r, model.cfg.hidden_size)
        dist.barrier(group=tp.group)
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x, group=tp.group)
        out[r] = (time.perf_counter() - t0) / iters
    return out


# ---------------------------------------------------------------------------------------- one configuration


def run_config(tp: int, scheme: str, batches: list[int], runs: int) -> dict:
    from fp8_turbo import LLM, SamplingParams
    from fp8_turbo.engine.core.workers import collective_timing, memory_report

    floor = memory_report(torch.nn.Module())  # before loading: imports only
    t0 = time.perf_counter()
    llm = LLM(MODEL, quantization=scheme, tensor_parallel_size=tp, device="cpu", kv_cache_memory_bytes=64 << 20)
    load_s = time.perf_counter() - t0
    engine = llm.engine
    memory = engine.collective_rpc(memory_report)
    message_s = [0.0]
    if engine.workers is not None:  # time rank 0's step message
        send = engine.workers.send_step

        def timed_send(host):
            t = time.perf_counter()
            try:
                return send(host)
            finally:
                message_s[0] += time.perf_counter() - t

        engine.workers.send_step = timed_send

    prompt = llm.tokenizer.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 40))[:256]
    prefill = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        engine.sequence_logits(prompt)
        prefill.append(time.perf_counter() - t)
    result = dict(tp=tp, scheme=scheme, load_s=load_s, floor_rss=floor.get("VmRSS", 0), memory=memory,
                  prefill_ms=statistics.median(prefill[1:]) * 1e3, decode={})
    for b in batches:
        runs_out = []
        for _ in range(runs):
            for i in range(b):
                engine.add_request(f"b{b}-{i}-{time.monotonic_ns()}", prompt[i:i + 16],
                                   SamplingParams(temperature=0, max_tokens=DECODE_STEPS + 8, ignore_eos=True))
            while engine.scheduler.waiting:  # prefill until every sequence decodes
                engine.step()
            engine.step()
            cpu0 = engine.collective_rpc(cpu_seconds)
            engine.collective_rpc(collective_timing, True)
            message_s[0] = 0.0
            steps = []
            for _ in range(DECODE_STEPS):
                t = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - t)
            timing = engine.collective_rpc(collective_timing, False)
            cpu1 = engine.collective_rpc(cpu_seconds)
            while engine.has_unfinished_requests():
                engine.step()
            runs_out.append(dict(
                step_ms=statistics.median(steps) * 1e3, total_s=sum(steps),
                cpu_ms_per_step=[(c1 - c0) / DECODE_STEPS * 1e3 for c0, c1 in zip(cpu0, cpu1)],
                collective_ms_per_step=[t["collective_seconds"] / DECODE_STEPS * 1e3 for t in timing],
                collective_calls_per_step=timing[0]["collective_calls"] / DECODE_STEPS,
                message_ms_per_step=message_s[0] / DECODE_STEPS * 1e3))
        best = sorted(runs_out, key=lambda r: r["step_ms"])[len(runs_out) // 2]  # the median run
        probe = engine.collective_rpc(allreduce_probe, [b], 200)[0][b] if tp > 1 else 0.0
        result["decode"][b] = dict(best, allreduce_probe_us=probe * 1e6,
                                   step_ms_runs=[r["step_ms"] for r in runs_out])
    llm.shutdown()
    return result


# ---------------------------------------------------------------------------------------- report


def table(results: list[dict]) -> str:
    mb = 1 / 2**20
    lines = ["| TP | scheme | load s | weights/rank MB | peak RSS/rank MB | anon RSS/rank MB | prefill 256 ms | B | "
             "decode step ms | CPU ms/step (ranks) | collectives ms/step (rank 0) | share | calls/step | message ms | "
             "all-reduce us |",
             "|---|---|---:|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        weights = "/".join(f"{m['weight_bytes'] * mb:.0f}" for m in r["memory"])
        peak = "/".join(f"{m.get('VmHWM', 0) * mb:.0f}" for m in r["memory"])
        anon = "/".join(f"{m.get('RssAnon', 0) * mb:.0f}" for m in r["memory"])
        for b, d in r["decode"].items():
            cpu = "/".join(f"{c:.1f}" for c in d["cpu_ms_per_step"])
            coll = d["collective_ms_per_step"][0]
            share = coll * DECODE_STEPS / (d["total_s"] * 1e3)  # of the same steps' total wall time
            lines.append(f"| {r['tp']} | {r['scheme']} | {r['load_s']:.1f} | {weights} | {peak} | {anon} | {r['prefill_ms']:.0f} | "
                         f"{b} | {d['step_ms']:.1f} | {cpu} | {coll:.2f} | {share:.0%} | "
                         f"{d['collective_calls_per_step']:.0f} | {d['message_ms_per_step']:.2f} | "
                         f"{d['allreduce_probe_us']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, compute, coll = [], [], []
    for r in results:
        for b, d in r["decode"].items():  # means over the measured steps
            labels.append(f"TP={r['tp']}\n{r['scheme']} B={b}")
            c = d["collective_ms_per_step"][0] + d["message_ms_per_step"]
            coll.append(c)
            compute.append(d["total_s"] * 1e3 / DECODE_STEPS - c)
    x = range(len(labels))
    ax1.bar(x, compute, label="rest of the step")
    ax1.bar(x, coll, bottom=compute, label="collectives + step message (rank 0)")
    ax1.set_xticks(list(x), labels, fontsize=7)
    ax1.set_ylabel("decode step, ms (mean of the measured steps)")
    ax1.set_title("SmolLM2 decode step on CPU (gloo)")
    ax1.legend(fontsize=8)
    names, weights, peaks = [], [], []
    for r in results:
        for rank, m in enumerate(r["memory"]):
            names.append(f"TP={r['tp']} {r['scheme']}\nrank {rank}")
            weights.append(m["weight_bytes"] / 2**20)
            peaks.append(m.get("VmHWM", 0) / 2**20)
    x = range(len(names))
    ax2.bar([i - 0.2 for i in x], weights, width=0.4, label="weights held")
    ax2.bar([i + 0.2 for i in x], peaks, width=0.4, label="peak RSS after loading")
    ax2.set_xticks(list(x), names, fontsize=6)
    ax2.set_ylabel("MB")
    ax2.set_title("Memory per rank")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", default="1,3")
    p.add_argument("--schemes", default="none,fp8")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "TP,scheme": run one config here
    p.add_argument("--report", action="store_true", help="only re-render the table and chart from bench/out/tp.json")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.report:
        saved = json.loads((OUT / "tp.json").read_text())
        results = [dict(r, decode={int(b): d for b, d in r["decode"].items()}) for r in saved["results"]]
        md = table(results)
        print(md)
        (OUT / "tp.md").write_text(f"{saved['meta']}\n\n{md}\n")
        plot(results, OUT / "tp.png")
        return
    if args.one:
        tp, scheme = args.one.split(",")
        print(json.dumps(run_config(int(tp), scheme, batches, args.runs)))
        return
    results = []
    for scheme in args.schemes.split(","):
        for tp in (int(t) for t in args.tp.split(",")):
            cmd = [sys.executable, __file__, "--one", f"{tp},{scheme}", "--batches", args.batches, "--runs", str(args.runs)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode:
                sys.exit(f"{cmd} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"TP={tp} {scheme}: done", file=sys.stderr)
    OUT.mkdir(exist_ok=True)
    meta = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
                model=MODEL, decode_steps=DECODE_STEPS, threads_per_rank=1,
                date=time.strftime("%Y-%m-%d"), load=os.getloadavg())
    md = table(results)
    print(md)
    (OUT / "tp.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    (OUT / "tp.md").write_text(f"{meta}\n\n{md}\n")
    plot(results, OUT / "tp.png")


if __name__ == "__main__":
    main()
