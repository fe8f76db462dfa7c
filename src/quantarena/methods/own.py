"""The project's own weight-only quantizers (formats and kernels in ``quantarena.ownquant``)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Literal, get_args

import torch
from pydantic import Field, PositiveInt
from safetensors.torch import load_file, save_model
from torch import nn

from quantarena import models
from quantarena.errors import ConfigError, ModelError
from quantarena.methods.base import (
    Method,
    Requirements,
    WeightQuantConfig,
    as_linear,
    empty_model,
    finish_loaded,
    linear_targets,
    register,
    replace_linears,
)
from quantarena.methods.calibration import CalibrationOptions, CalibrationSource
from quantarena.ownquant import (
    Int4WeightLinear,
    Int8WeightLinear,
    QuantizedEmbedding,
    TiedEmbedding,
    WeightOnlyLinear,
    use_triton_kernels,
)
from quantarena.ownquant.algorithms import INT8_CHANNEL, Algorithm, Grid, calibrated_linear, int4_grid
from quantarena.ownquant.awq import check_awq, fold_awq
from quantarena.ownquant.cpu import Int8CpuLinear, use_cpu_kernels, use_float_gemv
from quantarena.ownquant.fp4 import FORMATS as FP4_FORMATS
from quantarena.ownquant.fp4 import Fp4WeightLinear
from quantarena.ownquant.ggml import TYPES as GGUF_TYPES
from quantarena.ownquant.ggml import GgufWeightLinear
from quantarena.ownquant.sequential import replace_calibrated

OWN_FORMAT_FILE = "quantarena_quant.json"
# Where a quantized model keeps the kernel choice, so that saving records it and a reload makes the same one.
KERNEL_ATTR = "quantarena_kernel"

Kernel = Literal["auto", "torch-packed", "pytorch"]


class OwnQuantConfig(WeightQuantConfig, CalibrationOptions):
    # auto: the Triton kernels on CUDA; on the CPU the own AVX2 kernels, else PyTorch's packed-weight kernels,
    # for every layer they fit; torch-packed: only PyTorch's kernels on the CPU (to compare); pytorch: the
    # portable dequantize-then-matmul path everywhere (the reference the kernels are tested against).
    kernel: Kernel = "auto"
    # int8: a language model's output head too, as own-int8 (per row), and an input embedding tied to it reads
    # the same codes. The tied float matrix is a small LM's largest (SmolLM2: 113 of own-int4's 180 MB), and
    # decoding reads all of it for every token. float: heads are left to skip_modules.
    head: Literal["float", "int8"] = "float"
    # How codes are chosen (ownquant.algorithms): rtn rounds to nearest and reads no data; clip searches each
    # group's range for the least output error on calibration text; gptq also spreads each column's rounding
    # error onto the columns not yet rounded (GPTQ), with act_order, damp, and ranges searched as clip's
    # unless gptq_clip is false (then min/max, as GPTQ's reference). awq: activation-aware scales folded into
    # the model first (ownquant.awq; Llama-family models), then the layers rounded by the algorithm.
    algorithm: Algorithm = "rtn"
    awq: bool = False
    act_order: bool = True
    damp: float = Field(0.01, gt=0, lt=1)
    gptq_clip: bool = True

    def calibrates_on(self) -> str | None:
        return self.calibration_dataset if self.calibrated else None

    @property
    def calibrated(self) -> bool:
        return self.algorithm != "rtn" or self.awq

    def grid(self) -> Grid:
        raise NotImplementedError

    def round_to_nearest(self, linear: nn.Linear) -> WeightOnlyLinear:
        raise NotImplementedError


class OwnInt8Config(OwnQuantConfig):
    def grid(self) -> Grid:
        return INT8_CHANNEL

    def round_to_nearest(self, linear: nn.Linear) -> WeightOnlyLinear:
        return Int8WeightLinear.from_linear(linear)


class OwnInt8CpuConfig(WeightQuantConfig):
    pass


class OwnInt4Config(OwnQuantConfig):
    # 64 as bitsandbytes' NF4 blocksize: on SmolLM2-135M it halves the perplexity loss of 128
    # for 0.28x the fp16 bytes instead of 0.27x.
    group_size: PositiveInt = 64

    def grid(self) -> Grid:
        return int4_grid(self.group_size)

    def round_to_nearest(self, linear: nn.Linear) -> WeightOnlyLinear:
        return Int4WeightLinear.from_linear(linear, self.group_size)


def use_kernels(model: nn.Module, kernel: Kernel) -> nn.Module:
    setattr(model, KERNEL_ATTR, kernel)
    if kernel != "pytorch":
        use_triton_kernels(model)
        use_cpu_kernels(model, own_kernels=kernel == "auto")
    if kernel == "auto":  # what stays float (the tied head) would otherwise read at one thread's bandwidth
        use_float_gemv(model)
    return model


def quantize_head(model: nn.Module) -> None:
    """The output head as own int8; a tied input embedding then reads the head's codes."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        raise ConfigError("head=int8 quantizes a language model's output head (an nn.Linear); this model has none")
    embedding = model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    quantized = Int8WeightLinear.from_linear(head)
    model.set_submodule(names[id(head)], quantized)
    if getattr(embedding, "weight", None) is head.weight:
        model.set_submodule(names[id(embedding)], TiedEmbedding(quantized, head.weight.dtype))
        model.config.tie_word_embeddings = False  # the modules share the codes themselves; nothing to re-tie


def quantize_own(model: nn.Module, config: OwnQuantConfig) -> nn.Module:
    """Round to nearest; the calibrated algorithms replace the layers in ``calibrate_own`` (they need text)."""
    if config.calibrated:
        return model
    replace_linears(model, config.round_to_nearest, config.skip_modules, conv1d=True)
    return _finish(model, config)


def calibrate_own(model: nn.Module, config: OwnQuantConfig, calibration: CalibrationSource) -> nn.Module:
    if not config.calibrated:
        return model
    context = models.context_length(model.config)
    if context is not None and config.calibration_seq_len > context:
        raise ConfigError(
            f"calibration_seq_len {config.calibration_seq_len} is longer than the model's context ({context})"
        )
    grid = config.grid()
    if config.awq:
        check_awq(model)
    options = {"damp": config.damp, "act_order": config.act_order, "gptq_clip": config.gptq_clip}

    def make(layer: nn.Module, hessian: torch.Tensor) -> WeightOnlyLinear:
        linear = layer if type(layer) is nn.Linear else as_linear(layer)
        return calibrated_linear(linear, hessian, grid, config.algorithm, **options).train(layer.training)

    targets = [name for name, _ in linear_targets(model, config.skip_modules, conv1d=True)]
    prepare = partial(fold_awq, grid=grid) if config.awq else None
    replace_calibrated(model, targets, calibration.sequences(config), make, prepare)
    return _finish(model, config)


def _finish(model: nn.Module, config: OwnQuantConfig) -> nn.Module:
    if config.head == "int8":
        quantize_head(model)
    return use_kernels(model, config.kernel)


def quantize_own_int8_cpu(model: nn.Module, config: OwnInt8CpuConfig) -> nn.Module:
    replace_linears(model, Int8CpuLinear.from_linear, config.skip_modules, conv1d=True)
    return model


# Checkpoints written before the tied embedding served every format named it after int8.
TIED_FORMATS = (TiedEmbedding.__name__, "Int8TiedEmbedding")


def save_own(model: nn.Module, out_dir: Path) -> None:
    """safetensors of the whole state (shared tensors stored once) plus a JSON map of quantized modules."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    save_model(model, str(out_dir / "model.safetensors"))
    modules = {
        name: {
            "format": getattr(m, "saved_format", type(m).__name__),
            "group_size": getattr(m, "group_size", None),
            "fp4": m.fmt.name if isinstance(m, Fp4WeightLinear) else None,
            "gguf_type": m.ggml_type.name if isinstance(m, GgufWeightLinear) else None,
            "in_features": m.in_features,
        }
        for name, m in model.named_modules()
        if isinstance(m, WeightOnlyLinear)
    }
    heads = {id(m): name for name, m in model.named_modules()}
    modules |= {
        name: {"format": TiedEmbedding.__name__, "head": heads[id(m._head[0])]}
        for name, m in model.named_modules()
        if isinstance(m, TiedEmbedding)
    }
    modules |= {
        name: {"format": QuantizedEmbedding.__name__}
        for name, m in model.named_modules()
        if isinstance(m, QuantizedEmbedding)
    }
    kernel = getattr(model, KERNEL_ATTR, "auto")
    (out_dir / OWN_FORMAT_FILE).write_text(json.dumps({"version": 1, "modules": modules, "kernel": kernel}, indent=1))


def _own_linear(spec: dict, tensors: dict[str, torch.Tensor], in_features: int) -> WeightOnlyLinear:
    """One saved quantized Linear, rebuilt from its tensors (``qweight``, ``scales``, [``mins``], [``tensor_scale``],
    [``bias``])."""
    bias = tensors.get("bias")
    if spec["format"] == Int8WeightLinear.__name__:
        return Int8WeightLinear(tensors["qweight"], tensors["scales"], bias)
    if spec["format"] == Int4WeightLinear.__name__:
        return Int4WeightLinear(
            tensors["qweight"], tensors["scales"], tensors["mins"], in_features, spec["group_size"], bias
        )
    if spec["format"] == Fp4WeightLinear.__name__ and spec.get("fp4") in FP4_FORMATS:
        fmt = FP4_FORMATS[spec["fp4"]]
        return Fp4WeightLinear(tensors["qweight"], tensors["scales"], tensors["tensor_scale"], in_features, fmt, bias)
    if spec["format"] == GgufWeightLinear.__name__ and spec.get("gguf_type") in GGUF_TYPES:
        return GgufWeightLinear(tensors["qweight"], in_features, GGUF_TYPES[spec["gguf_type"]], bias)
    raise ModelError(f"{OWN_FORMAT_FILE}: unknown module format {spec['format']!r}")


def load_own(model_dir: Path, device: str = "cpu") -> nn.Module:
    """The architecture from config.json, its quantized Linears from the JSON map, every tensor from safetensors."""
    qmap = json.loads((model_dir / OWN_FORMAT_FILE).read_text())
    kernel = qmap.get("kernel", "auto")
    if kernel not in get_args(Kernel):
        raise ModelError(f"{OWN_FORMAT_FILE}: unknown kernel {kernel!r}; valid: {', '.join(get_args(Kernel))}")
    state = load_file(model_dir / "model.safetensors")
    model = empty_model(model_dir)
    tied = {name: spec for name, spec in qmap["modules"].items() if spec.get("format") in TIED_FORMATS}
    embeddings = {name for name, spec in qmap["modules"].items() if spec.get("format") == QuantizedEmbedding.__name__}
    for name, spec in qmap["modules"].items():
        if name in tied or name in embeddings:
            continue
        prefix = f"{name}."
        tensors = {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        # in_features in the map: the layer it replaces may be a Conv1D, which names its widths otherwise.
        in_features = spec.get("in_features") or model.get_submodule(name).in_features
        layer = _own_linear(spec, tensors, in_features)
        parent, _, child = name.rpartition(".")
        if parent in embeddings and child == "rows":
            model.set_submodule(parent, QuantizedEmbedding(layer))
        else:
            model.set_submodule(name, layer)
    for name, spec in tied.items():
        head_name = spec.get("head")
        head = qmap["modules"].get(head_name) if isinstance(head_name, str) else None
        if not isinstance(head, dict) or head_name in tied:
            raise ModelError(f"{OWN_FORMAT_FILE}: {name} is tied to {head_name!r}, which is no quantized head")
        model.set_submodule(name, TiedEmbedding(model.get_submodule(head_name)))
    model.load_state_dict(state, strict=False, assign=True)
    model = finish_loaded(model, device)
    return use_kernels(model, kernel)


def load_own_int8_cpu(model_dir: Path, device: str = "cpu") -> nn.Module:
    """The own-int8 checkpoint (own-int8-cpu saves exactly that format), its linears handed to FBGEMM again."""
    model = load_own(model_dir, device)
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8WeightLinear):
            model.set_submodule(name, Int8CpuLinear.from_own(module))
    return model


register(
    Method(
        "own-int8",
        "quantarena int8 weight-only, per-channel symmetric; rounded to nearest, or calibrated: clip, gptq, awq",
        quantize_own,
        OwnInt8Config,
        calibrate=calibrate_own,
        save=save_own,
        load=load_own,
    )
)
register(
    Method(
        "own-int8-cpu",
        "quantarena int8 per-channel weights (own-int8's format), int8 x int8 on the CPU: FBGEMM with "
        "activations quantized per call",
        quantize_own_int8_cpu,
        OwnInt8CpuConfig,
        requires=Requirements(devices=("cpu",)),
        save=save_own,
        load=load_own_int8_cpu,
    )
)
register(
    Method(
        "own-int4",
        "quantarena int4 weight-only, group-wise asymmetric, packed two per byte, fp16 scales; rounded to nearest, "
        "or calibrated: clip, gptq, awq",
        quantize_own,
        OwnInt4Config,
        calibrate=calibrate_own,
        save=save_own,
        load=load_own,
    )
)
