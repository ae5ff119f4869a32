"""fp8-turbo: an FP8 inference engine for Llama-family models.

    from engine import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct", quantization="fp8")
    print(llm.generate(["Hello"], SamplingParams(max_tokens=32))[0].outputs[0].text)
"""
from engine.core.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling.params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob"]


def __getattr__(name: str):
    # LLM pulls in the model, tokenizer and kernels: import it on first use only, so that light
    # submodules (engine.model.config, engine.sampling.params) stay cheap to import.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
