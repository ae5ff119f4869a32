"""Decode step of a Llama-3.3-70B-shaped model on one GPU, from CUDA-graph replays of a few layers, scaled to 80.

    python3 bench/decode_step.py                          # GPU: batch 1 8 64 256, context 1024
    python3 bench/decode_step.py --batch 1 64 --deterministic

Random weights, quantized as the engine runs them: linear layers FP8 (per-channel weights, per-token
activations), except the last layer's MLP, which the engine keeps in bf16 (linear.DEFAULT_IGNORE), and
the embedding and lm_head in bf16. The model holds 5 layers: 4 FP8 ones and a last one with the bf16
MLP; an FP8 KV cache of random data holds `context` tokens per sequence, one new token per sequence.
Each variant runs through the engine's own CudaGraphRunner with graphs captured for the first 2, 4
and all 5 layers; G(n) is the median CUDA-event time of one graph replay (the step's kernels only).

    L    = (G(4) - G(2)) / 2          one FP8 layer
    X    = G(5) - G(4)                the last layer (bf16 MLP)
    H    = G(2) - 2 L                 embedding, final norm, lm_head, graph launch: once per step
    host = wall time to build the step's host lists, pack them and copy them (one small H2D copy)
    step(80) = host + H + 79 L + X    tok/s = batch x 1000 / step(80)

so the fixed parts count once, not 20-40 times as a whole-step ratio scaled them. The same layers
launched eagerly give the graphs' speed-up; with --deterministic, graphs of the batch-invariant kernels
(one GEMM config, no split-K, prefill attention for decode tokens) give deterministic mode's cost per layer.

Without a GPU it runs a tiny config on the CPU path (capture=False, wall-clock times) to prove the
script works. Writes decode_step.json (after every batch size) and decode_step.md (--artefacts) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import compile_stats  # noqa: E402
from fp8_turbo.engine.core.cuda_graphs import CudaGraphRunner  # noqa: E402
from fp8_turbo.engine.core.kv_cache import allocate_kv_caches  # noqa: E402
from fp8_turbo.engine.core.model_runner import HostStep  # noqa: E402
from fp8_turbo.engine.model.config import ModelConfig, RopeScaling  # noqa: E402
from fp8_turbo.engine.model.linear import Linear, QuantConfig  # noqa: E402
from fp8_turbo.engine.model.model import LlamaModel, RotaryEmbedding  # noqa: E402

compile_stats.install()
GPU = torch.cuda.is_available()
OUT = Path(__file__).resolve().parent / "out"
LLAMA_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_heads=64, num_kv_heads=8,
                 head_dim=128, rope_theta=500000.0, max_position_embeddings=131072,
                 rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=896, num_heads=8, num_kv_heads=2, head_dim=32,
            max_position_embeddings=4096)
FULL_LAYERS = 80
BLOCK_SIZE = 16
GRAPH_LAYERS = (2, 4, 5)  # layers in each captured variant; the 5th has the bf16 MLP
KV_SCALE = 1.0 / 16
ARTEFACTS = ("json", "md")


def build_model(layers: int, device: torch.device, dtype: torch.dtype, shape: dict, scheme: str = "fp8",
                bf16_mlp_layers: tuple[int, ...] = ()) -> LlamaModel:
    """A random model of `layers` layers, each Linear quantized as soon as it is filled (peak: one layer);
    lm_head and the MLPs of `bf16_mlp_layers` stay in the model dtype."""
    cfg = ModelConfig(num_layers=layers, **shape)
    ignore = ("lm_head", *(f"model.layers.{i}.mlp.*" for i in bf16_mlp_layers))
    with torch.device("meta"):
        model = LlamaModel(cfg, QuantConfig(scheme, ignore)).to(dtype)
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


def fill_kv(caches, seed: int = 0) -> None:
    """Random data in every block (a zero cache attends to nothing real and can run faster)."""
    for layer, (k, v) in enumerate(caches):
        for i, cache in enumerate((k, v)):
            gen = torch.Generator(device=cache.device).manual_seed(seed + 2 * layer + i)
            cache.copy_((torch.randn(cache.shape, generator=gen, device=cache.device, dtype=torch.bfloat16) * 4)
                        .to(cache.dtype))


def decode_host(batch: int, context: int, blocks_per_seq: int) -> HostStep:
    """Sequence b owns blocks [b * blocks_per_seq, ...); its new token sits at position context - 1."""
    tables = [list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)) for b in range(batch)]
    pos = context - 1
    return HostStep(input_ids=[(7 * b) % 1000 for b in range(batch)], positions=[pos] * batch,
                    slot_mapping=[t[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE for t in tables],
                    logits_indices=list(range(batch)), block_tables=tables, seq_lens=[context] * batch,
                    cu_seqlens_q=list(range(batch + 1)), max_query_len=1, max_seq_len=context, prompt_rows=[])


def device_ms(fn, reps: int) -> float:
    """Median of `reps` timings after a warm-up: CUDA events on the GPU, wall clock on the CPU."""
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


def wall_ms(fn, reps: int) -> float:
    """Median host wall time of fn() followed by a device sync."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if GPU:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Variants:
    """One CudaGraphRunner per layer count in GRAPH_LAYERS (the first n layers and their caches)."""

    def __init__(self, model: LlamaModel, caches, batches: list[int], context: int, device: torch.device):
        self.blocks_per_seq = -(-context // BLOCK_SIZE)
        self.context = context
        self.runners: dict[int, CudaGraphRunner] = {}
        layers = model.layers
        try:
            for n in GRAPH_LAYERS:
                model.layers = torch.nn.ModuleList(list(layers)[:n])
                runner = CudaGraphRunner(model, caches[:n], BLOCK_SIZE, max_model_len=self.blocks_per_seq * BLOCK_SIZE,
                                         max_num_seqs=max(batches), device=device, capture=GPU)
                runner.buckets = sorted(set(batches))  # capture exactly the benchmarked sizes
                runner.capture()  # graphs hold the layers they were captured with
                self.runners[n] = runner
        finally:
            model.layers = layers
        self.model = model

    def host(self, batch: int) -> HostStep:
        return decode_host(batch, self.context, self.blocks_per_seq)

    def graph_ms(self, n: int, batch: int, reps: int) -> float:
        runner = self.runners[n]
        runner._load(self.host(batch))
        if batch in runner.graphs:
            return device_ms(runner.graphs[batch].replay, reps)
        return device_ms(lambda: runner._forward(self.host(batch)), reps)  # CPU: the same forward, eagerly

    def eager_ms(self, n: int, batch: int, reps: int) -> float:
        runner = self.runners[n]
        host = self.host(batch)
        runner._load(host)
        layers = self.model.layers
        self.model.layers = torch.nn.ModuleList(list(layers)[:n])
        try:
            return device_ms(lambda: runner._forward(host), reps)
        finally:
            self.model.layers = layers

    def host_ms(self, batch: int, reps: int) -> float:
        runner = self.runners[GRAPH_LAYERS[0]]
        return wall_ms(lambda: runner._load(runner.padded(self.host(batch))[1]), reps)


def scale(g: dict[int, float], host: float, batch: int) -> dict:
    """The model above: per-layer and fixed parts from G(2), G(4), G(5), and the 80-layer step."""
    layer = max(g[4] - g[2], 0.0) / 2
    last = max(g[5] - g[4], 0.0)
    head = max(g[2] - 2 * layer, 0.0)
    step = host + head + (FULL_LAYERS - 1) * layer + last
    return dict(layer_ms=layer, last_layer_ms=last, head_ms=head, host_ms=host, step_ms_80=step,
                tok_s_80=1e3 * batch / step)


@torch.inference_mode()
def bench(batches: list[int], context: int, deterministic: bool, reps: int, shape: dict, on_row=None) -> dict:
    device = torch.device("cuda" if GPU else "cpu")
    dtype = torch.bfloat16 if GPU else torch.float32
    t0 = time.perf_counter()
    layers = GRAPH_LAYERS[-1]
    model = build_model(layers, device, dtype, shape, bf16_mlp_layers=(layers - 1,))
    cfg = model.cfg
    blocks_per_seq = -(-context // BLOCK_SIZE)
    kv_dtype = torch.float8_e4m3fn if GPU else dtype
    caches = allocate_kv_caches(layers, max(batches) * blocks_per_seq, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim,
                                kv_dtype, device)
    fill_kv(caches)
    for layer in model.layers:
        layer.self_attn.k_scale = layer.self_attn.v_scale = KV_SCALE
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    variants = Variants(model, caches, batches, context, device)
    det = None
    if deterministic:
        model.set_deterministic(True)
        try:
            det = Variants(model, caches, batches, context, device)
        finally:
            model.set_deterministic(False)
    capture_s = time.perf_counter() - t0
    rows = []
    for batch in batches:
        g = {n: variants.graph_ms(n, batch, reps) for n in GRAPH_LAYERS}
        eager = {n: variants.eager_ms(n, batch, reps) for n in GRAPH_LAYERS}
        host = variants.host_ms(batch, reps)
        row = dict(batch=batch, **{f"graph_ms_{n}": t for n, t in g.items()},
                   **{f"eager_ms_{n}": t for n, t in eager.items()}, **scale(g, host, batch))
        row["eager_layer_ms"] = max(eager[4] - eager[2], 0.0) / 2
        row["eager_step_ms_80"] = scale(eager, host, batch)["step_ms_80"]
        if det is not None:
            gd = {n: det.graph_ms(n, batch, reps) for n in GRAPH_LAYERS}
            row.update({f"deterministic_graph_ms_{n}": t for n, t in gd.items()})
            row["deterministic_layer_ms"] = scale(gd, host, batch)["layer_ms"]
            row["deterministic_tok_s_80"] = scale(gd, host, batch)["tok_s_80"]
        rows.append(row)
        print(f"  batch {batch}: layer {row['layer_ms']:.3f} ms, last {row['last_layer_ms']:.3f}, head "
              f"{row['head_ms']:.3f}, host {host:.3f} -> {row['tok_s_80']:.1f} tok/s at 80 layers", file=sys.stderr)
        if on_row:
            on_row(rows, build_s, capture_s)
    return dict(context=context, graph_layers=list(GRAPH_LAYERS), build_s=build_s, capture_s=capture_s, rows=rows)


def markdown(result: dict) -> str:
    det = any("deterministic_layer_ms" in r for r in result["rows"])
    head = ("| batch | per layer ms (graph) | last layer ms (bf16 MLP) | head ms | host ms | step ms x80 | "
            "tok/s x80 | per layer ms (eager) | graphs speed-up per layer |")
    head += " deterministic per layer ms | deterministic cost |" if det else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        speedup = r["eager_layer_ms"] / r["layer_ms"] if r["layer_ms"] > 0 else float("nan")
        line = (f"| {r['batch']} | {r['layer_ms']:.3f} | {r['last_layer_ms']:.3f} | {r['head_ms']:.3f} | "
                f"{r['host_ms']:.3f} | {r['step_ms_80']:.2f} | {r['tok_s_80']:.1f} | {r['eager_layer_ms']:.3f} | "
                f"{speedup:.2f}x |")
        if det:
            cost = r["deterministic_layer_ms"] / r["layer_ms"] if r["layer_ms"] > 0 else float("nan")
            line += f" {r['deterministic_layer_ms']:.3f} | {cost:.2f}x |"
        lines.append(line)
    lines.append(f"\nstep(80) = host + head + 79 x layer + last layer; context {result['context']} tokens per "
                 "sequence, FP8 KV. Goal (H200): >= 58 tok/s at batch 1.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256] if GPU else [1, 4])
    p.add_argument("--context", type=int, default=1024 if GPU else 64)
    p.add_argument("--reps", type=int, default=20 if GPU else 2)
    p.add_argument("--deterministic", action="store_true", help="also time the deterministic (batch-invariant) step")
    p.add_argument("--artefacts", nargs="+", choices=ARTEFACTS, default=list(ARTEFACTS))
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    machine = torch.cuda.get_device_name() if GPU else f"{platform.machine()} CPU, CPU path (tiny shapes)"
    shape = LLAMA_70B if GPU else TINY
    print(f"# Decode step, Llama-3.3-70B-shaped, graphs of {GRAPH_LAYERS} layers scaled to {FULL_LAYERS}, "
          f"context {args.context}, on {machine}")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=machine, gpu=GPU, torch=torch.__version__, shape={k: str(v) for k, v in shape.items()})

    def write_json(rows, build_s, capture_s, done=False, result=None):
        if "json" not in args.artefacts:
            return
        result = result or dict(context=args.context, graph_layers=list(GRAPH_LAYERS), build_s=build_s,
                                capture_s=capture_s, rows=rows)
        doc = dict(meta=meta, done=done, compiles=compile_stats.snapshot(), markdown=markdown(result), **result)
        tmp = args.out / "decode_step.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, args.out / "decode_step.json")

    result = bench(args.batch, args.context, args.deterministic, args.reps, shape, on_row=write_json)
    write_json(result["rows"], result["build_s"], result["capture_s"], done=True, result=result)
    table = markdown(result)
    print(table)
    print(f"\ncompiles in this process: {compile_stats.snapshot()['count']}")
    if "md" in args.artefacts:
        (args.out / "decode_step.md").write_text(f"Decode step on {machine}\n\n{table}\n")
    print(f"\nwrote {args.out}/" + ", ".join(f"decode_step.{a}" for a in args.artefacts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
