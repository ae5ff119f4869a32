"""Single-stream decode speed: fp8-turbo vs transformers' `generate`, same model, prompt and length.

SmolLM2-135M-Instruct (the embedded GGUF, dequantized to fp32 on both sides), one chat prompt,
greedy, N new tokens (EOS ignored so both produce exactly N), median of R runs, both measured in this
run on this machine. Prints a markdown table and writes JSON + PNG to bench/out/.

    .venv/bin/python bench/generate.py [--new-tokens 128] [--runs 3] [--schemes none,fp8]
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

from engine import LLM, SamplingParams
from engine.checkpoints.source import resolve_model

OUT = Path(__file__).parent / "out"
PROMPT = [{"role": "user", "content": "Explain in a few paragraphs why the sky is blue."}]


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def time_ours(scheme: str, new_tokens: int, runs: int) -> tuple[list[float], list[int]]:
    llm = LLM("smollm2-135m-instruct", quantization=scheme, device="cpu")
    ids = llm.tokenizer.apply_chat_template(PROMPT)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    rates, tokens = [], []
    for _ in range(runs):
        llm.engine.block_manager.enable_prefix_caching = False  # measure the prompt too, every run
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], params)[0]
        rates.append(new_tokens / (time.perf_counter() - t0))
        tokens = out.outputs[0].token_ids
    return rates, tokens


def time_transformers(new_tokens: int, runs: int, prompt_ids: list[int]) -> tuple[list[float], list[int]]:
    from transformers import AutoModelForCausalLM

    path = resolve_model("smollm2-135m-instruct").path
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.tensor([prompt_ids])
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    with torch.inference_mode():
        model.generate(x, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        rates, tokens = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            out = model.generate(x, **kwargs)
            rates.append(new_tokens / (time.perf_counter() - t0))
            tokens = out[0, len(prompt_ids):].tolist()
    return rates, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--schemes", default="none,fp8", help="comma-separated quantization schemes of ours")
    args = ap.parse_args()

    rows = []
    ours_tokens = {}
    for scheme in args.schemes.split(","):
        rates, toks = time_ours(scheme, args.new_tokens, args.runs)
        ours_tokens[scheme] = toks
        rows.append({"engine": f"fp8-turbo ({scheme})", "tok_s": statistics.median(rates), "runs": rates})
    llm_ids = LLM("smollm2-135m-instruct", quantization="none", device="cpu").tokenizer.apply_chat_template(PROMPT)
    rates, ref_tokens = time_transformers(args.new_tokens, args.runs, llm_ids)
    rows.append({"engine": "transformers generate (fp32)", "tok_s": statistics.median(rates), "runs": rates})
    base = rows[-1]["tok_s"]
    for r in rows:
        r["vs_transformers"] = r["tok_s"] / base

    print(f"\nSingle-stream decode, SmolLM2-135M-Instruct, {args.new_tokens} new tokens, median of {args.runs}")
    print(f"machine: {machine()}\n")
    print("| engine | tok/s (median) | runs | vs transformers |")
    print("|---|---:|---|---:|")
    for r in rows:
        runs = ", ".join(f"{x:.1f}" for x in r["runs"])
        print(f"| {r['engine']} | {r['tok_s']:.1f} | {runs} | {r['vs_transformers']:.2f}x |")
    if "none" in ours_tokens:
        same = ours_tokens["none"] == ref_tokens
        print(f"\nfp32 greedy tokens identical to transformers: {same}")

    OUT.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "generate", "machine": machine(), "new_tokens": args.new_tokens, "runs": args.runs, "rows": rows}
    (OUT / "generate.json").write_text(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["engine"] for r in rows], [r["tok_s"] for r in rows], color=["#3b7dd8"] * (len(rows) - 1) + ["#999999"])
    ax.set_xlabel("decode tokens/s (single stream, median)")
    ax.set_title(f"SmolLM2-135M on {os.cpu_count()} CPU cores, {args.new_tokens} new tokens")
    fig.tight_layout()
    fig.savefig(OUT / "generate.png", dpi=120)
    print(f"wrote {OUT / 'generate.json'} and {OUT / 'generate.png'}")


if __name__ == "__main__":
    main()
