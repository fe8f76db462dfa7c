"""Static int8 for encoder classifiers on x86 CPUs: torch.export, torchao's X86InductorQuantizer, Inductor.

Weights are int8 per output channel (symmetric), activations uint8 per tensor with ranges calibrated
on SST-2 *train* sentences (never the evaluated data). Inductor's freezing then folds the int8 weights
into oneDNN's packed layout and fuses the quantize/dequantize steps, GELU and residual adds around the
int8 linears. That fusion is where the speed over own-int8-cpu comes from: on an AVX2 CPU an int8
GEMM alone is only 1.5-1.9x an fp32 one, and the dynamic path pays for per-call activation ranges and
unfused elementwise work besides.

The model becomes one exported graph taking the tokenizer's tensors and returning logits, so only
sequence classifiers are handled (the LM tasks pass position ids, 4D masks and cache options that a
fixed graph does not take). ``weight_bytes`` counts the quantized graph's tensors; Inductor's packed
copy of the int8 weights is held besides them and shows in peak RSS. The checkpoint is the quantized
graph as a ``torch.export`` program (``model.pt2``) beside the model config; loading compiles it again.
Loading a program unpickles it, so sweeps keep no cached copy (the variant is quantized in every run) and
``compare`` loads a folder only when told it is trusted.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import PositiveInt
from torch import nn

from quantarena.environment import cxx_compiler
from quantarena.errors import ModelError
from quantarena.methods.base import (
    BACKENDS_EXTRA,
    CalibrationSource,
    Method,
    MethodConfig,
    Requirements,
    register,
)

PROGRAM_FILE = "model.pt2"


class InductorInt8Config(MethodConfig):
    calibration_examples: PositiveInt = 128


class _Logits(nn.Module):
    """The graph's signature: tokenizer tensors in, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**inputs).logits


def _dynamic_shapes(inputs: dict[str, torch.Tensor], max_positions: int) -> dict:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=max_positions)
    return {"inputs": {name: {0: batch, 1: seq} for name in inputs}}


def _export(module: nn.Module, inputs: dict[str, torch.Tensor], max_positions: int) -> torch.export.ExportedProgram:
    # Not strict: transformers' Python (mask helpers, output dataclasses) is traced through, not analysed.
    return torch.export.export(
        module, (), {"inputs": inputs}, dynamic_shapes=_dynamic_shapes(inputs, max_positions), strict=False
    )


def _drop_unused_parameters(graph: torch.fx.GraphModule) -> None:
    """convert_pt2e leaves the float weights attached beside the int8 ones it folded in; they are dead."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in list(graph.named_parameters()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, attr)


def compile_frozen(module: nn.Module) -> Callable[..., Any]:
    """``module`` compiled by Inductor with dynamic shapes and freezing on (weights become constants it can
    pack and fuse). Compiling happens at a call, so every call runs under the freezing setting."""
    from torch._inductor import config as inductor_config

    compiled = torch.compile(module, dynamic=True)

    def call(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return call


class InductorInt8Classifier(nn.Module):
    """The quantized graph behind a transformers-like classifier interface (``config``, ``.logits``).

    Compiled lazily by Inductor with freezing on (the int8 weights become constants it can pack and
    fuse); shapes are dynamic, except that a batch of one compiles once more (dim-1 specialization).
    """

    def __init__(self, graph: torch.fx.GraphModule, config, example_inputs: dict[str, torch.Tensor]):
        super().__init__()
        self.graph = graph
        self.config = config
        self.input_names = tuple(example_inputs)
        self._example_inputs = example_inputs  # a plain attribute: kept for re-export, not a weight
        self._compiled = compile_frozen(graph)

    def forward(self, **inputs: torch.Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if set(inputs) != set(self.input_names):
            raise ModelError(f"inductor-int8 graph takes {list(self.input_names)}, got {sorted(inputs)}")
        # Always inference tensors, in inference mode: the compiled graph guards on both, and a caller's
        # tensors made outside inference mode would otherwise cost a whole second compile.
        with torch.inference_mode():
            canonical = {name: inputs[name].clone() for name in self.input_names}
            logits = self._compiled(inputs=canonical)
        return SequenceClassifierOutput(logits=logits)

    def warm_up(self) -> InductorInt8Classifier:
        """Compile now, for batches of several and of one (unbacked batch sizes would avoid the second
        compile but ran 1.6x slower): the compile time belongs to quantizing, not to the first timed batch."""
        with warnings.catch_warnings():
            # Inductor's oneDNN lowering copy-constructs the zero points, and says so at every int8 linear.
            warnings.filterwarnings("ignore", message="To copy construct from a tensor")
            self(**self._example_inputs)
            self(**{name: t[:1] for name, t in self._example_inputs.items()})
        return self

    def exported_program(self) -> torch.export.ExportedProgram:
        return _export(self.graph, self._example_inputs, self.config.max_position_embeddings)


def check_classifier(model: nn.Module, config: InductorInt8Config) -> nn.Module:
    names = [*(getattr(getattr(model, "config", None), "architectures", None) or []), type(model).__name__]
    if not any(name.endswith("ForSequenceClassification") for name in names):
        raise ModelError(f"inductor-int8 quantizes sequence classifiers only; this model is a {type(model).__name__}")
    if cxx_compiler() is None:
        raise ModelError("inductor-int8 needs a C++ compiler (g++) for Inductor's CPU kernels")
    return model


def quantize_static(model: nn.Module, config: InductorInt8Config, calibration: CalibrationSource) -> nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    batches = calibration(config.calibration_examples)
    example = {name: t.cpu() for name, t in batches[0].items()}
    graph = _export(_Logits(model.cpu().eval()), example, model.config.max_position_embeddings).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    observed = prepare_pt2e(graph, quantizer)
    for batch in batches:
        observed(inputs={name: t.cpu() for name, t in batch.items()})
    quantized = convert_pt2e(observed)
    _drop_unused_parameters(quantized)
    return InductorInt8Classifier(quantized, model.config, example).warm_up()


def save_program(model: InductorInt8Classifier, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.export.save(model.exported_program(), out_dir / PROGRAM_FILE)
    model.config.save_pretrained(out_dir)


def load_program(model_dir: Path, device: str = "cpu") -> nn.Module:
    from transformers import AutoConfig

    program = torch.export.load(Path(model_dir) / PROGRAM_FILE)
    _, example = program.example_inputs
    graph = program.module()
    return InductorInt8Classifier(graph, AutoConfig.from_pretrained(model_dir), example["inputs"]).warm_up()


register(
    Method(
        "inductor-int8",
        "int8 per-channel weights and calibrated static int8 activations for encoder classifiers on x86 "
        "CPUs: torch.export + torchao's X86InductorQuantizer, compiled by Inductor (oneDNN, fused ops)",
        check_classifier,
        InductorInt8Config,
        requires=Requirements(devices=("cpu",), packages=("torchao",), install=BACKENDS_EXTRA),
        save=save_program,
        load=load_program,
        calibrate=quantize_static,
        # torch.export.load unpickles: never reloaded from the cache, from a folder only when trusted.
        cache_checkpoint=False,
        pickled_checkpoint=True,
    )
)
