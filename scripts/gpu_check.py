"""GPU check: one prepared command that, on a machine with a CUDA GPU, gives a verdict on every kernel
and the benchmark numbers, within a fixed time.

    python3 scripts/gpu_check.py --out DIR            # full tier, <= 8 min including compiles
    python3 scripts/gpu_check.py --out DIR --quick    # quick tier, <= 3 min
    python3 scripts/gpu_check.py --out DIR --dry-run  # no GPU: orchestration, imports, tiny shapes on the
                                                      # CPU reference path (tests/test_gpu_check.py runs it)

Runs with the machine's own python3 (no .venv, no make, no TRITON_INTERPRET: triton 3.6's interpreter
fails with numpy >= 2.4). Parts, in order; each is timed, printed as it goes and recorded; one that
fails or raises is recorded and the next one runs:
  env          GPU, driver, torch/triton versions
  pytest       `pytest -m gpu tests`: the GPU tests of every kernel family (quick: a representative subset)
  kernels_70b  fp8_gemm at the Llama-3.3-70B layer shapes (qkv 10240x8192, o 8192x8192, gate_up
               57344x8192, down 8192x28672) over M, per-channel and block scales, against the torch
               reference on the GPU with the tolerance of tests/test_fp8_gemm.py; W8A16; quantize
               bit-exact; deterministic rows batch-invariant
  kv_offsets   an FP8 KV cache larger than 2^31 elements: write_kv, decode and prefill attention on
               blocks past offset 2^31, against the reference
  decode_256   paged decode attention at batch 256 (70B heads), bf16 and FP8 KV, against the reference
  cuda_graph   a 70B-shaped 2-layer model: CUDA-graph capture and replay vs the eager step
  bench_gemm, bench_attention, bench_decode_step
               bench/gemm.py, bench/attention.py, bench/decode_step.py (eager vs graphs, scaled to 80
               layers; deterministic cost) with grids sized to the tier
Compile plan (each Triton variant compiles once, ~1-2 s on the GPU host; triton's disk cache shares
them between the parts' processes; autotuning benchmarks only the configs its prune leaves, 1-3 per
token bucket): pytest ~110 variants (12 scale layouts x 7 GEMM configs, W8A16, quantize, KV write,
attention) in the full tier, ~15 in the quick one; kernels_70b ~20 more (no bias, as the engine runs);
the decode step, graphs and benchmarks reuse those. Expected: full ~7 min, quick ~3 min.
A time budget guards the whole run: a part that cannot finish in what is left is skipped (recorded),
subprocesses get the remaining time as their timeout. Writes DIR/gpu_check.json (every result and the
benchmark rows), DIR/gpu_check.md (the tables, for bench/GPU.md) and DIR/gpu_check.log (this output).
Exit code 0 when every part that ran passed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.pop("TRITON_INTERPRET", None)  # never the interpreter here (see the docstring)

import torch  # noqa: E402

# tolerance of tests/test_fp8_gemm.py on the GPU: Hopper's fp8 MMA keeps ~14 bits inside a BLOCK_K step
GPU_MMA_REL = 2.0**-11
OUT_RTOL = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
LAYERS_70B = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 64, 8, 128, 16
# quick: the GEMM matrix (12 scale combinations x 5 sizes, ~100 compiles) is left to kernels_70b, which
# checks the two the engine runs (fp8 = token x channel, fp8-block = group x block) at the 70B shapes
QUICK_PYTEST = "not test_gpu_gemm_matches_reference and not test_gpu_weight_only_matches_reference"
WATCHDOG_GRACE = 45.0  # seconds past the budget before the report is written and the process exits


@dataclass
class Part:
    name: str
    status: str = "pending"  # ok | fail | error | skipped
    seconds: float = 0.0
    checks: list[dict] = field(default_factory=list)  # one per sub-check: name, ok, detail
    numbers: dict = field(default_factory=dict)  # benchmark rows / summaries
    note: str = ""


class Tee:
    """Print to the terminal and into the log file, flushing every line (output must stream)."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "w", buffering=1)

    def write(self, text):
        self.stream.write(text)
        self.stream.flush()
        self.file.write(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()


class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.gpu = torch.cuda.is_available() and not self.dry
        self.device = torch.device("cuda" if self.gpu else "cpu")
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.parts: list[Part] = []
        self.bench_dir = Path(tempfile.mkdtemp(prefix="gpu_check_bench_"))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # ---- orchestration ------------------------------------------------------------------------------
    def run(self, name: str, fn, min_seconds: float) -> None:
        part = Part(name)
        self.parts.append(part)
        if self.args.only and name not in self.args.only:
            part.status, part.note = "skipped", "not in --only"
            return
        if self.left() < min_seconds:
            part.status, part.note = "skipped", f"budget: {self.left():.0f}s left, needs ~{min_seconds:.0f}s"
            print(f"\n== {name}: SKIPPED ({part.note})", flush=True)
            return
        print(f"\n== {name} ({self.left():.0f}s left)", flush=True)
        t0 = time.monotonic()
        try:
            fn(part)
            bad = [c for c in part.checks if not c["ok"]]
            part.status = "fail" if bad else "ok"
        except Exception as e:  # record and go on: one broken part must not hide the others
            part.status, part.note = "error", f"{type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stdout)
        finally:
            if self.gpu:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        part.seconds = time.monotonic() - t0
        print(f"== {name}: {part.status.upper()} in {part.seconds:.1f}s {part.note}", flush=True)

    def check(self, part: Part, name: str, ok: bool, detail: str = "") -> None:
        part.checks.append(dict(name=name, ok=bool(ok), detail=detail))
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

    def subprocess(self, part: Part, cmd: list[str], reserve: float = 5.0) -> subprocess.CompletedProcess:
        timeout = max(10.0, self.left() - reserve)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.dry:
            env["TRITON_INTERPRET"] = "0"  # benches default to the interpreter without a GPU: the reference
            env["CUDA_VISIBLE_DEVICES"] = ""
        print("$ " + " ".join(cmd), flush=True)
        try:
            r = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            print(out[-4000:], flush=True)
            raise TimeoutError(f"{cmd[1]} ran past the budget ({timeout:.0f}s)") from None
        print(r.stdout[-6000:], flush=True)
        return r

    # ---- parts --------------------------------------------------------------------------------------
    def part_env(self, part: Part) -> None:
        import triton

        info = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                    numpy=__import__("numpy").__version__, cuda=torch.version.cuda, dry_run=self.dry)
        if self.gpu:
            prop = torch.cuda.get_device_properties(0)
            info.update(gpu=prop.name, sms=prop.multi_processor_count, memory_gb=prop.total_memory / 1e9,
                        capability=f"{prop.major}.{prop.minor}")
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw",
                                  "--format=csv,noheader"], capture_output=True, text=True)
            info["nvidia_smi"] = smi.stdout.strip()
        part.numbers = info
        print(json.dumps(info, indent=1), flush=True)
        self.check(part, "device", self.gpu or self.dry, info.get("gpu", "dry run: no GPU used"))

    def part_pytest(self, part: Part) -> None:
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
        if self.args.quick:
            cmd += ["-k", QUICK_PYTEST]
        if not self.gpu:  # dry run: every GPU test must still collect without error here
            cmd.append("--collect-only")
        r = self.subprocess(part, cmd)
        words = ("passed", "skipped", "failed", "collected", "error")
        summary = next((line for line in reversed(r.stdout.splitlines())
                        if " in " in line and any(w in line for w in words)), "")
        part.numbers["summary"] = summary.strip("= ")
        ok = r.returncode == 0 and "error" not in summary
        if self.gpu:
            ok = ok and "passed" in summary
        self.check(part, "pytest -m gpu", ok, f"rc={r.returncode} {part.numbers['summary']}")

    def part_kernels_70b(self, part: Part) -> None:
        from fp8_turbo.kernels.fp8 import dequantize_fp8, quantize_weight
        from fp8_turbo.kernels.gemm import fp8_gemm, fp8_gemm_reference, fp8_weight_only_gemm, fp8_weight_only_gemm_reference
        from fp8_turbo.kernels.quantize import quantize_fp8

        dev = self.device
        shrink = 64 if not self.gpu else 1
        m_values = [1, 64, 1024] if self.args.quick else [1, 8, 16, 64, 128, 1024, 8192]
        if not self.gpu:
            m_values = [1, 16, 65]
        combos = [("token", "channel"), ("group", "block")]
        gen = torch.Generator(device=dev).manual_seed(0)
        for layer, (n, k) in LAYERS_70B.items():
            n, k = n // shrink, k // shrink
            w = torch.randn(n, k, generator=gen, device=dev) * 0.02
            weights = {wg: quantize_weight(w, wg) for _, wg in combos}
            del w
            for m in m_values:
                if self.left() < 20:
                    self.check(part, f"{layer} M={m}", False, "budget exhausted")
                    return
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
                if m in (1, 16, 512, 8192) or not self.gpu:  # W8A16 (fp8-weight-only)
                    b, b_scale = weights["channel"]
                    xb = x.to(torch.bfloat16 if self.gpu else torch.float32)
                    c = fp8_weight_only_gemm(xb, b, b_scale).float()
                    ref = fp8_weight_only_gemm_reference(xb.float(), b, b_scale).float()
                    mag = xb.float().abs() @ dequantize_fp8(b, b_scale).abs().T
                    tol = 2 * (k + 4) * 2.0**-24 * mag + OUT_RTOL[torch.bfloat16] * ref.abs() + 1e-6
                    worst = ((c - ref).abs() / tol).max().item()
                    self.check(part, f"w8a16 {layer} M={m}", worst <= 1.0, f"worst err/tol {worst:.3f}")
            del weights
        # quantize: bit-exact against the CPU reference
        for m, k in [(1, 8192), (64, 28672), (1024, 8192)] if self.gpu else [(3, 300)]:
            x = torch.randn(m, k) * torch.logspace(-3, 3, m)[:, None]
            for gran in ("token", "group", "tensor"):
                q, s = quantize_fp8(x.to(dev), gran)
                q_ref, s_ref = quantize_fp8(x, gran)
                same = torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
                self.check(part, f"quantize_fp8 {gran} [{m}, {k}]", same, "bit-exact" if same else "differs")
        # deterministic: a row's result does not depend on the batch
        n, k = 8192 // shrink, 8192 // shrink
        b, b_scale = quantize_weight(torch.randn(n, k, device=dev) * 0.02, "channel")
        a, a_scale = quantize_fp8(torch.randn(300, k, device=dev), "token")
        full = fp8_gemm(a, b, a_scale, b_scale, torch.bfloat16, deterministic=True)
        same = all(torch.equal(fp8_gemm(a[r], b, a_scale[r], b_scale, torch.bfloat16, deterministic=True), full[r])
                   for r in (slice(0, 1), slice(5, 21), slice(100, 300)))
        self.check(part, "deterministic fp8_gemm rows batch-invariant", same, "M=1, 16, 200 vs 300")

    def _attention_case(self, seq_lens, kv_dtype, block_offset=0, kv_heads=KV_HEADS):
        """Random cache with each sequence's blocks at block_offset + a shuffled range; q bf16."""
        dev = self.device
        gen = torch.Generator().manual_seed(len(seq_lens))
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
            region.copy_((torch.randn(region.shape, generator=gen) / scale).to(kv_dtype))
        qd = torch.bfloat16 if self.gpu else torch.float32
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        return k_cache, v_cache, tables.to(dev), lens, scale, qd

    def _compare(self, part, name, got, want, rel=2e-2):
        err = ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()
        self.check(part, name, err <= rel and bool(torch.isfinite(got).all()), f"rel L2 err {err:.2e} (<= {rel})")

    def part_kv_offsets(self, part: Part) -> None:
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

    def part_decode_256(self, part: Part) -> None:
        from fp8_turbo.kernels import paged_attention_decode
        from fp8_turbo.kernels.paged_attention import paged_attention_decode_reference

        batch, context = (256, 2048) if self.gpu else (8, 100)
        if self.args.quick and self.gpu:
            context = 1024
        for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
            seq_lens = [context - (i * 37) % (context // 2) for i in range(batch)]
            k_cache, v_cache, tables, lens, scale, qd = self._attention_case(seq_lens, kv_dtype)
            q = torch.randn(batch, HEADS, HEAD_DIM, device=self.device).to(qd)
            args = (q, k_cache, v_cache, tables, lens, HEAD_DIM ** -0.5, scale, scale)
            got = paged_attention_decode(*args, max_seq_len=context)
            self._compare(part, f"decode batch {batch} x ~{context} tokens, {str(kv_dtype)[6:]} KV", got,
                          paged_attention_decode_reference(*args))
            del k_cache, v_cache

    def part_cuda_graph(self, part: Part) -> None:
        from bench.decode_step import LLAMA_70B, TINY, build_model, decode_host
        from fp8_turbo.engine.core.cuda_graphs import CudaGraphRunner, bucket_for
        from fp8_turbo.engine.core.kv_cache import allocate_kv_caches
        from fp8_turbo.engine.core.model_runner import unpack_step

        dev = self.device
        dtype = torch.bfloat16 if self.gpu else torch.float32
        model = build_model(2, dev, dtype, LLAMA_70B if self.gpu else TINY)
        cfg = model.cfg
        context, batches = (512, [1, 5, 64, 256]) if self.gpu else (48, [1, 3])
        blocks_per_seq = -(-context // BLOCK)
        caches = allocate_kv_caches(2, max(batches) * blocks_per_seq, BLOCK, cfg.num_kv_heads, cfg.head_dim,
                                    torch.float8_e4m3fn if self.gpu else dtype, dev)
        for cache in caches:
            for c in cache:
                c.copy_((torch.randn(c.shape, device=dev) * 4).to(c.dtype))
        for layer in model.layers:
            layer.self_attn.k_scale = layer.self_attn.v_scale = 1.0 / 16
        graphs = CudaGraphRunner(model, caches, BLOCK, max_model_len=blocks_per_seq * BLOCK, max_num_seqs=256,
                                 device=dev, capture=self.gpu, max_bucket=256)
        graphs.buckets = [1, 8, 64, 256] if self.gpu else [1, 4]  # batch 5 runs padded to 8
        t0 = time.monotonic()
        graphs.capture()
        part.numbers["capture_s"] = time.monotonic() - t0
        part.numbers["buckets"] = graphs.buckets
        self.check(part, "capture", len(graphs.graphs) == len(graphs.buckets) or not self.gpu,
                   f"{len(graphs.graphs)} graphs in {part.numbers['capture_s']:.1f}s")
        for batch in batches:
            host = decode_host(batch, context, blocks_per_seq)
            with torch.inference_mode():
                ids, meta = unpack_step(_to(dev, host, blocks_per_seq), host, blocks_per_seq)
                eager = model(ids, meta, caches).float()
                replay = graphs.run(decode_host(batch, context, blocks_per_seq)).float()
            top = (eager.argmax(-1) == replay.argmax(-1)).float().mean().item()
            self._compare(part, f"graph replay vs eager, batch {batch} (bucket {bucket_for(batch, graphs.buckets)})",
                          replay, eager, rel=1e-2)
            self.check(part, f"same argmax, batch {batch}", top >= 0.99, f"{top:.3f} of rows")

    def part_bench(self, part: Part, script: str, args: list[str]) -> None:
        out = self.bench_dir / Path(script).stem
        r = self.subprocess(part, [sys.executable, script, *args, "--out", str(out)])
        self.check(part, script, r.returncode == 0, f"rc={r.returncode}")
        for f in sorted(out.glob("*.json")):
            part.numbers[f.stem] = json.loads(f.read_text())
        for f in sorted(out.glob("*.md")):
            part.numbers[f"{f.stem}_md"] = f.read_text()

    def watchdog(self) -> None:
        """Past the budget and a grace period (a hung kernel, a part without its own guard): write the
        report with what finished and exit, so the files come back."""
        import threading

        def fire():
            running = next((p for p in reversed(self.parts) if p.status == "pending"), None)
            if running is not None:
                running.status, running.note = "error", "watchdog: still running past the budget"
            print(f"\n!! watchdog: {self.args.budget + WATCHDOG_GRACE:.0f}s passed; writing the report and exiting", flush=True)
            self.report()
            os._exit(2)

        timer = threading.Timer(max(1.0, self.left() + WATCHDOG_GRACE), fire)
        timer.daemon = True
        timer.start()

    # ---- the whole run --------------------------------------------------------------------------------
    def main(self) -> int:
        self.watchdog()
        quick, gpu = self.args.quick, self.gpu
        print(f"# gpu_check {'dry run' if self.dry else 'quick' if quick else 'full'}: budget {self.args.budget:.0f}s, "
              f"{torch.cuda.get_device_name() if gpu else 'no GPU'}", flush=True)
        self.run("env", self.part_env, 1)
        self.run("pytest", self.part_pytest, 30)
        self.run("kernels_70b", self.part_kernels_70b, 30)
        self.run("kv_offsets", self.part_kv_offsets, 10)
        self.run("decode_256", self.part_decode_256, 10)
        self.run("cuda_graph", self.part_cuda_graph, 20)
        if gpu:
            gemm = ["--tp", "1", "--m", *(["1", "16", "64", "512", "4096"] if quick else
                                          ["1", "4", "16", "64", "128", "512", "1024", "4096", "8192"])]
            attention = ["--batch", *(["1", "64"] if quick else ["1", "8", "64", "256"]),
                         "--context", *(["4096"] if quick else ["1024", "4096", "16384"])]
            decode = ["--layers", "2" if quick else "4", "--batch", *(["1", "64"] if quick else ["1", "8", "64", "256"])]
            decode += [] if quick else ["--deterministic"]
        else:  # dry run: tiny shapes on the CPU reference path
            gemm = ["--tp", "1", "--m", "1", "16", "--layers", "qkv"]
            attention = ["--batch", "1", "--context", "64", "--kv", "bf16"]
            decode = ["--layers", "1", "--batch", "1", "2", "--reps", "1", "--deterministic"]
        self.run("bench_gemm", lambda p: self.part_bench(p, "bench/gemm.py", gemm), 40 if gpu else 5)
        self.run("bench_attention", lambda p: self.part_bench(p, "bench/attention.py", attention), 25 if gpu else 5)
        self.run("bench_decode_step", lambda p: self.part_bench(p, "bench/decode_step.py", decode), 30 if gpu else 5)
        return self.report()

    def report(self) -> int:
        total = time.monotonic() - self.start
        ran = [p for p in self.parts if p.status != "skipped"]
        failed = [p for p in ran if p.status != "ok"]
        env = next((p.numbers for p in self.parts if p.name == "env"), {})
        out = Path(self.args.out)
        doc = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=" ".join(sys.argv), seconds=total,
                   tier="dry-run" if self.dry else "quick" if self.args.quick else "full", env=env,
                   parts=[asdict(p) for p in self.parts])
        (out / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str))
        lines = [f"## {doc['date']}: {env.get('gpu', 'no GPU (dry run)')}, {doc['tier']} tier, {total:.0f}s",
                 "", f"`{doc['command']}`; torch {env.get('torch')}, triton {env.get('triton')}, "
                 f"{env.get('nvidia_smi', '')}", "", "| part | status | s | checks | note |", "|---|---|---|---|---|"]
        for p in self.parts:
            bad = sum(not c["ok"] for c in p.checks)
            lines.append(f"| {p.name} | {p.status} | {p.seconds:.1f} | {len(p.checks) - bad}/{len(p.checks)} ok | {p.note[:120]} |")
        fails = [f"- {p.name}: {c['name']}: {c['detail']}" for p in self.parts for c in p.checks if not c["ok"]]
        if fails:
            lines += ["", "Failed checks:", *fails[:50]]
        for p in self.parts:
            for key, value in p.numbers.items():
                if key.endswith("_md"):
                    lines += ["", f"### {p.name}", "", value.strip()]
        (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
        print("\n" + "\n".join(lines[:8 + len(self.parts) + (len(fails[:50]) + 2 if fails else 0)]))
        print(f"\n{len(ran) - len(failed)} of {len(ran)} parts passed, {len(self.parts) - len(ran)} skipped, "
              f"{total:.0f}s; wrote {out}/gpu_check.json, gpu_check.md, gpu_check.log", flush=True)
        return 1 if failed else 0


def _to(device: torch.device, host, max_blocks: int) -> torch.Tensor:
    from fp8_turbo.engine.core.model_runner import pack_step

    return pack_step(host, max_blocks, pin=False).to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json, .md and .log")
    p.add_argument("--quick", action="store_true", help="the 3-minute tier")
    p.add_argument("--dry-run", action="store_true", help="no GPU: orchestration and tiny shapes on the CPU")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 470 / 175)")
    p.add_argument("--only", nargs="+", default=None, help="run only these parts")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        print("no CUDA GPU: running the dry run (orchestration, imports, tiny shapes on the CPU reference path)")
        args.dry_run = True
    if args.budget is None:
        args.budget = 175.0 if args.quick else 470.0
    args.out.mkdir(parents=True, exist_ok=True)
    sys.stdout = Tee(sys.stdout, args.out / "gpu_check.log")
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
