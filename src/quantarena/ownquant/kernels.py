"""Which forward the own int8/int4 linears run: the Triton kernels on CUDA, else the portable PyTorch path.

Importing this module never needs triton or CUDA: the kernels module is imported on first use.
"""

from __future__ import annotations

import importlib.util
import types

import torch
from torch import nn

from quantarena.ownquant.formats import Int4WeightLinear, Int8WeightLinear, WeightOnlyLinear

__all__ = [
    "int4_linear",
    "int8_linear",
    "kernel_summary",
    "kernels_available",
    "unavailable_reason",
    "use_triton_kernels",
]


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (default: the current CUDA device), or None if they can."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"Triton kernels need a CUDA device, the model is on {device.type}"
    if not _triton_importable():
        return "Triton kernels need the triton package (pip install 'quantarena[kernels]')"
    return None


def kernels_available(device: torch.device | str | None = None) -> bool:
    """True when the Triton kernels can run on ``device`` (default: the current CUDA device)."""
    return unavailable_reason(device) is None


def int8_linear(*args, **kwargs) -> torch.Tensor:
    from quantarena.ownquant.triton_kernels import int8_linear as impl

    return impl(*args, **kwargs)


def int4_linear(*args, **kwargs) -> torch.Tensor:
    from quantarena.ownquant.triton_kernels import int4_linear as impl

    return impl(*args, **kwargs)


def _int8_forward(self: Int8WeightLinear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.quantarena.int8_linear(x, self.qweight, self.scales, self.bias)


def _int4_forward(self: Int4WeightLinear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.quantarena.int4_linear(x, self.qweight, self.scales, self.mins, self.group_size, self.bias)


def use_triton_kernels(model: nn.Module, *, interpret: bool = False) -> int:
    """Route the forward of every own int8/int4 linear in ``model`` through the Triton kernels.

    Returns how many modules now use them (0 where the kernels cannot run). The class is left
    alone (saving code keys on it); the forward and ``kernel`` become instance attributes, so
    ``kernel`` reports "triton" for exactly the modules that switched. ``interpret`` switches CPU
    modules too, for tests whose process imported the kernels under ``TRITON_INTERPRET=1``.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, (Int8WeightLinear, Int4WeightLinear)):
            continue
        if not (interpret or kernels_available(module.qweight.device)):
            continue
        import quantarena.ownquant.triton_kernels  # noqa: F401  (registers the torch ops)

        forward = _int8_forward if isinstance(module, Int8WeightLinear) else _int4_forward
        module.forward = types.MethodType(forward, module)
        module.kernel = "triton"
        count += 1
    return count


def kernel_summary(model: nn.Module) -> dict[str, int]:
    """How many own quantized linears run each forward path, e.g. ``{"triton": 112}`` or ``{"pytorch": 30}``."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, WeightOnlyLinear):
            counts[module.kernel] = counts.get(module.kernel, 0) + 1
    return counts
