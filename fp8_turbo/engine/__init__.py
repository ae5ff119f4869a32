"""The engine, in wings that import only downward:

    serving -> lab -> llm -> core -> checkpoints -> model -> fp8_turbo.kernels
    sampling and fp8_turbo.tokenizer are leaves.

The public face (`LLM`, `SamplingParams`, ...) is re-exported by `fp8_turbo` itself.
"""
