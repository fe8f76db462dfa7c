"""The project's own weight-only formats and their kernels: the formats in plain PyTorch (``formats``), Triton
GEMV/GEMM kernels for CUDA (``triton_kernels``, selected by ``kernels``) and int8 on the CPU through FBGEMM
(``cpu``)."""

from quantarena.ownquant.formats import (
    Int4WeightLinear,
    Int8WeightLinear,
    QuantizedEmbedding,
    TiedEmbedding,
    WeightOnlyLinear,
)
from quantarena.ownquant.kernels import kernel_summary, use_triton_kernels

__all__ = [
    "Int4WeightLinear",
    "Int8WeightLinear",
    "QuantizedEmbedding",
    "TiedEmbedding",
    "WeightOnlyLinear",
    "kernel_summary",
    "use_triton_kernels",
]
