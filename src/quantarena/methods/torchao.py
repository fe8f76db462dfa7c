"""torchao: ``quantize_`` with its inference configs; weights become torchao tensor subclasses.

* ``torchao-int8-wo``: int8 weight-only, per output channel.
* ``torchao-int8-dq``: int8 weights plus int8 activations quantized per token at run time.
* ``torchao-float8-wo``: float8 (e4m3) weight-only, per output channel.
* ``torchao-int4-wo``: int4 weight-only, group-wise, tinygemm layout (``tile_packed_to_4d``): CUDA
  with compute capability >= 8.0 only, and bf16 (the model is cast to bf16 first, as torchao's
  recipe does). The default ``plain`` layout needs the separate ``mslk`` package on any device;
  neither has a CPU kernel (on CPU torchao raises "Torch not compiled with CUDA enabled").
* ``torchao-intx4``: the CPU stand-in, ``IntxWeightOnlyConfig`` int4 group-wise. Its default layout
  keeps each int4 value unpacked in an int8, so its true bytes are those of int8 plus group scales:
  the bytes column shows it.

Group-wise methods leave a Linear whose input width is not a multiple of ``group_size`` in float.

Saved as safetensors through torchao's own (prototype) flattening, which writes each subclass as
its inner tensors plus JSON metadata; reload rebuilds them. Tied tensors are stored once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from pydantic import PositiveInt
from torch import nn

from quantarena.methods.base import (
    BACKENDS_EXTRA,
    Method,
    Requirements,
    WeightQuantConfig,
    empty_model,
    finish_loaded,
    module_matches,
    register,
)

WEIGHTS_FILE = "model.safetensors"


class TorchaoConfig(WeightQuantConfig):
    pass


class TorchaoGroupConfig(WeightQuantConfig):
    # 64 divides the widths of SmolLM2 (576, 1536) and MiniLM (384); torchao's default 128 does not.
    group_size: PositiveInt = 64


def _ao_config(name: str, config: WeightQuantConfig):
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup

    if name == "int8-wo":
        return Int8WeightOnlyConfig()
    if name == "int8-dq":
        return Int8DynamicActivationInt8WeightConfig()
    if name == "float8-wo":
        return Float8WeightOnlyConfig()
    if name == "int4-wo":
        return Int4WeightOnlyConfig(group_size=config.group_size, int4_packing_format="tile_packed_to_4d")
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(config.group_size))


def _quantize(name: str):
    def apply(model: nn.Module, config: WeightQuantConfig) -> nn.Module:
        from torchao.quantization import quantize_

        group = getattr(config, "group_size", 1)

        def wanted(module: nn.Module, fqn: str) -> bool:
            # A width that is not a multiple of the group stays in float, as torchao's int4 config does itself.
            return (
                type(module) is nn.Linear
                and module.in_features % group == 0
                and not module_matches(fqn, config.skip_modules)
            )

        if name == "int4-wo":
            # tinygemm takes bf16 weights and activations only. Parameters only: computed buffers (rotary
            # frequencies) stay fp32, as from_pretrained(dtype=bf16) and load_torchao leave them.
            for param in model.parameters():
                param.data = param.data.to(torch.bfloat16)
            model.config.dtype = torch.bfloat16
        quantize_(model, _ao_config(name, config), filter_fn=wanted)
        return model

    return apply


def _stored_once(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the second name of a tied plain tensor (safetensors refuses shared storage); reload re-ties."""
    seen, out = set(), {}
    for key, t in state.items():
        if type(t) is torch.Tensor:
            ident = (t.data_ptr(), t.shape, t.stride())
            if ident in seen:
                continue
            seen.add(ident)
        out[key] = t
    return out


def save_torchao(model: nn.Module, out_dir: Path) -> None:
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    tensors, metadata = flatten_tensor_state_dict(_stored_once(model.state_dict()))
    save_file(tensors, out_dir / WEIGHTS_FILE, metadata=metadata)


def load_torchao(model_dir: Path, device: str = "cpu") -> nn.Module:
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    with safe_open(model_dir / WEIGHTS_FILE, "pt") as f:
        metadata = f.metadata()
    state, _ = unflatten_tensor_state_dict(load_file(model_dir / WEIGHTS_FILE), metadata)
    model = empty_model(model_dir)
    model.load_state_dict(state, strict=False, assign=True)
    return finish_loaded(model, device)


ANY_DEVICE = Requirements(packages=("torchao",), install=BACKENDS_EXTRA)
_METHODS = {
    "int8-wo": ("int8 weight-only, per channel", TorchaoConfig, ANY_DEVICE),
    "int8-dq": ("int8 dynamic activations + int8 weights", TorchaoConfig, ANY_DEVICE),
    "float8-wo": ("float8 (e4m3) weight-only, per channel", TorchaoConfig, ANY_DEVICE),
    "int4-wo": (
        "int4 weight-only, group-wise, tinygemm kernel",
        TorchaoGroupConfig,
        replace(ANY_DEVICE, devices=("cuda",), min_compute_capability=(8, 0)),
    ),
    "intx4": (
        "int4 weight-only, group-wise (IntxWeightOnlyConfig; stored unpacked in int8)",
        TorchaoGroupConfig,
        ANY_DEVICE,
    ),
}
for _name, (_description, _config_cls, _requires) in _METHODS.items():
    register(
        Method(
            f"torchao-{_name}",
            f"torchao {_description}",
            _quantize(_name),
            _config_cls,
            requires=_requires,
            save=save_torchao,
            load=load_torchao,
        )
    )
