"""Which implementation a kernel call runs: Triton on CUDA tensors (or on the CPU under
TRITON_INTERPRET=1), the torch reference otherwise."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1) on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """Dispatch rule shared by every launcher: CUDA -> Triton, CPU -> reference, unless interpreting."""
    return t.is_cuda or interpreting()
