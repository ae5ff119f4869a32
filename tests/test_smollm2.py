"""The embedded default model, SmolLM2-135M-Instruct (GGUF Q4_1), against transformers loading the
same GGUF file: greedy tokens identical, prompt logprobs within 1e-3.

Both sides run the dequantized weights in fp32 (no FP8 activations, so no e4m3 rounding boundary to
tip): they differ only by fp32 summation order, measured 5e-5 nat (1.6e-6 of logits up to 39) on an
AVX2-only CPU; 1e-3 leaves 20x for other BLAS orders, and the smallest top-2 gap along the greedy chats
(0.03 nat) is 600x the measured difference."""
from __future__ import annotations

import pytest
import torch

from fp8_turbo import LLM, SamplingParams
from fp8_turbo.engine.checkpoints.source import resolve_model

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Give me three tips for writing clean Python code."}],
]


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    path = resolve_model("smollm2-135m-instruct").path
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_config_of_embedded_model(llm):
    cfg = llm.engine.model_config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings


def test_greedy_chat_matches_transformers(llm, reference):
    """64 greedy tokens (or up to EOS, which both include) of three chats, run batched on our side."""
    params = SamplingParams(temperature=0, max_tokens=64)
    prompts = [llm.tokenizer.apply_chat_template(c) for c in CHATS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for ids, out in zip(prompts, outs):
        with torch.inference_mode():
            gen = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64, pad_token_id=0)
        completion = out.outputs[0]
        assert completion.token_ids == gen[0, len(ids):].tolist()
        assert completion.finish_reason == ("stop" if len(completion.token_ids) < 64 else "length")
        assert completion.text == llm.tokenizer.decode(completion.token_ids)


def test_prompt_logprobs_match_transformers(llm, reference):
    ids = llm.tokenizer.apply_chat_template(CHATS[2])
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    with torch.inference_mode():
        ref = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert ids[pos] in entry and len(entry) <= 3
        assert abs(entry[ids[pos]].logprob - ref[pos - 1, ids[pos]].item()) < 1e-3
        top = ref[pos - 1].argmax().item()
        assert entry[ids[pos]].rank == int((ref[pos - 1] > ref[pos - 1, ids[pos]]).sum()) + 1
        assert top in entry and entry[top].rank == 1


def test_fp8_chat_is_sensible_and_deterministic(llm):
    fp8 = LLM("smollm2-135m-instruct", quantization="fp8", device="cpu")
    params = SamplingParams(temperature=0, max_tokens=24)
    first = fp8.chat(CHATS[0], params)[0].outputs[0].text
    again = fp8.chat(CHATS[0], params)[0].outputs[0].text
    assert first == again  # the same shapes in the same process: the same sums, exactly
    # Not a bit-level check: the FP8 greedy text may differ between CPUs (README: an activation on an
    # e4m3 rounding boundary rounds either way). "Paris" survives unless the logits move by more than the
    # top-2 gaps before it: 0.95 nats at the first token, 3.3-5.8 at the next five (measured).
    assert "Paris" in first, first
