"""fp8-turbo: an FP8 inference engine for Llama-family models.

    from fp8_turbo import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct", quantization="fp8")
    print(llm.generate(["Hello"], SamplingParams(max_tokens=32))[0].outputs[0].text)

The one import root. Its parts, each importing only downward:
    fp8_turbo.engine     the engine in wings (serving -> lab -> llm -> core -> checkpoints -> model)
    fp8_turbo.kernels    Triton kernels, their torch references, and the C++ CPU kernels (kernels/cpu)
    fp8_turbo.tokenizer  tokenizer loading, incremental detokenizer, chat templates, tool calls
"""
from fp8_turbo.engine.core.outputs import CompletionOutput, Logprob, RequestOutput
from fp8_turbo.engine.sampling.params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob"]


def __getattr__(name: str):
    # LLM pulls in the model, tokenizer and kernels: import it on first use only, so that light
    # submodules (fp8_turbo.engine.model.config, fp8_turbo.engine.sampling.params) stay cheap to import.
    if name == "LLM":
        from fp8_turbo.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'fp8_turbo' has no attribute {name!r}")
