"""PyTorch's built-in dynamic int8 quantization of Linear layers (FBGEMM/oneDNN, CPU only)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from quantarena.methods.base import (
    Method,
    Requirements,
    WeightQuantConfig,
    module_matches,
    register,
)


class TorchDynamicInt8Config(WeightQuantConfig):
    pass


def quantize_torch_dynamic(model: nn.Module, config: TorchDynamicInt8Config) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    # By name rather than by type, so skip_modules keeps the heads in float.
    spec = {
        name: default_dynamic_qconfig
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not module_matches(name, config.skip_modules)
    }
    # torch.ao announces its own deprecation on every call; it is still the API users run.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return quantize_dynamic(model.float(), spec, dtype=torch.qint8, inplace=True)


def save_state_dict(model: nn.Module, out_dir: Path) -> None:
    # Packed FBGEMM weights are script objects, which safetensors cannot hold.
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "model.pt")


register(
    Method(
        "torch-dynamic-int8",
        "torch.ao dynamic int8 Linear (int8 weights, activations quantized per batch), CPU",
        quantize_torch_dynamic,
        TorchDynamicInt8Config,
        requires=Requirements(devices=("cpu",)),
        save=save_state_dict,
    )
)
