"""Paged decode attention microbenchmark: kernels.paged_attention_decode vs gather + torch SDPA.

    .venv/bin/python bench/attention.py                        # GPU: batch x context grid, bf16 and fp8 KV
    .venv/bin/python bench/attention.py --batch 64 --context 4096 --kv bf16

Shape: one Llama-3.3-70B layer (64 query heads, 8 KV heads, head_dim 128), block size 16, bf16 queries,
sequences in shuffled (non-contiguous) blocks. The peer gathers each sequence's blocks into a contiguous
[B, KVH, L, D] tensor (dequantizing fp8 to bf16) and runs torch SDPA with a length mask -- what one does
without a paged kernel. GB/s = bytes of K/V actually attended (sum of sequence lengths) plus q and out,
divided by the time, for both (so the peer's extra gather traffic shows up as lower GB/s). GPU times are
medians of triton.testing.do_bench (L2 flushed before each run). Goal: >= 80% of HBM at batch 64 x 4k.

Without a GPU it runs tiny cases to prove the script works: the Triton kernel in the interpreter, the
CPU production path (the torch reference) and the peer; those times say nothing about GPU performance.

Also prints the KV-cache capacity in tokens of SmolLM2-135M and Llama-3.3-70B on one H200, auto (bf16)
vs fp8 KV. Writes bench/out/attention.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels (and triton) are imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import time_ms  # noqa: E402
from fp8_turbo.engine.core.kv_cache import kv_bytes_per_token  # noqa: E402
from fp8_turbo.kernels.backend import interpreting  # noqa: E402
from fp8_turbo.kernels.paged_attention import (  # noqa: E402
    paged_attention_decode_reference,
    paged_attention_decode_triton,
)

OUT = Path(__file__).resolve().parent / "out"
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 64, 8, 128, 16  # Llama-3.3-70B, TP=1
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
HBM_TBPS = {"H100": 3.35, "H200": 4.8}
MAX_TOKENS = 1 << 20  # skip grid points whose cache (per layer) would exceed ~4 GB in bf16
OURS, PEER, CPU_PATH = "paged_attention_decode", "gather + SDPA", "torch reference (CPU path)"

# KV capacity on one H200 (design.md): vLLM-style budget = utilization * memory - weights
H200_BYTES, UTILIZATION = 141e9, 0.9
MODELS = {  # name: (layers, KV heads, head_dim, weight bytes: FP8 linear + bf16 embeddings/lm_head)
    "SmolLM2-135M": (30, 3, 64, 106.2e6 + 2 * 49152 * 576),
    "Llama-3.3-70B": (80, 8, 128, 68.5e9 + 4.2e9),
}


def gather_sdpa(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=1.0, v_scale=1.0):
    """The peer: gather blocks into contiguous K/V in q's dtype, then SDPA (GQA) with a length mask."""
    b, h, d = q.shape
    kvh = k_cache.shape[2]
    nb = block_tables.shape[1]
    ids = block_tables.long().flatten()

    def gather(cache, s):
        x = cache.index_select(0, ids).view(b, nb * BLOCK_SIZE, kvh, d).transpose(1, 2)  # [B, KVH, L, D]
        return x.to(q.dtype) * s if cache.dtype == torch.float8_e4m3fn else x.to(q.dtype)  # no-op on the GPU

    k, v = gather(k_cache, k_scale), gather(v_cache, v_scale)
    mask = (torch.arange(nb * BLOCK_SIZE, device=q.device)[None, :] < seq_lens[:, None].long())[:, None, None, :]
    qg = q.view(b, kvh, h // kvh, d)  # [B, KVH, G, D]: GQA without repeating K/V
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale).reshape(b, h, d)


def make_case(batch, context, kv_dtype, device, heads, kv_heads, head_dim):
    """q and a cache holding `batch` sequences of `context` tokens in shuffled blocks."""
    g = torch.Generator(device=device).manual_seed(0)  # on the device: a 1M-token cache is 1G values
    nb = -(-context // BLOCK_SIZE)
    tables = torch.randperm(batch * nb, generator=g, device=device).view(batch, nb).int()
    shape = (batch * nb, BLOCK_SIZE, kv_heads, head_dim)
    scale = 1 / 16 if kv_dtype == torch.float8_e4m3fn else 1.0
    caches = [(torch.randn(shape, generator=g, device=device) / scale).to(kv_dtype) for _ in range(2)]
    q = torch.randn(batch, heads, head_dim, generator=g, device=device).to(torch.bfloat16 if GPU else torch.float32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return (q, *caches, tables, lens, head_dim ** -0.5, scale, scale)


def bench(batches, contexts, kv_names, heads, kv_heads, head_dim):
    device = "cuda" if GPU else "cpu"
    rows = []
    for kv in kv_names:
        for batch in batches:
            for context in contexts:
                if batch * context > MAX_TOKENS:
                    continue
                args = make_case(batch, context, KV_DTYPES[kv], device, heads, kv_heads, head_dim)
                q = args[0]
                nbytes = (2 * batch * context * kv_heads * head_dim * KV_DTYPES[kv].itemsize
                          + 2 * q.numel() * q.element_size())
                # without a GPU or the interpreter (scripts/gpu_check.py --dry-run): the CPU path stands in
                ours = paged_attention_decode_triton if GPU or interpreting() else paged_attention_decode_reference
                impls = {OURS: partial(ours, *args, max_seq_len=context) if ours is paged_attention_decode_triton
                         else partial(ours, *args),
                         PEER: partial(gather_sdpa, *args)}
                if not GPU and interpreting():
                    impls[CPU_PATH] = partial(paged_attention_decode_reference, *args)
                for impl, fn in impls.items():
                    ms = time_ms(fn, GPU)
                    rows.append(dict(kv=kv, batch=batch, context=context, impl=impl, ms=ms, gbps=nbytes / ms / 1e6))
                print(f"  done {kv} B={batch} ctx={context}", file=sys.stderr)
    return rows


def markdown(rows, hbm_tbps):
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by_case = {}
    for r in rows:
        by_case.setdefault((r["kv"], r["batch"], r["context"]), {})[r["impl"]] = r
    num = "{:.0f}" if GPU else "{:.3g}"
    head = "| KV | batch | context | " + " | ".join(f"{i} us (GB/s)" for i in impls)
    head += " | % HBM |" if hbm_tbps else " |"
    lines = [head + f" {OURS} speed-up |", "|" + "---|" * (4 + len(impls) + bool(hbm_tbps))]
    for (kv, batch, context), case in by_case.items():
        cells = [f"{num.format(case[i]['ms'] * 1e3)} ({num.format(case[i]['gbps'])})" for i in impls]
        line = f"| {kv} | {batch} | {context} | " + " | ".join(cells)
        if hbm_tbps:
            line += f" | {100 * case[OURS]['gbps'] / (hbm_tbps * 1e3):.0f}%"
        lines.append(line + f" | {case[PEER]['ms'] / case[OURS]['ms']:.2f}x |")
    return "\n".join(lines)


def kv_capacity():
    """Tokens of KV cache that fit on one H200 after the weights, bf16 ('auto') vs fp8 KV."""
    out = {}
    for name, (layers, kvh, d, weights) in MODELS.items():
        budget = UTILIZATION * H200_BYTES - weights
        out[name] = {kv: int(budget // kv_bytes_per_token(layers, kvh, d, dtype)) for kv, dtype in KV_DTYPES.items()}
        out[name]["budget_gb"] = budget / 1e9
    return out


def plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kvs = list(dict.fromkeys(r["kv"] for r in rows))
    fig, axes = plt.subplots(1, len(kvs), figsize=(5.5 * len(kvs), 4), squeeze=False)
    for ax, kv in zip(axes[0], kvs):
        for impl, style in zip(dict.fromkeys(r["impl"] for r in rows), ("-", "--", ":")):
            for batch in dict.fromkeys(r["batch"] for r in rows):
                pts = sorted((r["context"], r["gbps"]) for r in rows if r["kv"] == kv and r["impl"] == impl and r["batch"] == batch)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{impl} B={batch}")
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="GB/s", title=f"{kv} KV")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64, 128] if GPU else [1, 4])
    p.add_argument("--context", type=int, nargs="+", default=[512, 1024, 4096, 16384] if GPU else [64, 256])
    p.add_argument("--kv", nargs="+", choices=list(KV_DTYPES), default=list(KV_DTYPES))
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    machine = torch.cuda.get_device_name() if GPU else f"{platform.processor() or platform.machine()} CPU, Triton interpreter"
    hbm = next((v for key, v in HBM_TBPS.items() if key in machine), None) if GPU else None
    # without a GPU: a quarter of the 70B heads, so the interpreter finishes in seconds
    heads, kv_heads = (HEADS, KV_HEADS) if GPU else (HEADS // 4, KV_HEADS // 4)
    print(f"# Paged decode attention on {machine}: {heads} heads, {kv_heads} KV heads, head_dim {HEAD_DIM}, "
          f"block {BLOCK_SIZE}" + ("" if GPU else " (tiny cases; times are not performance)"))
    rows = bench(args.batch, args.context, args.kv, heads, kv_heads, HEAD_DIM)
    table = markdown(rows, hbm)
    print(table)

    capacity = kv_capacity()
    cap_lines = ["| model | KV budget GB | auto (bf16) tokens | fp8 tokens |", "|---|---|---|---|"]
    cap_lines += [f"| {name} | {c['budget_gb']:.1f} | {c['bf16']:,} | {c['fp8']:,} |" for name, c in capacity.items()]
    cap_table = "\n".join(cap_lines)
    print(f"\n# KV capacity on one H200 ({H200_BYTES / 1e9:.0f} GB x {UTILIZATION} utilization - weights)")
    print(cap_table)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=machine, gpu=GPU, torch=torch.__version__, hbm_tbps=hbm, heads=heads, kv_heads=kv_heads,
                head_dim=HEAD_DIM, block_size=BLOCK_SIZE)
    (args.out / "attention.json").write_text(json.dumps(dict(meta=meta, kv_capacity=capacity, rows=rows), indent=1))
    (args.out / "attention.md").write_text(f"Paged decode attention on {machine}\n\n{table}\n\nKV capacity (H200)\n\n{cap_table}\n")
    plot(rows, args.out / "attention.png", f"Paged decode attention, {machine}")
    print(f"\nwrote {args.out}/attention.json, attention.md, attention.png")


if __name__ == "__main__":
    main()
