"""Single-stream decode speed and memory: fp8-turbo (each scheme) vs transformers' `generate` vs llama.cpp.

SmolLM2-135M-Instruct (the embedded GGUF), one chat prompt, greedy, N new tokens (EOS ignored so
every engine produces exactly N), the prompt computed in every run, median of R runs. Each engine
runs in its own process, one after the other, so its peak RSS is its own (load, warm-up and the
timed runs). Peers: transformers fp32 loading the same GGUF; llama-cpp-python (from the peers
directory, bench/peers.py: --peers DIR or $FP8_TURBO_PEERS) on the Q8_0 requantization made with
llama.cpp's own quantize API (the 8-bit peer of FP8) and on the bundled Q4_1 file. Prints a markdown
table naming the machine (CPU model and ISA) and llama.cpp's build, and writes JSON + PNG to bench/out/.

    .venv/bin/python bench/generate.py [--new-tokens 96] [--runs 3] [--schemes fp8,fp8-weight-only,none]
                                       [--peers DIR] [--no-llama-cpp]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers as peer_tools  # noqa: E402  (bench/peers.py; imports nothing outside the standard library)

OUT = Path(__file__).parent / "out"
PROMPT = [{"role": "user", "content": "Explain in a few paragraphs why the sky is blue."}]
WARMUP_TOKENS = 8


def machine() -> str:
    import torch

    return f"{peer_tools.cpu()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _time_runs(generate, new_tokens: int, runs: int) -> tuple[list[float], list[int]]:
    rates, tokens = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        tokens = generate()
        rates.append(new_tokens / (time.perf_counter() - t0))
    return rates, tokens


def prompt_ids() -> list[int]:
    from fp8_turbo.tokenizer import load_tokenizer
    from fp8_turbo.engine.checkpoints.source import resolve_model

    return load_tokenizer(resolve_model("smollm2-135m-instruct").path).apply_chat_template(PROMPT)


def worker_ours(scheme: str, new_tokens: int, runs: int) -> dict:
    from fp8_turbo import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM("smollm2-135m-instruct", quantization=scheme, device="cpu")
    load_s = time.perf_counter() - t0
    ids = llm.tokenizer.apply_chat_template(PROMPT)
    llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=WARMUP_TOKENS))
    rss_after_warmup = _peak_rss_mb()
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def generate() -> list[int]:
        llm.engine.block_manager.enable_prefix_caching = False  # measure the prompt too, every run
        return llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0].token_ids

    rates, tokens = _time_runs(generate, new_tokens, runs)
    return {"engine": f"fp8-turbo ({scheme})", "rates": rates, "tokens": tokens, "load_s": load_s,
            "rss_load_mb": rss_after_warmup, "peak_rss_mb": _peak_rss_mb()}


def worker_transformers(new_tokens: int, runs: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from fp8_turbo.engine.checkpoints.source import resolve_model

    ids = prompt_ids()
    path = resolve_model("smollm2-135m-instruct").path
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids])
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    with torch.inference_mode():
        model.generate(x, **{**kwargs, "max_new_tokens": WARMUP_TOKENS, "min_new_tokens": WARMUP_TOKENS})
        rss_after_warmup = _peak_rss_mb()
        rates, tokens = _time_runs(lambda: model.generate(x, **kwargs)[0, len(ids):].tolist(), new_tokens, runs)
    return {"engine": "transformers generate (fp32)", "rates": rates, "tokens": tokens, "load_s": load_s,
            "rss_load_mb": rss_after_warmup, "peak_rss_mb": _peak_rss_mb()}


def worker_llama_cpp(kind: str, gguf: str, ids: list[int], new_tokens: int, runs: int) -> dict:
    """Runs in the peers' Python (llama-cpp-python): the prompt ids and the GGUF come from the parent."""
    from llama_cpp import Llama, __version__

    path = Path(gguf)
    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=os.cpu_count(), n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0

    def generate(n: int = new_tokens) -> list[int]:
        out = []
        for tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):  # greedy; EOS ignored like the others
            out.append(tok)
            if len(out) == n:
                break
        return out

    generate(WARMUP_TOKENS)
    rss_after_warmup = _peak_rss_mb()
    rates, tokens = _time_runs(generate, new_tokens, runs)
    size_mb = path.stat().st_size / 1e6
    return {"engine": f"llama-cpp-python {__version__} ({kind}, {size_mb:.0f} MB)", "rates": rates, "tokens": tokens,
            "load_s": load_s, "rss_load_mb": rss_after_warmup, "peak_rss_mb": _peak_rss_mb()}


def run_worker(spec: str, args, peers: peer_tools.Peers | None) -> dict | None:
    """Run one engine in a child process (its own peak RSS); None when the peer is missing."""
    python, extra, env = sys.executable, [], dict(os.environ)
    if spec.startswith("llama_cpp:"):
        kind = spec.partition(":")[2]
        if peers is None or peers.python is None:
            print(f"  {spec}: skipped (no llama-cpp-python in the peers directory: see bench/peers.py)", file=sys.stderr)
            return None
        from fp8_turbo.engine.checkpoints.source import resolve_model

        gguf = peers.q8_0 if kind == "Q8_0" else resolve_model("smollm2-135m-instruct").path
        if gguf is None:
            print(f"  {spec}: skipped (no {peer_tools.Q8_0} in {peers.root})", file=sys.stderr)
            return None
        python, extra = str(peers.python), ["--gguf", str(gguf), "--prompt-ids", ",".join(map(str, prompt_ids()))]
        env = peers.env()  # the peers' own llama.cpp libraries (llama-cpp-python's bundled ones may not run here)
    cmd = [python, __file__, "--worker", spec, "--new-tokens", str(args.new_tokens), "--runs", str(args.runs), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        print(f"  {spec}: skipped ({tail[0]})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--schemes", default="fp8,fp8-weight-only,none", help="comma-separated quantization schemes of ours")
    ap.add_argument("--peers", help="llama.cpp peers directory (bench/peers.py; default $FP8_TURBO_PEERS or "
                                    "~/.cache/fp8-turbo-peers)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave llama-cpp-python out")
    ap.add_argument("--no-transformers", action="store_true", help="leave transformers out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        kind, _, arg = args.worker.partition(":")
        if kind == "ours":
            result = worker_ours(arg, args.new_tokens, args.runs)
        elif kind == "transformers":
            result = worker_transformers(args.new_tokens, args.runs)
        else:
            ids = [int(t) for t in args.prompt_ids.split(",")]
            result = worker_llama_cpp(arg, args.gguf, ids, args.new_tokens, args.runs)
        print(json.dumps(result))
        return

    peers = None if args.no_llama_cpp else peer_tools.find(args.peers)
    specs = [f"ours:{s}" for s in args.schemes.split(",")] + ([] if args.no_transformers else ["transformers"])
    if not args.no_llama_cpp:
        specs += ["llama_cpp:Q8_0", "llama_cpp:Q4_1"]
    rows = []
    for spec in specs:
        print(f"running {spec} ...", file=sys.stderr)
        r = run_worker(spec, args, peers)
        if r is not None:
            r["spec"], r["tok_s"] = spec, statistics.median(r["rates"])
            rows.append(r)
    by_spec = {r["spec"]: r for r in rows}
    base = by_spec.get("transformers", {}).get("tok_s")
    none = by_spec.get("ours:none", {}).get("tok_s")
    q8 = by_spec.get("llama_cpp:Q8_0", {}).get("tok_s")
    for r in rows:
        r["vs_transformers"] = r["tok_s"] / base if base else None
        r["vs_ours_none"] = r["tok_s"] / none if none else None
        r["vs_llama_cpp_q8_0"] = r["tok_s"] / q8 if q8 else None

    where = machine()
    build = peers.build() if peers is not None and q8 else None
    print(f"\nSingle-stream decode, SmolLM2-135M-Instruct, chat prompt, {args.new_tokens} greedy tokens, "
          f"median of {args.runs}\nmachine: {where}" + (f"; llama.cpp build {build}" if build else "") + "\n")
    print("| engine | tok/s (median) | runs | vs llama.cpp Q8_0 | vs transformers | vs ours none | load s | peak RSS MB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    fmt = lambda x: f"{x:.2f}x" if x else "-"  # noqa: E731
    for r in rows:
        runs = ", ".join(f"{x:.1f}" for x in r["rates"])
        print(f"| {r['engine']} | {r['tok_s']:.1f} | {runs} | {fmt(r['vs_llama_cpp_q8_0'])} | {fmt(r['vs_transformers'])} | "
              f"{fmt(r['vs_ours_none'])} | {r['load_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    if "ours:none" in by_spec and "transformers" in by_spec:
        same = by_spec["ours:none"]["tokens"] == by_spec["transformers"]["tokens"]
        print(f"\nours none (fp32) greedy tokens identical to transformers: {same}")
    if "ours:fp8" in by_spec and "ours:none" in by_spec:
        saved = by_spec["ours:none"]["peak_rss_mb"] - by_spec["ours:fp8"]["peak_rss_mb"]
        print(f"peak RSS, fp8 vs none: {saved:+.0f} MB saved")

    OUT.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "generate", "machine": where, "llama_cpp_build": build, "new_tokens": args.new_tokens,
              "runs": args.runs, "rows": rows}
    (OUT / "generate.json").write_text(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    names = [r["engine"] for r in rows]
    colors = ["#3b7dd8" if r["spec"].startswith("ours") else "#999999" for r in rows]
    ax.barh(names, [r["tok_s"] for r in rows], color=colors)
    ax.set_xlabel("decode tokens/s (single stream, median)")
    ax2.barh(names, [r["peak_rss_mb"] for r in rows], color=colors)
    ax2.set_xlabel("peak RSS (MB)")
    fig.suptitle(f"SmolLM2-135M, {args.new_tokens} new tokens; {where}", fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "generate.png", dpi=120)
    print(f"wrote {OUT / 'generate.json'} and {OUT / 'generate.png'}")


if __name__ == "__main__":
    main()
