"""A process-wide count of changes to model modules, so a view of a model's tensors (the native CPU step,
fp8_turbo/engine/model/native_step.py) knows in O(1) per step whether it is still current.

Every module class of the decoder derives from `Versioned`: setting any attribute (a weight, a scale,
a scheme, a KV scale, a submodule) or moving/casting the module (`.to`, `.float`: nn.Module._apply)
advances the count. Changes made in place inside a tensor (`weight.data.mul_(...)`, `copy_`) keep the
tensor and its storage, so a view that holds the tensor sees them without a new count.
"""
from __future__ import annotations

from torch import nn

_count = [0]


def model_version() -> int:
    """The number of module changes so far in this process (only its equality matters)."""
    return _count[0]


class Versioned(nn.Module):
    def __setattr__(self, name, value) -> None:
        _count[0] += 1
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        _count[0] += 1
        return super()._apply(fn, recurse)
