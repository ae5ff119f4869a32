"""Engine-wide options: which model, how it is quantized, and how the KV cache and batches are sized."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8_turbo.engine.core.spec_decode import SpeculativeConfig
from fp8_turbo.engine.model.linear import DEFAULT_IGNORE, QUANT_SCHEMES
from fp8_turbo.engine.model.model import VOCAB_DTYPES

KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass(slots=True)
class EngineConfig:
    model: str
    # None/"none", "fp8" (the backend's pick: engine.model.schemes.fp8_scheme), or a scheme by name
    # ("fp8-w8a8", "fp8-weight-only", "fp8-block", "fp8-tensor", finer "-g32"/"-g64"/"-g128"/"-mx" ones)
    quantization: str | None = None
    quantization_ignore: tuple[str, ...] = DEFAULT_IGNORE  # module patterns kept in high precision
    kv_cache_dtype: str = "auto"
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    dtype: str = "auto"  # "auto" -> bfloat16 on CUDA, float32 on CPU
    max_model_len: int | None = None
    seed: int = 0
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None  # KV budget; default: 1 GiB on CPU, the memory plan on CUDA
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of the GPU's memory this engine may use
    # How the embedding and a high-precision lm_head are stored: "model" (the model dtype), "bfloat16",
    # "fp8" (e4m3 per row), or "auto": bfloat16 on CPU for FP8 schemes run by our CPU kernels (halves
    # the largest matrix a decode step reads; bench/ACCURACY.md measures each choice), else the model's.
    lm_head_dtype: str = "auto"
    tensor_parallel_size: int = 1  # ranks sharing the model (fp8_turbo/engine/core/workers.py); KV budget is per rank
    deterministic: bool = False  # batch-invariant kernels (fixed GEMM config, no split-K / split-KV)
    enforce_eager: bool = False  # CUDA: no decode CUDA graphs (vLLM's name)
    max_graph_batch_size: int = 256  # largest decode batch captured in a CUDA graph
    max_seq_len_to_capture: int = 8192  # longer sequences decode eagerly (vLLM's name)
    # Speculative decoding (vLLM's name): {"method": "ngram", "num_speculative_tokens": 3, ...} (a dict,
    # its JSON or a SpeculativeConfig; see fp8_turbo/engine/core/spec_decode.py); None: off.
    speculative_config: SpeculativeConfig | dict | str | None = None

    def __post_init__(self) -> None:
        if self.quantization is None:
            self.quantization = "none"
        if self.quantization not in QUANT_SCHEMES:
            raise ValueError(f"quantization must be one of {QUANT_SCHEMES}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.max_graph_batch_size < 1:
            raise ValueError(f"max_graph_batch_size must be >= 1, got {self.max_graph_batch_size}")
        if self.lm_head_dtype not in ("auto", *VOCAB_DTYPES):
            raise ValueError(f"lm_head_dtype must be one of {('auto', *VOCAB_DTYPES)}, got {self.lm_head_dtype!r}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def vocab_matrices_dtype(self, device: torch.device, quantized: bool) -> str:
        """What "auto" means for `lm_head_dtype` (see the field's comment); `quantized`: the loaded
        model has FP8 linear layers (asked for, or brought by a pre-quantized checkpoint)."""
        if self.lm_head_dtype != "auto":
            return self.lm_head_dtype
        from fp8_turbo.kernels import cpu as cpu_kernels

        return "bfloat16" if device.type == "cpu" and quantized and cpu_kernels.available() else "model"

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)
