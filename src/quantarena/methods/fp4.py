"""MXFP4 and NVFP4 weights, simulated: the packed format stored exactly, dequantized for each matmul
(``quantarena.ownquant.fp4``), so the quality of FP4 shows before the hardware that computes in it."""

from __future__ import annotations

from torch import nn

from quantarena.methods.base import Method, WeightQuantConfig, register, replace_linears
from quantarena.methods.own import load_own, save_own
from quantarena.ownquant.fp4 import MXFP4, NVFP4, Fp4Format, Fp4WeightLinear

SIMULATED = (
    "simulated FP4: weights stored in the packed format (its true bytes), dequantized to float for every matmul; "
    "quality is the format's, speed is not FP4 hardware's"
)


def _quantizer(fmt: Fp4Format):
    def quantize(model: nn.Module, config: WeightQuantConfig) -> nn.Module:
        replace_linears(model, lambda linear: Fp4WeightLinear.from_linear(linear, fmt), config.skip_modules, True)
        return model

    return quantize


for fmt, what in (
    (MXFP4, "MXFP4 (OCP MX): E2M1 weights in blocks of 32 with a power-of-two E8M0 scale"),
    (NVFP4, "NVFP4: E2M1 weights in blocks of 16 with an FP8 E4M3 scale and one FP32 scale per tensor"),
):
    register(
        Method(
            f"{fmt.name}-sim",
            f"{what}; simulated (dequantized for the matmul)",
            _quantizer(fmt),
            WeightQuantConfig,
            save=save_own,
            load=load_own,
            caveat=SIMULATED,
        )
    )
