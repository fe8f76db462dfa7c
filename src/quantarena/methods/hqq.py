"""HQQ (half-quadratic quantization) through its native API: ``HQQLinear`` with ``BaseQuantizeConfig``.

Calibration-free: each group's zero point and scale are optimized against the weights alone. Runs
on the CPU with HQQ's PyTorch backend (its fused kernels are CUDA-only). As HQQ's own model
patcher does, the rest of the model is cast to the compute dtype, so quantized and unquantized
layers compute in one dtype. Group scales and zeros are kept in the compute dtype (HQQ's default,
no meta quantization).

Saved and reloaded with HQQ's ``AutoHQQHFModel.save_quantized`` / ``from_quantized`` (config.json plus
``qmodel.pt``, a weights-only torch checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import PositiveInt
from torch import nn

from quantarena.methods.base import (
    BACKENDS_EXTRA,
    DTYPES,
    ComputeDtype,
    Method,
    Requirements,
    WeightQuantConfig,
    finish_loaded,
    register,
    replace_linears,
)


class HqqConfig(WeightQuantConfig):
    group_size: PositiveInt = 64
    compute_dtype: ComputeDtype = "fp32"


def _quantize(nbits: int):
    def apply(model: nn.Module, config: HqqConfig) -> nn.Module:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        dtype = DTYPES[config.compute_dtype]
        quant_config = BaseQuantizeConfig(nbits=nbits, group_size=config.group_size)
        model.to(dtype)
        model.config.dtype = dtype  # recorded in the saved config: reload casts to it again
        replace_linears(
            model,
            lambda lin: HQQLinear(lin, quant_config, compute_dtype=dtype, device=lin.weight.device, del_orig=True),
            config.skip_modules,
        )
        return model

    return apply


def save_hqq(model: nn.Module, out_dir: Path) -> None:
    from hqq.models.hf.base import AutoHQQHFModel

    out_dir.mkdir(parents=True, exist_ok=True)
    AutoHQQHFModel.save_quantized(model, str(out_dir))


def load_hqq(model_dir: Path, device: str = "cpu") -> nn.Module:
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoConfig

    dtype = AutoConfig.from_pretrained(model_dir).dtype
    model = AutoHQQHFModel.from_quantized(str(model_dir), compute_dtype=dtype, device=device)
    return finish_loaded(model, device)


for _nbits in (8, 4, 3, 2):
    register(
        Method(
            f"hqq-int{_nbits}",
            f"HQQ {_nbits}-bit weights, group-wise (group_size, default 64), PyTorch backend",
            _quantize(_nbits),
            HqqConfig,
            requires=Requirements(packages=("hqq",), install=BACKENDS_EXTRA),
            save=save_hqq,
            load=load_hqq,
        )
    )
