"""optimum-quanto: int8/int4/int2/float8 weights, optionally int8/float8 activations (calibrated), then frozen.

Activation scales are calibrated on a few sentences of SST-2's *train* split (see
``calibration.calibration_batches``), never on evaluation data.

Calibration is quanto's default (momentum 0.9, ``streamline=True``): streamlining keeps in float the
outputs of layers that only feed non-quantized ops (attention, the residual adds, SiLU), which
matters for LLMs: in a spot check on SmolLM2 the logits' relative error vs fp32 was ~0.9 with every
output quantized per tensor to int8 and ~0.5 streamlined. quanto does not write that choice to its
quantization map, so a plain ``requantize`` would quantize those outputs again and differ from the
measured model; the names of those layers are saved beside the map (``quanto_float_outputs.json``)
and their output quantization is removed again on reload.

Serialization is otherwise quanto's own: ``save_pretrained`` safetensors (quantized tensors as their
inner ``_data``/``_scale``/``_shift`` tensors) plus ``quanto_qmap.json``; reload rebuilds the empty
architecture and calls ``requantize`` with that map, as ``QuantizedModelForCausalLM`` does, but for
any model class (sequence classifiers too).

quanto's packed int4/int2 weights cannot run under ``torch.inference_mode`` (optimum-quanto issue
#304, closed as stale, still so in 0.2.7: transposing the weight subclass fails with "Cannot set
version_counter for inference tensor"), and the tasks evaluate in inference mode; those layers run
their forward in plain no-grad mode instead (``_outside_inference_mode``), on quantize and reload.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MethodType
from typing import Literal

import torch
from pydantic import PositiveInt
from torch import nn

from quantarena.methods.base import (
    BACKENDS_EXTRA,
    CalibrationSource,
    Method,
    Requirements,
    WeightQuantConfig,
    empty_model,
    finish_loaded,
    module_matches,
    register,
)

QMAP_FILE = "quanto_qmap.json"
FLOAT_OUTPUTS_FILE = "quanto_float_outputs.json"
QTYPES = {"int8": "qint8", "int4": "qint4", "int2": "qint2", "float8": "qfloat8"}


class QuantoConfig(WeightQuantConfig):
    activations: Literal["none", "int8", "float8"] = "none"
    # Sentences run through the model to set activation scales (only with activations).
    calibration_examples: PositiveInt = 32


def _quantize(weights: str):
    def apply(model: nn.Module, config: QuantoConfig) -> nn.Module:
        from optimum.quanto import freeze, quantize

        # quanto matches exclusions with fnmatch on full names; resolve our patterns to exact names.
        exclude = [name for name, _ in model.named_modules() if name and module_matches(name, config.skip_modules)]
        activations = None if config.activations == "none" else QTYPES[config.activations]
        quantize(model, weights=QTYPES[weights], activations=activations, exclude=exclude)
        freeze(model)  # weights become quantized tensors now; activation scales are set by calibrate
        _outside_inference_mode(model)
        return model.eval()

    return apply


def _forward_outside_inference_mode(self: nn.Module, *args, **kwargs):
    with torch.inference_mode(False), torch.no_grad():
        return type(self).forward(self, *args, **kwargs)


def _outside_inference_mode(model: nn.Module) -> None:
    """Layers with packed (int4/int2) weights run their forward outside inference mode (see the module doc)."""
    from optimum.quanto import QModuleMixin, WeightQBitsTensor

    for m in model.modules():
        if isinstance(m, QModuleMixin) and isinstance(m.weight, WeightQBitsTensor):
            m.forward = MethodType(_forward_outside_inference_mode, m)


def calibrate_quanto(model: nn.Module, config: QuantoConfig, calibration: CalibrationSource) -> nn.Module:
    if config.activations == "none":
        return model
    from optimum.quanto import Calibration

    with torch.no_grad(), Calibration():
        for batch in calibration(config.calibration_examples):
            model(**batch)
    return model


def float_outputs(model: nn.Module) -> list[str]:
    """Layers with quantized activations whose output quantization calibration removed (streamlining)."""
    from optimum.quanto import QModuleMixin

    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, QModuleMixin)
        and m.activation_qtype is not None
        # disable_output_quantization removes the hook but keeps its handle
        and m._quantize_hooks["output"].id not in m._forward_hooks
    ]


def save_quanto(model: nn.Module, out_dir: Path) -> None:
    from optimum.quanto import QModuleMixin, quantization_map

    out_dir.mkdir(parents=True, exist_ok=True)
    # A quantized embedding or head no longer shares its tensor with the other one.
    heads = (model.get_input_embeddings(), model.get_output_embeddings())
    if any(isinstance(m, QModuleMixin) for m in heads):
        model.config.tie_word_embeddings = False
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / QMAP_FILE).write_text(json.dumps(quantization_map(model), indent=1))
    (out_dir / FLOAT_OUTPUTS_FILE).write_text(json.dumps(float_outputs(model), indent=1))


def load_quanto(model_dir: Path, device: str = "cpu") -> nn.Module:
    from optimum.quanto import requantize
    from safetensors.torch import load_file

    model = empty_model(model_dir)
    qmap = json.loads((model_dir / QMAP_FILE).read_text())
    requantize(model, load_file(model_dir / "model.safetensors"), qmap, torch.device("cpu"))
    for name in json.loads((model_dir / FLOAT_OUTPUTS_FILE).read_text()):
        model.get_submodule(name).disable_output_quantization()
    _outside_inference_mode(model)
    return finish_loaded(model, device)


WEIGHT_LABELS = {
    "int8": "int8",
    "int4": "int4, groups of 128",
    "int2": "int2, groups of 128",
    "float8": "float8 (e4m3)",
}
for _weights, _label in WEIGHT_LABELS.items():
    register(
        Method(
            f"quanto-{_weights}",
            f"optimum-quanto {_label} weights; activations none/int8/float8 (calibrated)",
            _quantize(_weights),
            QuantoConfig,
            requires=Requirements(packages=("optimum.quanto",), install=BACKENDS_EXTRA),
            save=save_quanto,
            load=load_quanto,
            calibrate=calibrate_quanto,
        )
    )
