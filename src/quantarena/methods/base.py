"""What a quantization method is: a name, a typed config, what it needs, and how to apply, save and reload it."""

from __future__ import annotations

import fnmatch
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from quantarena import models
from quantarena.errors import ConfigError, ModelError
from quantarena.methods.calibration import CALIBRATION_DATASET, Calibration, CalibrationSource
from quantarena.registry import Registry

DEFAULT_SKIP_MODULES = ("lm_head", "classifier", "score")
# How the peer quantization libraries are installed (pyproject's ``backends`` extra).
BACKENDS_EXTRA = "pip install 'quantarena[backends]'"

ComputeDtype = Literal["fp32", "fp16", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def calibrates_on(self) -> str | None:
        """The dataset a calibrating method reads with these options (its digest keys the variant); None: none."""
        return CALIBRATION_DATASET


class WeightQuantConfig(MethodConfig):
    """Options shared by methods that quantize Linear weights.

    ``skip_modules`` keeps output heads in full precision by default: they are small next to the
    body for classifiers, tied to the embeddings in many LMs, and the most sensitive layer.
    """

    skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


class ExternalTool(Protocol):
    """Programs a method runs (``quantarena.llamacpp``): why they cannot run here, and their version."""

    NAME: str

    def unmet(self) -> str | None: ...

    def version(self) -> str: ...


@dataclass(frozen=True)
class Requirements:
    """What a method needs; ``unmet`` turns a missing piece into the reason a cell is skipped.

    ``packages`` are import names (``optimum.quanto``); their distribution versions key stored results.
    ``min_compute_capability`` applies on CUDA only (e.g. (8, 0) for kernels that need Ampere).
    ``install`` is the command that provides the packages, quoted in the reason when they are missing.
    ``tool``: programs outside Python the method runs; their version keys stored results too.
    """

    devices: tuple[str, ...] = ("cpu", "cuda")
    packages: tuple[str, ...] = ()
    min_compute_capability: tuple[int, int] | None = None
    install: str | None = None
    tool: ExternalTool | None = None

    def unmet(self, device: str) -> str | None:
        """Why this method cannot run on ``device`` here, or None if it can."""
        if device not in self.devices:
            return f"needs device {' or '.join(self.devices)}, sweep runs on {device}"
        missing = [p for p in self.packages if not _installed(p)]
        if missing:
            hint = f"; {self.install}" if self.install else ""
            return f"needs package {', '.join(missing)} (not installed{hint})"
        if self.tool is not None and self.tool.unmet():
            return self.tool.unmet()
        if device == "cuda" and self.min_compute_capability and torch.cuda.is_available():
            have = torch.cuda.get_device_capability()
            if have < self.min_compute_capability:
                need = ".".join(map(str, self.min_compute_capability))
                return f"needs CUDA compute capability >= {need}, this GPU has {have[0]}.{have[1]}"
        return None


def save_pretrained(model: nn.Module, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)


def auto_model_class(config: Any) -> type:
    """The transformers auto class a saved config belongs to (causal LM or sequence classifier)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kind = models.kind_of(config)
    if kind is None:
        raise ModelError(
            f"saved config has architectures {config.architectures}: neither a causal LM nor a sequence classifier"
        )
    return AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification


def load_pretrained(model_dir: Path, device: str = "cpu") -> nn.Module:
    """transformers' own loader; the dtype recorded in the config (what was saved) is what comes back."""
    from transformers import AutoConfig

    cls = auto_model_class(AutoConfig.from_pretrained(model_dir))
    return cls.from_pretrained(model_dir, dtype="auto", device_map=device).eval()


def load_cast(model_dir: Path, device: str = "cpu") -> nn.Module:
    """A dtype cast's checkpoint: ``from_pretrained`` leaves computed buffers (rotary frequencies) in fp32,
    while the cast that was measured (``model.to(dtype)``) cast them too; cast again so they match."""
    model = load_pretrained(model_dir, device)
    return model.to(model.dtype)


def deferred_to_calibrate(model: nn.Module, config: Any) -> nn.Module:
    """``apply`` of a method whose tool needs the tokenizer or calibration text, which only ``calibrate``
    receives: its whole work is done there."""
    return model


def require_causal_lm(method: str, model: nn.Module) -> None:
    if models.kind_of(model.config) != "causal-lm":
        raise ConfigError(f"{method} runs causal language models, not {model.config.architectures}")


def save_with_tokenizer(model: nn.Module, tokenizer: Any, folder: Path) -> Path:
    """A Hugging Face folder (safetensors, config, tokenizer): what tools run outside this process read."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def empty_model(model_dir: Path) -> nn.Module:
    """The architecture of a saved model without its weights: parameters on the meta device, buffers real.

    Non-persistent buffers (rotary frequencies) are not in checkpoints, so they must be built here.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        return auto_model_class(config).from_config(config)


def finish_loaded(model: nn.Module, device: str) -> nn.Module:
    """Re-tie embeddings (checkpoints store a tied tensor once), check nothing is left unloaded, evaluate mode."""
    if getattr(model.config, "tie_word_embeddings", False):
        # safetensors may have kept the tied tensor under the head's name; tie_weights copies the other way.
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
        if outputs is not None and inputs.weight.is_meta and not outputs.weight.is_meta:
            inputs.weight = outputs.weight
        model.tie_weights()
    unloaded = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if unloaded:
        raise ModelError(f"checkpoint is missing {len(unloaded)} tensors, e.g. {unloaded[0]}")
    return model.to(device).eval()


@dataclass(frozen=True)
class Method:
    """A quantization method. ``apply`` quantizes a loaded model in place; ``calibrate``, where given, then
        finishes it with a few batches of text (activation ranges); ``save``/``load`` round-trip it through the
        backend's own format. ``load`` None means the method has no loader (``reloader`` says what is used).
        ``cache_checkpoint`` False: sweeps keep no checkpoint of it, only its measured size (applying it again costs
        less than reloading a copy, or the copy is a pickle). ``pickled_checkpoint``: loading what ``save`` wrote
        unpickles it, which can run code from the folder, so a folder is loaded only when the user says they trust
        it. ``quantizes_layers`` False: a cast, which changes every layer's dtype and replaces none. ``caveat``: what
    its scores depend on beyond the weights, recorded with every result."""

    name: str
    description: str
    apply: Callable[[nn.Module, Any], nn.Module]
    config_cls: type[MethodConfig] = MethodConfig
    requires: Requirements = Requirements()
    save: Callable[[nn.Module, Path], None] = save_pretrained
    load: Callable[[Path, str], nn.Module] | None = None
    calibrate: Callable[[nn.Module, Any, CalibrationSource], nn.Module] | None = None
    cache_checkpoint: bool = True
    pickled_checkpoint: bool = False
    quantizes_layers: bool = True
    # What the method's numbers depend on beyond the weights (shown with its results in every report).
    caveat: str | None = None

    def quantize(self, model: nn.Module, config: Any, calibration: CalibrationSource) -> nn.Module:
        model = self.apply(model, config)
        if self.calibrate is not None:
            model = self.calibrate(model, config, calibration)
        return model

    @property
    def reloader(self) -> Callable[[Path, str], nn.Module] | None:
        """The loader for what ``save`` wrote: ``load``, or for plain save_pretrained checkpoints (the dtype
        casts) transformers' own, cast again."""
        if self.load is not None:
            return self.load
        return load_cast if self.save is save_pretrained else None


METHODS: Registry[Method] = Registry("method")


def quantize_with_calibration(
    method: Method, config: MethodConfig, model: nn.Module, tokenizer: Any, data_dir: Path, device: torch.device
) -> nn.Module:
    """Apply ``method`` to a loaded float model; calibrating methods get their batches from a training split of
    the data dir (never an evaluated one), tokenized by the model's tokenizer, on its device."""
    with torch.no_grad():
        return method.quantize(model, config, Calibration(tokenizer, data_dir, device))


def register(method: Method) -> Method:
    return METHODS.register(method.name, method)


def module_matches(name: str, patterns: tuple[str, ...]) -> bool:
    """A pattern matches a module by full name, by a dotted prefix or suffix, or as a glob."""
    return any(
        name == p or name.startswith(p + ".") or name.endswith("." + p) or fnmatch.fnmatchcase(name, p)
        for p in patterns
    )


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections): a Linear whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor)


def as_linear(conv1d: nn.Module) -> nn.Linear:
    """The nn.Linear that computes what a ``Conv1D`` does (its weight transposed to (out, in))."""
    n_in, n_out = conv1d.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv1d.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv1d.weight.detach().t().contiguous(), requires_grad=False)
    if conv1d.bias is not None:
        linear.bias = nn.Parameter(conv1d.bias.detach().clone(), requires_grad=False)
    return linear.train(conv1d.training)


def linear_targets(
    model: nn.Module, skip_modules: tuple[str, ...], conv1d: bool = False
) -> list[tuple[str, nn.Module]]:
    """The nn.Linear layers (and with ``conv1d`` transformers' Conv1D ones) not matched by ``skip_modules``."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if (type(module) is nn.Linear or (conv1d and is_conv1d(module))) and not module_matches(name, skip_modules)
    ]


def replace_linears(
    model: nn.Module,
    make: Callable[[nn.Linear], nn.Module],
    skip_modules: tuple[str, ...],
    conv1d: bool = False,
) -> int:
    """Replace every nn.Linear not matched by ``skip_modules`` with ``make(linear)``; returns the count.

    ``conv1d``: transformers' ``Conv1D`` layers too, handed to ``make`` as the equivalent nn.Linear (for
    formats whose saved layout does not depend on the layer it came from)."""
    targets = linear_targets(model, skip_modules, conv1d)
    for name, layer in targets:
        with torch.no_grad():
            new = make(layer if type(layer) is nn.Linear else as_linear(layer))
        # New modules start in training mode; some backends (bnb int8, quanto) compute differently there.
        model.set_submodule(name, new.train(layer.training))
    return len(targets)


def linear_layers(model: nn.Module) -> dict[str, tuple[type, int]]:
    """The layers a weight quantizer can replace (nn.Linear, transformers' Conv1D): class and weight bytes."""
    return {
        name: (type(m), m.weight.numel() * m.weight.element_size())
        for name, m in model.named_modules()
        if type(m) is nn.Linear or is_conv1d(m)
    }


def coverage(before: dict[str, tuple[type, int]], model: nn.Module, float_bytes: int) -> dict[str, Any]:
    """How much of a model a method quantized: the layers of ``before`` that are gone, replaced, or hold a
    weight that is no longer a plain float tensor, and the share of the float model's bytes they held."""
    quantized_bytes, count = 0, 0
    for name, (cls, nbytes) in before.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:  # the whole model became something else (a compiled graph)
            module = None
        weight = getattr(module, "weight", None)
        plain = type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point()
        if type(module) is not cls or not plain:
            quantized_bytes, count = quantized_bytes + nbytes, count + 1
    return {
        "quantized_layers": count,
        "linear_layers": len(before),
        "quantized_weight_share": quantized_bytes / float_bytes if float_bytes else 0.0,
    }


def nothing_quantized(method: str, before: dict[str, tuple[type, int]]) -> str:
    """Why a method that quantized no layer is skipped: which layers the model has."""
    kinds: dict[str, int] = {}
    for cls, _ in before.values():
        kinds[cls.__name__] = kinds.get(cls.__name__, 0) + 1
    found = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "no Linear or Conv1D layer"
    return (
        f"{method} quantized no layer of this model ({found}: none of a kind it handles, or all in skip_modules); "
        "its numbers would be the float model's"
    )
