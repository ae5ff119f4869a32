"""What loads: resolving a model name to a checkpoint (source.py), HF safetensors and GGUF tensors,
pre-quantized FP8 formats and the quantize writer (fp8.py), streaming into a model (loader.py).
Imports model/, kernels/ and tokenizer/ only."""
