"""Plain dtype casts: the fp32 reference and the half-precision baselines every sweep wants."""

import torch
from torch import nn

from quantarena.methods.base import Method, register


def _cast_to(dtype: torch.dtype):
    def apply(model: nn.Module, config: object) -> nn.Module:
        return model.to(dtype)

    return apply


register(Method("fp32", "float32 weights and compute (the reference)", _cast_to(torch.float32)))
register(Method("fp16", "float16 weights and compute", _cast_to(torch.float16)))
register(Method("bf16", "bfloat16 weights and compute", _cast_to(torch.bfloat16)))
