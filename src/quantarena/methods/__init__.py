"""Quantization methods. Each backend module registers its methods on import."""

# Registration. The peer backends (bnb, hqq, quanto, torchao) import their libraries only when used.
from quantarena.methods import bnb, casts, fp4, gguf, hqq, inductor_int8, own, quanto, torch_dynamic, torchao  # noqa: F401
from quantarena.methods.base import (
    METHODS,
    Method,
    MethodConfig,
    Requirements,
    WeightQuantConfig,
    quantize_with_calibration,
)

__all__ = ["METHODS", "Method", "MethodConfig", "Requirements", "WeightQuantConfig", "quantize_with_calibration"]
