"""llama.cpp's legacy GGUF types (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0) through ggml's reference quantizers in the
``gguf`` package, held as the bytes a GGUF file stores and dequantized for each matmul in PyTorch, so they are
scored by the same tasks as every other method (``quantarena.ownquant.ggml``). llama.cpp quantizes token
embeddings and output heads too; here they follow ``skip_modules`` like every weight method."""

from __future__ import annotations

from torch import nn

from quantarena.methods.base import Method, Requirements, WeightQuantConfig, register, replace_linears
from quantarena.methods.own import load_own, save_own
from quantarena.ownquant.ggml import LEGACY, TYPES, GgmlType, GgufWeightLinear

SPEED = "GGUF blocks dequantized in PyTorch for each matmul: quality and bytes are llama.cpp's, speed is not"


def _quantizer(ggml_type: GgmlType):
    def quantize(model: nn.Module, config: WeightQuantConfig) -> nn.Module:
        def make(linear: nn.Linear) -> nn.Module:
            if linear.in_features % 32:
                return linear  # llama.cpp too keeps a row it cannot block in a wider type
            return GgufWeightLinear.from_linear(linear, ggml_type)

        replace_linears(model, make, config.skip_modules, conv1d=True)
        return model

    return quantize


for ggml_type in (TYPES[name] for name in LEGACY):
    register(
        Method(
            f"gguf-{ggml_type.name}",
            f"llama.cpp GGUF {ggml_type.name.upper()} (blocks of 32, ggml's reference quantizer via the gguf "
            "package), dequantized in PyTorch",
            _quantizer(ggml_type),
            WeightQuantConfig,
            requires=Requirements(packages=("gguf",), install="pip install gguf"),
            save=save_own,
            load=load_own,
            caveat=SPEED,
        )
    )
