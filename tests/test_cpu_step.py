"""The native CPU step (fp8_turbo/kernels/cpu/step.cpp, fp8_turbo/engine/model/native_step.py) against the
module path it replaces (model.py on the same GEMM / attention / small-op kernels).

Both compute every value with the same kernel functions in the same order, so the contract is bit
identity: the logits of every requested row and the KV-cache contents after every step are compared
with torch.equal, over a script of steps that mixes what the model runner sends (whole and chunked
prefills, decode tokens, chunks asking for several logits rows: prompt logprobs and speculative
verification), for every quantization scheme the step takes, fp32 / fp8 KV caches, 1 and 2 threads
and every instruction set this CPU has.
"""
from __future__ import annotations

import pytest
import torch

from fp8_turbo import LLM, SamplingParams
from fp8_turbo.engine.core.model_runner import HostStep, pack_step, unpack_step
from fp8_turbo.engine.model import native_step as native_module
from fp8_turbo.engine.model.linear import QUANT_SCHEMES
from fp8_turbo.kernels.cpu import gemm as cpu_gemm
from fp8_turbo.kernels.cpu import step as native
from tests.model_factory import make_checkpoint

pytestmark = pytest.mark.skipif(not native.available(), reason="the native CPU step is not built")

BLOCK = 16
# (sequence, new tokens, offsets within the chunk whose logits are asked for) per step; a sequence's
# chunks follow each other. Sequence 1's 4-token chunks ask for every row (speculative verification),
# sequence 3 has prompt-logprob rows, sequence 2 a chunk that asks for none.
SCRIPT = [
    [(0, 37, [36]), (1, 5, [0, 1, 2, 3, 4])],
    [(0, 1, [0]), (1, 4, [0, 1, 2, 3]), (2, 20, [])],
    [(0, 1, [0]), (1, 1, [0]), (2, 3, [1, 2]), (3, 18, list(range(0, 18, 3)))],
    [(3, 1, [0])],
    [(0, 1, [0]), (1, 4, [0, 1, 2, 3]), (2, 1, [0]), (3, 1, [0])],
    [(0, 1, [0]), (2, 1, [0])],  # decode batches of 2, 3 and 4 rows: the small-M GEMV tiles
    [(0, 1, [0]), (2, 1, [0]), (3, 1, [0])],
    [(0, 1, [0]), (1, 1, [0]), (2, 1, [0]), (3, 1, [0])],
]


def _steps(vocab: int, seed: int = 0):
    """HostSteps of SCRIPT with random token ids; sequence s owns blocks s*8 .. s*8+7."""
    g = torch.Generator().manual_seed(seed)
    done: dict[int, int] = {}
    for step in SCRIPT:
        h = HostStep([], [], [], [], [], [], [0], 0, 0, [])
        for s, n, rows in step:
            start = done.get(s, 0)
            table = list(range(s * 8, s * 8 + 8))
            h.logits_indices += [h.cu_seqlens_q[-1] + r for r in rows]
            h.input_ids += torch.randint(3, vocab, (n,), generator=g).tolist()
            h.positions += list(range(start, start + n))
            h.slot_mapping += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + n)]
            h.block_tables.append(table[: (start + n + BLOCK - 1) // BLOCK])
            h.seq_lens.append(start + n)
            h.cu_seqlens_q.append(h.cu_seqlens_q[-1] + n)
            done[s] = start + n
        h.max_query_len = max(n for _, n, _ in step)
        h.max_seq_len = max(h.seq_lens)
        yield h


def _run(model, caches, vocab: int, native_on: bool, monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setenv("FP8_TURBO_NATIVE_STEP", "1" if native_on else "0")
    out = []
    for host in _steps(vocab):
        max_blocks = max(len(t) for t in host.block_tables)
        input_ids, meta = unpack_step(pack_step(host, max_blocks, pin=False), host, max_blocks)
        assert (native_module.native_step(model, input_ids) is not None) == native_on
        out.append(model(input_ids, meta, caches))
    return out


def _fresh_caches(engine):
    return [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in engine.runner.kv_caches]


def _assert_same(model, engine, monkeypatch, label: str) -> None:
    vocab = engine.model_config.vocab_size
    ref_caches, caches = _fresh_caches(engine), _fresh_caches(engine)
    ref = _run(model, ref_caches, vocab, False, monkeypatch)
    got = _run(model, caches, vocab, True, monkeypatch)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, (label, i, a.shape, b.shape)
        assert torch.equal(a, b), f"{label}: step {i} logits differ, max {float((a - b).abs().max()):.3g}"
    for layer, ((rk, rv), (k, v)) in enumerate(zip(ref_caches, caches)):
        assert torch.equal(rk.view(torch.uint8), k.view(torch.uint8)), (label, "k cache", layer)
        assert torch.equal(rv.view(torch.uint8), v.view(torch.uint8)), (label, "v cache", layer)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("step_models")
    # llama31: GQA 4:1, llama3 rope scaling, untied lm_head; llama32: tied (bf16 vocab matrix under
    # FP8); hidden 128 so 1x128 groups and 128x128 blocks are whole; head_dim 32 / 16.
    return {"llama31": make_checkpoint(root / "llama31", "llama31", hidden_size=128, layers=2),
            "llama32": make_checkpoint(root / "llama32", "llama32", hidden_size=64, layers=2,
                                       overrides={"intermediate_size": 200})}


W8A8 = "fp8-w8a8" if "fp8-w8a8" in QUANT_SCHEMES else "fp8"  # the per-channel / per-token scheme's name
CASES = [("llama31", "none", "auto"), ("llama31", W8A8, "auto"), ("llama31", "fp8-weight-only", "auto"),
         ("llama31", "fp8-tensor", "auto"), ("llama31", "fp8-block", "auto"), ("llama31", W8A8, "fp8"),
         ("llama31", "fp8-weight-only-g32", "auto"), ("llama31", "fp8-weight-only-mx", "auto"),
         ("llama31", "fp8-w8a8-g64", "auto"), ("llama31", "fp8-w8a8-mx", "auto"),
         ("llama32", "fp8", "auto"), ("llama32", "none", "fp8")]


@pytest.mark.parametrize("style,scheme,kv", [c for c in CASES if c[1] in QUANT_SCHEMES])
def test_native_step_matches_module_path(checkpoints, style, scheme, kv, monkeypatch):
    """Every logits row and every cache byte bit-identical to the module path, over SCRIPT."""
    llm = LLM(str(checkpoints[style]), quantization=scheme, kv_cache_dtype=kv, device="cpu",
              kv_cache_memory_bytes=8 << 20, block_size=BLOCK)
    _assert_same(llm.engine.model, llm.engine, monkeypatch, f"{style} {scheme} kv={kv}")


@pytest.mark.parametrize("scheme", [s for s in (W8A8, "fp8-weight-only", "fp8-weight-only-mx") if s in QUANT_SCHEMES])
def test_threads_and_isas_invariant(checkpoints, scheme, monkeypatch):
    """1 or 2 threads, each instruction set: the same bits as each other and as the module path."""
    llm = LLM(str(checkpoints["llama31"]), quantization=scheme, device="cpu", kv_cache_memory_bytes=8 << 20,
              block_size=BLOCK)
    engine, model = llm.engine, llm.engine.model
    vocab = engine.model_config.vocab_size
    reference = _run(model, _fresh_caches(engine), vocab, False, monkeypatch)
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for isa in cpu_gemm.supported_isas():
                monkeypatch.setattr(native_module, "selected_isa", lambda isa=isa: cpu_gemm.ISAS.index(isa))
                got = _run(model, _fresh_caches(engine), vocab, True, monkeypatch)
                for i, (a, b) in enumerate(zip(reference, got)):
                    assert torch.equal(a, b), f"{threads} threads, {isa}: step {i} differs from the module path"
    finally:
        torch.set_num_threads(saved)


def test_falls_back_and_rebuilds(checkpoints, monkeypatch):
    """A forward hook sends the forward through the modules (the hook sees every call); a changed
    module attribute (a KV scale) rebuilds the step's view of the model."""
    llm = LLM(str(checkpoints["llama31"]), quantization="fp8", device="cpu", kv_cache_memory_bytes=8 << 20,
              block_size=BLOCK)
    model = llm.engine.model
    ids = torch.tensor([5], dtype=torch.int64)
    step = native_module.native_step(model, ids)
    assert step is not None
    calls = []
    handle = model.layers[0].mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))
    assert native_module.native_step(model, ids) is None
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2, temperature=0))
    assert len(calls) == 2  # the prefill and one decode step ran the modules
    handle.remove()
    assert native_module.native_step(model, ids) is step
    model.layers[1].self_attn.k_scale = 0.5
    rebuilt = native_module.native_step(model, ids)
    assert rebuilt is not None and rebuilt is not step


def test_bad_step_raises_before_any_work(checkpoints):
    """Out-of-range inputs are refused with their value, and the caches stay untouched."""
    llm = LLM(str(checkpoints["llama31"]), quantization="fp8", device="cpu", kv_cache_memory_bytes=8 << 20,
              block_size=BLOCK)
    model, engine = llm.engine.model, llm.engine
    caches = _fresh_caches(engine)
    host = next(_steps(engine.model_config.vocab_size))
    host.input_ids[3] = 10 ** 6
    max_blocks = max(len(t) for t in host.block_tables)
    input_ids, meta = unpack_step(pack_step(host, max_blocks, pin=False), host, max_blocks)
    with pytest.raises(RuntimeError, match="token id 1000000"):
        model(input_ids, meta, caches)
    assert all(not k.any() and not v.any() for k, v in caches)


def test_buffers_taken_at_start(checkpoints):
    """A server's start-up check reserves the step's buffers for the token budget and context, so a step
    of the whole budget (a chunked prompt) takes no more memory later."""
    llm = LLM(str(checkpoints["llama31"]), quantization="fp8", device="cpu", kv_cache_memory_bytes=8 << 20,
              block_size=BLOCK, max_num_batched_tokens=48)
    engine = llm.engine
    assert engine.step_workspace_bytes == 0  # the library grows them with its steps
    engine.self_test()
    step = native_module.native_step(engine.model, torch.tensor([5], dtype=torch.int64))
    rows, keys, threads, nbytes = held = step.step.workspace()
    assert rows == 48 and keys == engine.max_model_len and threads >= 1
    assert nbytes == engine.step_workspace_bytes > 0
    llm.generate([{"prompt_token_ids": [5 + i % 50 for i in range(100)]}], SamplingParams(max_tokens=3, temperature=0))
    assert step.step.workspace() == held
