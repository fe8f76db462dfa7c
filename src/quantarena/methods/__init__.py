"""Quantization methods. Each backend module registers its methods on import."""

# Registration. The peer backends (bnb, hqq, quanto, torchao) import their libraries only when used.
from quantarena.methods import (  # noqa: F401
    bnb,
    casts,
    fp4,
    gguf,
    hqq,
    inductor_int8,
    llamacpp,
    llmcompressor,
    own,
    quanto,
    torch_dynamic,
    torchao,
)
from quantarena.methods.base import (
    METHODS,
    Method,
    MethodConfig,
    Requirements,
    WeightQuantConfig,
    quantize_with_calibration,
)

__all__ = ["METHODS", "Method", "MethodConfig", "Requirements", "WeightQuantConfig", "quantize_with_calibration"]
