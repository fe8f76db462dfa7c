"""Plain dtype casts: the fp32 reference and the half-precision baselines every sweep wants."""

import torch
from torch import nn

from quantarena.methods.base import Method, register


def _cast_to(dtype: torch.dtype):
    def apply(model: nn.Module, config: object) -> nn.Module:
        return model.to(dtype)

    return apply


# A cast is applied again in each sweep: reloading a cached copy would cost as much as loading the model, and
# an fp32 copy of an 8B model is 32 GB of disk.
for _name, _dtype, _what in (
    ("fp32", torch.float32, "float32 weights and compute (the reference)"),
    ("fp16", torch.float16, "float16 weights and compute"),
    ("bf16", torch.bfloat16, "bfloat16 weights and compute"),
):
    register(Method(_name, _what, _cast_to(_dtype), cache_checkpoint=False, quantizes_layers=False))
