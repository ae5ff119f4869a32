"""The parts of scripts/gpu_check.py: each takes (runner, part) and records checks and numbers.

Correctness parts compare with the torch references on the GPU, with the tolerances of the test suite;
benchmark parts run bench/*.py as children with their files under DIR/bench. Without a GPU (the dry
run) every part runs at the tier's tiny shapes on the CPU path.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpu_check_runner import REPO, Part, Runner
from gpu_check_tiers import Tier

# tolerance of tests/test_fp8_gemm.py on the GPU: Hopper's fp8 MMA keeps ~14 bits inside a BLOCK_K step
GPU_MMA_REL = 2.0**-11
OUT_RTOL = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
LAYERS_70B = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 64, 8, 128, 16
BENCH_FILES = {"gemm": ("json", "png"), "attention": ("json", "png"), "decode_step": ("json",)}


class Parts:
    def __init__(self, runner: Runner, tier: Tier, dry: bool, out: Path):
        self.runner, self.tier, self.dry = runner, tier, dry
        self.gpu = torch.cuda.is_available() and not dry
        self.device = torch.device("cuda" if self.gpu else "cpu")
        self.bench_dir = out / "bench"
        self.copy_gbps: float | None = None

    def check(self, part, name, ok, detail=""):
        self.runner.check(part, name, ok, detail)

    def child_env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        if self.dry:
            env["TRITON_INTERPRET"] = "0"  # benches default to the interpreter without a GPU: the CPU path
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    # ---- env ------------------------------------------------------------------------------------------
    def env(self, part: Part) -> None:
        import triton

        from bench.peaks import measure

        info = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                    numpy=__import__("numpy").__version__, cuda=torch.version.cuda, dry_run=self.dry,
                    cpu_kernels=os.environ.get("FP8_TURBO_CPU_KERNELS"))
        if self.gpu:
            prop = torch.cuda.get_device_properties(0)
            info.update(gpu=prop.name, sms=prop.multi_processor_count, memory_gb=round(prop.total_memory / 1e9, 1),
                        l2_mb=round(getattr(prop, "L2_cache_size", 0) / 2**20, 1), capability=f"{prop.major}.{prop.minor}")
            try:
                smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw",
                                      "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
                info["nvidia_smi"] = smi.stdout.strip()
            except (OSError, subprocess.TimeoutExpired) as e:
                info["nvidia_smi"] = f"({type(e).__name__})"
        part.numbers.update(info)
        print(json.dumps(info, indent=1), flush=True)
        self.check(part, "device", self.gpu or self.dry, info.get("gpu", "dry run: no GPU used"))
        peaks = measure()  # copy bandwidth, bf16 / FP8 matmul rates (a few seconds)
        part.numbers["peaks"] = peaks
        self.copy_gbps = peaks["copy_gbps"] if self.gpu else None
        print("peaks: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in peaks.items()),
              flush=True)
        if self.gpu:
            self.check(part, "peaks measured", all(peaks.get(k) for k in ("copy_gbps", "bf16_tflops", "fp8_tflops")),
                       f"copy {peaks['copy_gbps']:.0f} GB/s, bf16 {peaks.get('bf16_tflops') or 0:.0f} TFLOP/s, "
                       f"fp8 {peaks.get('fp8_tflops') or 0:.0f} TFLOP/s")

    # ---- kernels at the 70B shapes ------------------------------------------------------------------
    def kernels_70b(self, part: Part) -> None:
        from fp8_turbo.kernels.fp8 import dequantize_fp8, quantize_weight
        from fp8_turbo.kernels.gemm import fp8_gemm, fp8_gemm_reference, fp8_weight_only_gemm, fp8_weight_only_gemm_reference
        from fp8_turbo.kernels.quantize import quantize_fp8

        dev, tier, run = self.device, self.tier, self.runner
        combos = [("token", "channel"), ("group", "block")]
        gen = torch.Generator(device=dev).manual_seed(0)
        for layer, (n, k) in LAYERS_70B.items():
            n, k = n // tier.shrink, k // tier.shrink
            w = torch.randn(n, k, generator=gen, device=dev) * 0.02
            weights = {wg: quantize_weight(w, wg) for _, wg in combos}
            del w
            for m in tier.kernels_m:
                run.guard(f"{layer} M={m}")
                x = torch.randn(m, k, generator=gen, device=dev) * torch.logspace(-1, 1, m, device=dev)[:, None]
                for act, wg in combos:
                    a, a_scale = quantize_fp8(x, act)
                    b, b_scale = weights[wg]
                    c = fp8_gemm(a, b, a_scale, b_scale, torch.bfloat16).float()
                    ref = fp8_gemm_reference(a, b, a_scale, b_scale, torch.float32)
                    mag = dequantize_fp8(a, a_scale).abs() @ dequantize_fp8(b, b_scale).abs().T
                    tol = GPU_MMA_REL * mag + OUT_RTOL[torch.bfloat16] * ref.abs() + 1e-6
                    worst = ((c - ref).abs() / tol).max().item()
                    self.check(part, f"fp8_gemm {act}x{wg} {layer} {n}x{k} M={m}",
                               worst <= 1.0 and bool(torch.isfinite(c).all()), f"worst err/tol {worst:.3f}")
                    del c, ref, mag
                if m in tier.w8a16_m:  # W8A16 (fp8-weight-only)
                    b, b_scale = weights["channel"]
                    xb = x.to(torch.bfloat16 if self.gpu else torch.float32)
                    c = fp8_weight_only_gemm(xb, b, b_scale).float()
                    ref = fp8_weight_only_gemm_reference(xb.float(), b, b_scale).float()
                    mag = xb.float().abs() @ dequantize_fp8(b, b_scale).abs().T
                    tol = 2 * (k + 4) * 2.0**-24 * mag + OUT_RTOL[torch.bfloat16] * ref.abs() + 1e-6
                    worst = ((c - ref).abs() / tol).max().item()
                    self.check(part, f"w8a16 {layer} M={m}", worst <= 1.0 and bool(torch.isfinite(c).all()),
                               f"worst err/tol {worst:.3f}")
            del weights
        # quantize: bit-exact against the CPU reference
        for m, k in tier.quantize_shapes:
            run.guard(f"quantize [{m}, {k}]")
            x = torch.randn(m, k) * torch.logspace(-3, 3, m)[:, None]
            for gran in ("token", "group", "tensor"):
                q, s = quantize_fp8(x.to(dev), gran)
                q_ref, s_ref = quantize_fp8(x, gran)
                same = torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
                self.check(part, f"quantize_fp8 {gran} [{m}, {k}]", same, "bit-exact" if same else "differs")
        # deterministic: a row's result does not depend on the batch
        run.guard("deterministic rows")
        n, k = 8192 // tier.shrink, 8192 // tier.shrink
        b, b_scale = quantize_weight(torch.randn(n, k, device=dev) * 0.02, "channel")
        a, a_scale = quantize_fp8(torch.randn(300, k, device=dev), "token")
        full = fp8_gemm(a, b, a_scale, b_scale, torch.bfloat16, deterministic=True)
        same = all(torch.equal(fp8_gemm(a[r], b, a_scale[r], b_scale, torch.bfloat16, deterministic=True), full[r])
                   for r in (slice(0, 1), slice(5, 21), slice(100, 300)))
        self.check(part, "deterministic fp8_gemm rows batch-invariant", same, "M=1, 16, 200 vs 300")

    # ---- CUDA graphs ----------------------------------------------------------------------------------
    def cuda_graph(self, part: Part) -> None:
        from bench.decode_step import LLAMA_70B, TINY, build_model, decode_host, fill_kv
        from fp8_turbo.engine.core.cuda_graphs import CudaGraphRunner, bucket_for
        from fp8_turbo.engine.core.kv_cache import allocate_kv_caches
        from fp8_turbo.engine.core.model_runner import pack_step, unpack_step

        dev, tier = self.device, self.tier
        dtype = torch.bfloat16 if self.gpu else torch.float32
        # two layers, the last one's MLP in bf16 as the engine keeps it
        model = build_model(2, dev, dtype, LLAMA_70B if self.gpu else TINY, bf16_mlp_layers=(1,))
        cfg = model.cfg
        context, batches = tier.graph_context, list(tier.graph_batches)
        blocks_per_seq = -(-context // BLOCK)
        caches = allocate_kv_caches(2, max(tier.graph_buckets) * blocks_per_seq, BLOCK, cfg.num_kv_heads,
                                    cfg.head_dim, torch.float8_e4m3fn if self.gpu else dtype, dev)
        fill_kv(caches)
        for layer in model.layers:
            layer.self_attn.k_scale = layer.self_attn.v_scale = 1.0 / 16
        graphs = CudaGraphRunner(model, caches, BLOCK, max_model_len=blocks_per_seq * BLOCK,
                                 max_num_seqs=max(tier.graph_buckets), device=dev, capture=self.gpu,
                                 max_bucket=max(tier.graph_buckets))
        graphs.buckets = list(tier.graph_buckets)  # batch 5 runs padded to 8
        t0 = time.monotonic()
        graphs.capture()
        part.numbers["capture_s"] = round(time.monotonic() - t0, 2)
        part.numbers["buckets"] = graphs.buckets
        self.check(part, "capture", len(graphs.graphs) == len(graphs.buckets) or not self.gpu,
                   f"{len(graphs.graphs)} graphs in {part.numbers['capture_s']:.1f}s")
        for batch in batches:
            self.runner.guard(f"batch {batch}")
            host = decode_host(batch, context, blocks_per_seq)
            with torch.inference_mode():
                buf = pack_step(host, blocks_per_seq, pin=False).to(dev)
                ids, meta = unpack_step(buf, host, blocks_per_seq)
                eager = model(ids, meta, caches).float()
                replay = graphs.run(decode_host(batch, context, blocks_per_seq)).float()
            top = (eager.argmax(-1) == replay.argmax(-1)).float().mean().item()
            self._compare(part, f"graph replay vs eager, batch {batch} (bucket {bucket_for(batch, graphs.buckets)})",
                          replay, eager, rel=1e-2)
            self.check(part, f"same argmax, batch {batch}", top >= 0.99, f"{top:.3f} of rows")

    # ---- benchmarks -----------------------------------------------------------------------------------
    def bench(self, part: Part, name: str, args: tuple[str, ...]) -> None:
        self.bench_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, f"bench/{name}.py", *args, "--out", str(self.bench_dir),
               "--artefacts", *BENCH_FILES[name]]
        if self.copy_gbps and name in ("gemm", "attention"):
            cmd += ["--copy-gbps", f"{self.copy_gbps:.1f}"]
        rc = self.runner.child(part, cmd, self.child_env(), self.bench_dir / f"{name}.json", key=name)
        doc = part.numbers.get(name) or {}
        rows = len(doc.get("rows", []))
        if part.status == "partial":  # stopped at the cap: the rows it finished are kept
            self.check(part, f"bench/{name}.py", rows > 0, f"stopped at the cap with {rows} rows")
        else:
            self.check(part, f"bench/{name}.py", rc == 0 and rows > 0, f"rc={rc}, {rows} rows")

    # ---- correctness at scale ---------------------------------------------------------------------------
    def _attention_case(self, seq_lens, kv_dtype, block_offset=0, kv_heads=KV_HEADS):
        """Random cache (drawn on the device) with each sequence's blocks at block_offset + a shuffled
        range; q in the model dtype."""
        dev = self.device
        gen = torch.Generator().manual_seed(len(seq_lens))
        dev_gen = torch.Generator(device=dev).manual_seed(len(seq_lens))
        nbs = [-(-n // BLOCK) for n in seq_lens]
        used = sum(nbs)
        num_blocks = used + block_offset
        tables = torch.zeros(len(seq_lens), max(nbs), dtype=torch.int32)
        perm = torch.randperm(used, generator=gen) + block_offset
        at = 0
        for i, nb in enumerate(nbs):
            tables[i, :nb] = perm[at:at + nb]
            at += nb
        shape = (num_blocks, BLOCK, kv_heads, HEAD_DIM)
        # zeros: the reference gathers padding entries of the block tables too (block 0), and NaN garbage
        # there would reach its output through 0 * NaN
        k_cache = torch.zeros(shape, dtype=kv_dtype, device=dev)
        v_cache = torch.zeros(shape, dtype=kv_dtype, device=dev)
        scale = 1 / 16 if kv_dtype == torch.float8_e4m3fn else 1.0
        for cache in (k_cache, v_cache):  # fill only the blocks in use (the cache may be huge)
            region = cache[block_offset:block_offset + used]
            region.copy_((torch.randn(region.shape, generator=dev_gen, device=dev) / scale).to(kv_dtype))
        qd = torch.bfloat16 if self.gpu else torch.float32
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        return k_cache, v_cache, tables.to(dev), lens, scale, qd

    def _compare(self, part, name, got, want, rel=2e-2):
        err = ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()
        self.check(part, name, err <= rel and bool(torch.isfinite(got).all()), f"rel L2 err {err:.2e} (<= {rel})")

    def kv_offsets(self, part: Part) -> None:
        from fp8_turbo.kernels import paged_attention_decode, paged_attention_prefill, write_kv
        from fp8_turbo.kernels.kv_write import write_kv_reference
        from fp8_turbo.kernels.paged_attention import paged_attention_decode_reference, paged_attention_prefill_reference

        per_block = BLOCK * KV_HEADS * HEAD_DIM
        # the sequences' blocks start at the first block past element offset 2^31 (a 2.1 GB e4m3 cache
        # per tensor); the dry run puts them past a small offset instead
        offset = -(-2**31 // per_block) if self.gpu else 10
        seq_lens = [1000, 37, 513]
        k_cache, v_cache, tables, lens, scale, qd = self._attention_case(seq_lens, torch.float8_e4m3fn, block_offset=offset)
        elems = k_cache.numel()
        self.check(part, "cache size", elems > 2**31 or not self.gpu, f"{elems:,} elements per cache, first used block "
                   f"at element {offset * per_block:,}")
        dev = self.device
        # write_kv into three blocks past 2^31: the bytes written equal the reference's on a copy of them
        t, ids = 40, tables[0, :3].long()
        slots = (ids.repeat_interleave(BLOCK) * BLOCK + torch.arange(BLOCK, device=dev).repeat(3))[:t]
        k_new = torch.randn(t, KV_HEADS, HEAD_DIM, device=dev).to(qd)
        v_new = torch.randn(t, KV_HEADS, HEAD_DIM, device=dev).to(qd)
        want_k, want_v = k_cache[ids].cpu(), v_cache[ids].cpu()
        write_kv_reference(k_new.cpu(), v_new.cpu(), want_k, want_v, torch.arange(t), scale, scale)
        write_kv(k_new, v_new, k_cache, v_cache, slots, scale, scale)
        same = (torch.equal(k_cache[ids].cpu().view(torch.uint8), want_k.view(torch.uint8))
                and torch.equal(v_cache[ids].cpu().view(torch.uint8), want_v.view(torch.uint8)))
        self.check(part, "write_kv past 2^31", same, "bit-exact" if same else "differs")
        q = torch.randn(len(seq_lens), HEADS, HEAD_DIM, device=dev).to(qd)
        args = (q, k_cache, v_cache, tables, lens, HEAD_DIM ** -0.5, scale, scale)
        self._compare(part, "decode attention past 2^31", paged_attention_decode(*args), paged_attention_decode_reference(*args))
        n_new = [100, 37, 1]
        cu = torch.tensor([0, 100, 137, 138], dtype=torch.int32, device=dev)
        q = torch.randn(sum(n_new), HEADS, HEAD_DIM, device=dev).to(qd)
        args = (q, k_cache, v_cache, tables, cu, lens, HEAD_DIM ** -0.5, scale, scale)
        self._compare(part, "prefill attention past 2^31", paged_attention_prefill(*args, max_query_len=100),
                      paged_attention_prefill_reference(*args))

    def decode_256(self, part: Part) -> None:
        from fp8_turbo.kernels import paged_attention_decode
        from fp8_turbo.kernels.paged_attention import paged_attention_decode_reference

        batch, context = self.tier.decode256
        for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
            self.runner.guard(f"decode batch {batch} {kv_dtype}")
            seq_lens = [context - (i * 37) % (context // 2) for i in range(batch)]
            k_cache, v_cache, tables, lens, scale, qd = self._attention_case(seq_lens, kv_dtype)
            q = torch.randn(batch, HEADS, HEAD_DIM, device=self.device).to(qd)
            args = (q, k_cache, v_cache, tables, lens, HEAD_DIM ** -0.5, scale, scale)
            got = paged_attention_decode(*args, max_seq_len=context)
            self._compare(part, f"decode batch {batch} x ~{context} tokens, {str(kv_dtype)[6:]} KV", got,
                          paged_attention_decode_reference(*args))
            del k_cache, v_cache

    # ---- pytest -m gpu --------------------------------------------------------------------------------
    def pytest(self, part: Part) -> None:
        files = gpu_test_files()
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-p", "bench.compile_stats",
               "-rfE", *files]
        if self.tier.pytest_k:
            cmd += ["-k", self.tier.pytest_k]
        if self.gpu:
            cmd += ["-v"] + (["-n", "8"] if _has("xdist") else [])
        else:  # dry run: every GPU test must still collect without error here
            cmd += ["-q", "--collect-only"]
        part.numbers["files"] = files
        lines: list[str] = []
        rc = self.runner.child(part, cmd, self.child_env(), lines_out=lines)
        words = ("passed", "skipped", "failed", "collected", "error", "no tests ran")
        summary = next((line for line in reversed(lines) if " in " in line and any(w in line for w in words)), "")
        outcomes = {w: sum(f" {w.upper()} " in f" {line} " for line in lines) for w in ("passed", "failed", "error")}
        part.numbers.update(summary=summary.strip("= "), streamed=outcomes)
        if part.status == "partial":  # stopped at the cap: what finished is in the streamed lines
            self.check(part, "pytest -m gpu (capped)", outcomes["failed"] == 0 and outcomes["error"] == 0,
                       f"stopped at the cap: {outcomes['passed']} passed, {outcomes['failed']} failed so far")
            return
        ok = rc == 0 and "error" not in summary and "failed" not in summary
        if self.gpu:
            ok = ok and "passed" in summary
        self.check(part, "pytest -m gpu", ok, f"rc={rc} {part.numbers['summary']}")


def gpu_test_files() -> list[str]:
    """The test modules holding `@pytest.mark.gpu` tests: collecting only these keeps the other modules'
    imports (servers, CPU-kernel builds) out of a GPU run."""
    return sorted(f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text())


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
