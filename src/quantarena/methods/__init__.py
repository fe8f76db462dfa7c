"""Quantization methods. Each backend module registers its methods on import."""

from quantarena.methods import casts, own, torch_dynamic  # noqa: F401  (registration)
from quantarena.methods.base import METHODS, Method, MethodConfig, Requirements, WeightQuantConfig

__all__ = ["METHODS", "Method", "MethodConfig", "Requirements", "WeightQuantConfig"]
