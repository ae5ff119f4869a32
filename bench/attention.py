"""Paged decode attention microbenchmark: kernels.paged_attention_decode vs gather + torch SDPA.

    python3 bench/attention.py                        # GPU: batch x context grid, bf16 and fp8 KV
    python3 bench/attention.py --batch 64 --context 4096 --kv bf16

Shape: one Llama-3.3-70B layer (64 query heads, 8 KV heads, head_dim 128), block size 16, bf16 queries,
sequences in shuffled (non-contiguous) blocks of random data, FP8 KV with its scales as the device
tensors the engine passes (a float would add two fill kernels per call). The peer gathers each
sequence's blocks into a contiguous [B, KVH, L, D] tensor (dequantizing fp8 to bf16) and runs torch SDPA
with a length mask -- what one does without a paged kernel. GB/s = bytes of K/V actually attended (sum
of sequence lengths) plus q and out, over the time, for both (so the peer's extra gather traffic shows
up as lower GB/s); "% of copy BW" divides ours by the machine's measured copy bandwidth (bench/peaks.py,
or --copy-gbps). Times: CUDA-graph replay (bench/timing.py), rotating through copies of the cache
when one is smaller than 3x the L2, so it is read from HBM as a decode step reads it. Goal: >= 80% of
the measured copy bandwidth at batch 64 x 4k.

Without a GPU it runs tiny cases to prove the script works (the Triton kernel in the interpreter under
TRITON_INTERPRET=1, the CPU production path and the peer); those times say nothing about a GPU.

Also prints the KV-cache capacity in tokens of SmolLM2-135M and Llama-3.3-70B on one H200, auto (bf16)
vs fp8 KV. Writes attention.json (after every case) and at the end attention.md and attention.png
(--artefacts picks which) under --out.
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
from bench import compile_stats  # noqa: E402
from bench.timing import copies_for, time_calls  # noqa: E402
from fp8_turbo.engine.core.kv_cache import kv_bytes_per_token  # noqa: E402
from fp8_turbo.kernels.backend import interpreting  # noqa: E402
from fp8_turbo.kernels.paged_attention import (  # noqa: E402
    paged_attention_decode,
    paged_attention_decode_reference,
    paged_attention_decode_triton,
)

OUT = Path(__file__).resolve().parent / "out"
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 64, 8, 128, 16  # Llama-3.3-70B, TP=1
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
MAX_TOKENS = 1 << 20  # skip grid points whose cache (per layer) would exceed ~4 GB in bf16
OURS, PEER, CPU_PATH = "paged_attention_decode", "gather + SDPA", "CPU path (C++ kernel or torch reference)"
GOAL_CASE = (64, 4096)  # batch x context of the >= 80% goal
ARTEFACTS = ("json", "png", "md")

# KV capacity on one H200 (design.md): vLLM-style budget = utilization * memory - weights
H200_BYTES, UTILIZATION = 141e9, 0.9
MODELS = {  # name: (layers, KV heads, head_dim, weight bytes: FP8 linear + bf16 embeddings/lm_head)
    "SmolLM2-135M": (30, 3, 64, 106.2e6 + 2 * 49152 * 576),
    "Llama-3.3-70B": (80, 8, 128, 68.5e9 + 4.2e9),
}


def machine_name() -> str:
    if GPU:
        return torch.cuda.get_device_name()
    path = "Triton interpreter" if interpreting() else "CPU path (C++ kernel or torch reference)"
    return f"{platform.processor() or platform.machine()} CPU, {path}"


def gather_sdpa(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=1.0, v_scale=1.0):
    """The peer: gather blocks into contiguous K/V in q's dtype, then SDPA (GQA) with a length mask."""
    b, h, d = q.shape
    kvh = k_cache.shape[2]
    nb = block_tables.shape[1]
    ids = block_tables.long().flatten()

    def gather(cache, s):
        x = cache.index_select(0, ids).view(b, nb * BLOCK_SIZE, kvh, d).transpose(1, 2)  # [B, KVH, L, D]
        if cache.dtype != torch.float8_e4m3fn:
            return x.to(q.dtype)
        return x.to(q.dtype) * (s.to(q.dtype) if isinstance(s, torch.Tensor) else s)  # device scale: no sync

    k, v = gather(k_cache, k_scale), gather(v_cache, v_scale)
    mask = (torch.arange(nb * BLOCK_SIZE, device=q.device)[None, :] < seq_lens[:, None].long())[:, None, None, :]
    qg = q.view(b, kvh, h // kvh, d)  # [B, KVH, G, D]: GQA without repeating K/V
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale).reshape(b, h, d)


def make_case(batch, context, kv_dtype, device, heads, kv_heads, head_dim, copies=1):
    """(q, [(k_cache, v_cache)] * copies, block tables, lengths, softmax scale, k_scale, v_scale): `batch`
    sequences of `context` tokens in shuffled blocks of random data (drawn on the device)."""
    g = torch.Generator(device=device).manual_seed(0)
    nb = -(-context // BLOCK_SIZE)
    tables = torch.randperm(batch * nb, generator=g, device=device).view(batch, nb).int()
    shape = (batch * nb, BLOCK_SIZE, kv_heads, head_dim)
    fp8 = kv_dtype == torch.float8_e4m3fn
    scale = 1 / 16 if fp8 else 1.0
    caches = [tuple((torch.randn(shape, generator=g, device=device) / scale).to(kv_dtype) for _ in range(2))
              for _ in range(copies)]
    q = torch.randn(batch, heads, head_dim, generator=g, device=device).to(torch.bfloat16 if GPU else torch.float32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    # device tensors, as the engine passes them (fp32 [1]); floats on the CPU path
    k_scale = torch.full((1,), scale, dtype=torch.float32, device=device) if GPU else scale
    return q, caches, tables, lens, head_dim ** -0.5, k_scale, k_scale


def bench_case(kv, batch, context, heads, kv_heads, head_dim, copy_gbps):
    device = "cuda" if GPU else "cpu"
    kv_dtype = KV_DTYPES[kv]
    kv_bytes = 2 * batch * context * kv_heads * head_dim * kv_dtype.itemsize
    copies = copies_for(kv_bytes, min_copies=1, memory_budget=4e9) if GPU else 1
    if GPU and copies * kv_bytes > 0.5 * torch.cuda.mem_get_info()[0]:
        print(f"  skip {kv} B={batch} ctx={context}: {copies} x {kv_bytes / 1e9:.1f} GB of cache", file=sys.stderr)
        return []
    q, caches, tables, lens, scale, k_scale, v_scale = make_case(batch, context, kv_dtype, device, heads, kv_heads,
                                                                  head_dim, copies)
    nbytes = kv_bytes + 2 * q.numel() * q.element_size()
    if GPU or interpreting():
        ours = [partial(paged_attention_decode_triton, q, k, v, tables, lens, scale, k_scale, v_scale,
                        max_seq_len=context) for k, v in caches]
    else:  # scripts/gpu_check.py --dry-run: the CPU production path stands in
        ours = [partial(paged_attention_decode, q, k, v, tables, lens, scale, k_scale, v_scale) for k, v in caches]
    impls = {OURS: ours, PEER: [partial(gather_sdpa, q, k, v, tables, lens, scale, k_scale, v_scale) for k, v in caches]}
    if not GPU and interpreting():
        impls[CPU_PATH] = [partial(paged_attention_decode_reference, q, k, v, tables, lens, scale, k_scale, v_scale)
                           for k, v in caches]
    rows = []
    for impl, calls in impls.items():
        ms, method = time_calls(calls, GPU)
        row = dict(kv=kv, batch=batch, context=context, impl=impl, ms=ms, method=method, copies=copies,
                   gbps=nbytes / ms / 1e6)
        if copy_gbps:
            row["copy_bw_fraction"] = row["gbps"] / copy_gbps
        rows.append(row)
    print(f"  done {kv} B={batch} ctx={context}", file=sys.stderr)
    return rows


def summarize(rows, copy_gbps) -> dict:
    summary = dict(copy_gbps=copy_gbps)
    for r in rows:
        if r["impl"] == OURS and (r["batch"], r["context"]) == GOAL_CASE and "copy_bw_fraction" in r:
            summary[f"copy_bw_fraction_b{GOAL_CASE[0]}_ctx{GOAL_CASE[1]}_{r['kv']}"] = r["copy_bw_fraction"]
    ours = [r["copy_bw_fraction"] for r in rows if r["impl"] == OURS and "copy_bw_fraction" in r]
    if ours:
        summary["copy_bw_fraction_best"] = max(ours)
    return summary


def markdown(rows, copy_gbps):
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by_case = {}
    for r in rows:
        by_case.setdefault((r["kv"], r["batch"], r["context"]), {})[r["impl"]] = r
    num = "{:.0f}" if GPU else "{:.3g}"
    head = "| KV | batch | context | " + " | ".join(f"{i} us (GB/s)" for i in impls)
    head += " | % of copy BW |" if copy_gbps else " |"
    lines = [head + f" {OURS} speed-up |", "|" + "---|" * (4 + len(impls) + bool(copy_gbps))]
    for (kv, batch, context), case in by_case.items():
        cells = [f"{num.format(case[i]['ms'] * 1e3)} ({num.format(case[i]['gbps'])})" if i in case else "-"
                 for i in impls]
        line = f"| {kv} | {batch} | {context} | " + " | ".join(cells)
        if copy_gbps:
            line += f" | {100 * case[OURS]['gbps'] / copy_gbps:.0f}%" if OURS in case else " | -"
        speedup = f"{case[PEER]['ms'] / case[OURS]['ms']:.2f}x" if OURS in case and PEER in case else "-"
        lines.append(line + f" | {speedup} |")
    if copy_gbps:
        lines.append(f"\nGoal: >= 80% of the measured copy bandwidth ({copy_gbps:.0f} GB/s) at batch "
                     f"{GOAL_CASE[0]} x {GOAL_CASE[1]} tokens.")
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
    p.add_argument("--copy-gbps", type=float, default=None, help="measured copy bandwidth (default: measure it)")
    p.add_argument("--artefacts", nargs="+", choices=ARTEFACTS, default=list(ARTEFACTS))
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    machine = machine_name()
    copy = args.copy_gbps
    if copy is None and GPU:
        from bench.peaks import copy_gbps

        copy = copy_gbps("cuda", 1 << 30)
    # without a GPU: a quarter of the 70B heads, so the interpreter finishes in seconds
    heads, kv_heads = (HEADS, KV_HEADS) if GPU else (HEADS // 4, KV_HEADS // 4)
    print(f"# Paged decode attention on {machine}: {heads} heads, {kv_heads} KV heads, head_dim {HEAD_DIM}, "
          f"block {BLOCK_SIZE}" + ("" if GPU else " (tiny cases; times are not performance)")
          + (f"; copy bandwidth {copy:.0f} GB/s" if copy else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    capacity = kv_capacity()
    meta = dict(machine=machine, gpu=GPU, torch=torch.__version__, copy_gbps=copy, heads=heads, kv_heads=kv_heads,
                head_dim=HEAD_DIM, block_size=BLOCK_SIZE)
    rows = []

    def write_json(done: bool):
        doc = dict(meta=meta, done=done, summary=summarize(rows, copy), rows=rows, kv_capacity=capacity,
                   compiles=compile_stats.snapshot(), markdown=markdown(rows, copy) if rows else "")
        tmp = args.out / "attention.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, args.out / "attention.json")

    for kv in args.kv:
        for batch in args.batch:
            for context in args.context:
                if batch * context > MAX_TOKENS:
                    continue
                rows += bench_case(kv, batch, context, heads, kv_heads, HEAD_DIM, copy)
                if "json" in args.artefacts:
                    write_json(done=False)
    if "json" in args.artefacts:
        write_json(done=True)
    table = markdown(rows, copy)
    print(table)
    print(f"\ncompiles in this process: {compile_stats.snapshot()['count']}")

    cap_lines = ["| model | KV budget GB | auto (bf16) tokens | fp8 tokens |", "|---|---|---|---|"]
    cap_lines += [f"| {name} | {c['budget_gb']:.1f} | {c['bf16']:,} | {c['fp8']:,} |" for name, c in capacity.items()]
    cap_table = "\n".join(cap_lines)
    print(f"\n# KV capacity on one H200 ({H200_BYTES / 1e9:.0f} GB x {UTILIZATION} utilization - weights)")
    print(cap_table)

    written = ["attention.json"] if "json" in args.artefacts else []
    if "md" in args.artefacts:
        (args.out / "attention.md").write_text(f"Paged decode attention on {machine}\n\n{table}\n\nKV capacity (H200)\n\n{cap_table}\n")
        written.append("attention.md")
    if "png" in args.artefacts and rows:
        plot(rows, args.out / "attention.png", f"Paged decode attention, {machine}")
        written.append("attention.png")
    print(f"\nwrote {', '.join(f'{args.out}/{w}' for w in written)}")


if __name__ == "__main__":
    main()
