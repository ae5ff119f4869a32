"""The offline Python API, with vLLM's names: `LLM(...).generate(...)` and `.chat(...)`."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC

from tqdm import tqdm

from fp8_turbo.engine.core.engine_config import EngineConfig
from fp8_turbo.engine.core.llm_engine import LLMEngine
from fp8_turbo.engine.core.outputs import RequestOutput
from fp8_turbo.engine.sampling.params import SamplingParams

PromptType = str | dict


class LLM:
    """Load a model once, then generate for many prompts with continuous batching.

    `model` is "smollm2-135m-instruct" (embedded), an HF checkpoint directory or a .gguf file.
    `tensor_parallel_size=N` shards the model over N processes (this one and N-1 spawned workers; on
    CUDA one GPU each): scripts that create one need the `if __name__ == "__main__":` guard of spawn.
    `speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
    "prompt_lookup_min": 2}` turns on exact speculative decoding (drafts from n-gram matches in the
    prompt and output, and a structured output's forced tokens): the same tokens and logprobs, in
    fewer steps when the output copies (fp8_turbo/engine/core/spec_decode.py).
    Extra keyword arguments go to `EngineConfig` (block_size, max_num_seqs, kv_cache_memory_bytes, ...).
    """

    def __init__(self, model: str, *, quantization: str | None = None, kv_cache_dtype: str = "auto",
                 device: str = "auto", dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 tensor_parallel_size: int = 1, speculative_config: dict | str | None = None, **engine_options):
        config = EngineConfig(model=model, quantization=quantization, kv_cache_dtype=kv_cache_dtype, device=device,
                              dtype=dtype, max_model_len=max_model_len, seed=seed,
                              tensor_parallel_size=tensor_parallel_size, speculative_config=speculative_config,
                              **engine_options)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop tensor-parallel workers now (they also stop when this object is collected or at exit)."""
        self.engine.shutdown()

    def generate(self, prompts: PromptType | SequenceABC[PromptType],
                 sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Prompts: a string, {"prompt_token_ids": [...]}, or a list of either. Outputs keep prompt order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        request_ids = []
        try:
            for prompt, p in zip(prompts, params):
                text, token_ids = self._tokenize(prompt)
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, token_ids, p, prompt=text)
                request_ids.append(request_id)
            return self._run(request_ids, use_tqdm)
        except BaseException:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """One conversation (a list of messages) or a batch of them, rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.tokenizer.apply_chat_template(conv, tools=tools,
                                                                          add_generation_prompt=add_generation_prompt)}
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise TypeError("prompt_token_ids must be a list of ints")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise TypeError(f"a prompt is a str or a dict with 'prompt_token_ids' or 'prompt', got {type(prompt).__name__}")

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generating", disable=not use_tqdm)
        while pending:
            for out in self.engine.step():
                if out.finished and out.request_id in pending:
                    finished[out.request_id] = out
                    pending.discard(out.request_id)
                    bar.update(1)
            if pending and not self.engine.has_unfinished_requests():
                raise RuntimeError(f"requests {sorted(pending)} vanished from the engine")
        bar.close()
        return [finished[r] for r in request_ids]
