"""Plain dtype casts: the fp32 reference and the half-precision baselines every sweep wants."""

import torch
from torch import nn

from quantarena.methods.base import Method, register


def _cast_to(dtype: torch.dtype):
    def apply(model: nn.Module, config: object) -> nn.Module:
        return model.to(dtype)

    return apply


# Half kernels (oneDNN's AVX512-BF16/AMX/FP16 on CPUs, cuBLAS on GPUs) pick their blocking, hence their summation
# order, by matrix shape, and each layer's output is rounded to 16 bits, so the order shows: measured on SmolLM2 with
# oneDNN's bf16 (Xeon with AMX), ARC-Easy log-probabilities moved up to 0.37 nats between batch sizes 1 and 8 and
# one answer of 15 changed. (quantarena.halfgemm, used where a CPU has no such kernels, sums in a fixed order.)
HALF = (
    "half-precision kernels sum in an order that depends on the matrix shapes and round every layer to 16 bits, so "
    "scores shift with batching (SmolLM2 bf16: up to 0.37 nats per answer between batch sizes 1 and 8); compare "
    "answer-level results with other harnesses at the same batching only"
)

# A cast is applied again in each sweep: reloading a cached copy would cost as much as loading the model, and
# an fp32 copy of an 8B model is 32 GB of disk.
for _name, _dtype, _what, _caveat in (
    ("fp32", torch.float32, "float32 weights and compute (the reference)", None),
    ("fp16", torch.float16, "float16 weights and compute", HALF),
    ("bf16", torch.bfloat16, "bfloat16 weights and compute", HALF),
):
    register(Method(_name, _what, _cast_to(_dtype), cache_checkpoint=False, quantizes_layers=False, caveat=_caveat))
