"""Decode step of a Llama-3.3-70B-shaped layer stack: eager vs CUDA graphs, scaled to 80 layers.

    python3 bench/decode_step.py                          # GPU: 4 layers, batch 1 8 64 256, context 1024
    python3 bench/decode_step.py --layers 2 --batch 1 64 --deterministic

Random weights (FP8 per-channel, per-token activations; lm_head and embeddings in bf16, as the engine
keeps them), an FP8 KV cache holding `context` tokens per sequence, one decode token per sequence. Each
step runs through the engine's own CudaGraphRunner: replay of the captured graph vs the same forward
launched eagerly on the same static buffers. Times are medians of CUDA-event timings. A forward with no
layers (embedding, final norm, lm_head) is timed too, so that
    step(80 layers) = head + 80 * (step(L layers) - head) / L
and single-stream tok/s = 1000 / step(80 layers, batch 1). With --deterministic the eager step is also
timed with the batch-invariant kernels (one GEMM config, no split-K/split-KV).

Without a GPU it runs a tiny config on the CPU reference path (capture=False) to prove the script works.
Writes decode_step.json and decode_step.md to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fp8_turbo.engine.core.cuda_graphs import CudaGraphRunner  # noqa: E402
from fp8_turbo.engine.core.kv_cache import allocate_kv_caches  # noqa: E402
from fp8_turbo.engine.core.model_runner import HostStep  # noqa: E402
from fp8_turbo.engine.model.config import ModelConfig, RopeScaling  # noqa: E402
from fp8_turbo.engine.model.linear import Linear, QuantConfig  # noqa: E402
from fp8_turbo.engine.model.model import LlamaModel, RotaryEmbedding  # noqa: E402

GPU = torch.cuda.is_available()
OUT = Path(__file__).resolve().parent / "out"
LLAMA_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_heads=64, num_kv_heads=8,
                 head_dim=128, rope_theta=500000.0, max_position_embeddings=131072,
                 rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=896, num_heads=8, num_kv_heads=2, head_dim=32,
            max_position_embeddings=4096)
FULL_LAYERS = 80
BLOCK_SIZE = 16


def build_model(layers: int, device: torch.device, dtype: torch.dtype, shape: dict, scheme: str = "fp8") -> LlamaModel:
    """A random model of `layers` layers, each Linear quantized as soon as it is filled (peak: one layer)."""
    cfg = ModelConfig(num_layers=layers, **shape)
    with torch.device("meta"):
        model = LlamaModel(cfg, QuantConfig(scheme, ("lm_head",))).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for m in model.modules():
        m.to_empty(device=device, recurse=False)
        for name, p in m.named_parameters(recurse=False):
            if p is not None:
                p.data.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=dtype) * 0.02
                             if p.dim() == 2 else torch.ones_like(p))
        if isinstance(m, Linear):
            m.finalize()
    model.rotary = RotaryEmbedding(cfg).to(device)
    return model.eval()


def decode_host(batch: int, context: int, blocks_per_seq: int) -> HostStep:
    """Sequence b owns blocks [b * blocks_per_seq, ...); its new token sits at position context - 1."""
    tables = [list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)) for b in range(batch)]
    pos = context - 1
    return HostStep(input_ids=[(7 * b) % 1000 for b in range(batch)], positions=[pos] * batch,
                    slot_mapping=[t[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE for t in tables],
                    logits_indices=list(range(batch)), block_tables=tables, seq_lens=[context] * batch,
                    cu_seqlens_q=list(range(batch + 1)), max_query_len=1, max_seq_len=context, prompt_rows=[])


def time_ms(fn, reps: int) -> float:
    """Median of `reps` timings (CUDA events on the GPU, wall clock on the CPU) after a warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def bench(layers: int, batches: list[int], context: int, deterministic: bool, reps: int, shape: dict) -> dict:
    device = torch.device("cuda" if GPU else "cpu")
    dtype = torch.bfloat16 if GPU else torch.float32
    t0 = time.perf_counter()
    model = build_model(layers, device, dtype, shape)
    cfg = model.cfg
    blocks_per_seq = -(-context // BLOCK_SIZE)
    kv_dtype = torch.float8_e4m3fn if GPU else dtype
    caches = allocate_kv_caches(layers, max(batches) * blocks_per_seq, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim,
                                kv_dtype, device)
    for layer in model.layers:
        layer.self_attn.k_scale = layer.self_attn.v_scale = 1.0 / 16
    runner = CudaGraphRunner(model, caches, BLOCK_SIZE, max_model_len=blocks_per_seq * BLOCK_SIZE,
                             max_num_seqs=max(batches), device=device, capture=GPU)
    runner.buckets = sorted(set(batches))  # capture exactly the benchmarked sizes
    runner.capture()
    build_s = time.perf_counter() - t0
    rows = []
    for batch in batches:
        host = decode_host(batch, context, blocks_per_seq)
        # both include what a step does before the kernels: pack the host lists, one copy to the device
        step = lambda: runner.run(decode_host(batch, context, blocks_per_seq))  # noqa: E731

        def eager():  # the same static buffers, the kernels launched one by one
            runner._load(decode_host(batch, context, blocks_per_seq))
            return runner._forward(host)

        row = dict(batch=batch, graph_ms=time_ms(step, reps))
        row["eager_ms"] = time_ms(eager, reps)
        if deterministic:
            model.set_deterministic(True)
            row["deterministic_eager_ms"] = time_ms(eager, reps)
            model.set_deterministic(False)
        rows.append(row)
        print(f"  batch {batch}: graph {row['graph_ms']:.3f} ms, eager {row['eager_ms']:.3f} ms", file=sys.stderr)
    # the fixed part: embedding, final norm, lm_head (no layers)
    kept = model.layers
    model.layers = torch.nn.ModuleList()
    for row in rows:
        host = decode_host(row["batch"], context, blocks_per_seq)
        runner._load(host)
        row["head_ms"] = time_ms(lambda: runner._forward(host), reps)
    model.layers = kept
    for row in rows:
        for key in ("graph", "eager", "deterministic_eager"):
            if f"{key}_ms" in row:
                per_layer = max(row[f"{key}_ms"] - row["head_ms"], 0.0) / layers
                row[f"{key}_ms_80"] = row["head_ms"] + FULL_LAYERS * per_layer
        row["tok_s_80"] = 1e3 * row["batch"] / row["graph_ms_80"]
    return dict(layers=layers, context=context, build_and_capture_s=build_s, rows=rows)


def markdown(result: dict) -> str:
    det = any("deterministic_eager_ms" in r for r in result["rows"])
    head = "| batch | graph ms | eager ms | graphs speed-up | head ms | step ms x80 (graph) | tok/s x80 (graph) |"
    head += " deterministic eager ms | deterministic cost |" if det else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        line = (f"| {r['batch']} | {r['graph_ms']:.3f} | {r['eager_ms']:.3f} | {r['eager_ms'] / r['graph_ms']:.2f}x | "
                f"{r['head_ms']:.3f} | {r['graph_ms_80']:.2f} | {r['tok_s_80']:.1f} |")
        if det:
            line += f" {r['deterministic_eager_ms']:.3f} | {r['deterministic_eager_ms'] / r['eager_ms']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4 if GPU else 2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256] if GPU else [1, 4])
    p.add_argument("--context", type=int, default=1024 if GPU else 64)
    p.add_argument("--reps", type=int, default=20 if GPU else 2)
    p.add_argument("--deterministic", action="store_true", help="also time the deterministic (batch-invariant) step")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    machine = torch.cuda.get_device_name() if GPU else f"{platform.machine()} CPU, reference path (tiny shapes)"
    shape = LLAMA_70B if GPU else TINY
    print(f"# Decode step, Llama-3.3-70B-shaped, {args.layers} layers, context {args.context}, on {machine}")
    result = bench(args.layers, args.batch, args.context, args.deterministic, args.reps, shape)
    table = markdown(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=machine, gpu=GPU, torch=torch.__version__, shape={k: str(v) for k, v in shape.items()})
    (args.out / "decode_step.json").write_text(json.dumps(dict(meta=meta, **result), indent=1))
    (args.out / "decode_step.md").write_text(f"Decode step on {machine}, {args.layers} layers scaled to 80\n\n{table}\n")
    print(f"\nwrote {args.out}/decode_step.json, decode_step.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
