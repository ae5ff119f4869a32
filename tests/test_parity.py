"""Logit and greedy-token parity with transformers' LlamaForCausalLM on tiny random checkpoints.

Tolerance: fp32 on both sides and no FP8 activations, so no e4m3 rounding boundary can turn a
summation-order difference into a step (compare tests/test_interpreter_model.py); what is left is fp32
summation order, which grows like sqrt(K) 2^-24 per dot product with independent roundings (Higham &
Mary 2019): ~1e-6 for K <= 160 over the 5 GEMMs on the residual path; measured 2.8e-7 on an AVX2-only
AMD CPU. 1e-4 (the foundation issue's bound) holds with lambda = 4 in their Thm 2.4.
Greedy tokens: the smallest top-2 logit gap along these trajectories is 3.7e-4 (llama2 style, logits
up to 0.7), >1000x the measured logit difference, so the argmax cannot tip on another CPU.
"""
from __future__ import annotations

import pytest
import torch

from fp8_turbo import LLM, SamplingParams
from model_factory import STYLES, VOCAB, load_reference, make_checkpoint


def prompt_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Our logits at every prompt position, [len(ids), V], from one prefill through the paged cache."""
    return llm.engine.sequence_logits(ids)


@pytest.fixture(scope="module", params=sorted(STYLES))
def checkpoint(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, path, load_reference(path)


def test_prompt_logits_match_transformers(checkpoint):
    style, path, ref = checkpoint
    llm = LLM(str(path), device="cpu")
    # 70 tokens: longer than the llama31 style's original_max_position_embeddings (32), so the
    # llama3 rope scaling matters.
    ids = torch.randint(3, VOCAB, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = prompt_logits(llm, ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    err = (ours - theirs).abs().max() / theirs.abs().max()
    assert err < 1e-4, f"{style}: max logit error {err:.2e} of max magnitude"


def test_greedy_tokens_match_transformers(checkpoint):
    style, path, ref = checkpoint
    llm = LLM(str(path), device="cpu")
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 40)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            gen = ref.generate(torch.tensor([p]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                               eos_token_id=None, pad_token_id=0)
        assert out.outputs[0].token_ids == gen[0, len(p):].tolist(), style
        assert out.outputs[0].finish_reason == "length"


def test_chunked_prefill_and_small_cache_give_same_tokens(checkpoint):
    """Chunked prefill (8-token budget) and a cache small enough to force preemption change nothing."""
    style, path, _ = checkpoint
    prompts = [{"prompt_token_ids": torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()}
               for n in (3, 17, 30, 45)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = [LLM(str(path), device="cpu").generate([p], params)[0].outputs[0].token_ids for p in prompts]
    cfg = LLM(str(path), device="cpu").engine.model_config
    per_block = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * 16
    tight = LLM(str(path), device="cpu", max_num_batched_tokens=16, kv_cache_memory_bytes=per_block * 8)
    together = tight.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert tight.engine.block_manager.num_free_blocks == tight.engine.block_manager.num_blocks
