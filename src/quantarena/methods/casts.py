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
register(Method("fp32", "float32 weights and compute (the reference)", _cast_to(torch.float32), cache_checkpoint=False))
register(Method("fp16", "float16 weights and compute", _cast_to(torch.float16), cache_checkpoint=False))
register(Method("bf16", "bfloat16 weights and compute", _cast_to(torch.bfloat16), cache_checkpoint=False))
