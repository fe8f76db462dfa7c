"""What a quantization method is: a name, a typed config, what it needs, and how to apply, save and reload it."""

from __future__ import annotations

import fnmatch
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from quantarena.errors import ModelError
from quantarena.methods.calibration import CalibrationSource, calibration_batches
from quantarena.registry import Registry

DEFAULT_SKIP_MODULES = ("lm_head", "classifier", "score")
# How the peer quantization libraries are installed (pyproject's ``backends`` extra).
BACKENDS_EXTRA = "pip install 'quantarena[backends]'"

ComputeDtype = Literal["fp32", "fp16", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


@dataclass(frozen=True)
class Requirements:
    """What a method needs; ``unmet`` turns a missing piece into the reason a cell is skipped.

    ``packages`` are import names (``optimum.quanto``); their distribution versions key stored results.
    ``min_compute_capability`` applies on CUDA only (e.g. (8, 0) for kernels that need Ampere).
    ``install`` is the command that provides the packages, quoted in the reason when they are missing.
    """

    devices: tuple[str, ...] = ("cpu", "cuda")
    packages: tuple[str, ...] = ()
    min_compute_capability: tuple[int, int] | None = None
    install: str | None = None

    def unmet(self, device: str) -> str | None:
        """Why this method cannot run on ``device`` here, or None if it can."""
        if device not in self.devices:
            return f"needs device {' or '.join(self.devices)}, sweep runs on {device}"
        missing = [p for p in self.packages if not _installed(p)]
        if missing:
            hint = f"; {self.install}" if self.install else ""
            return f"needs package {', '.join(missing)} (not installed{hint})"
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

    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return AutoModelForSequenceClassification
    if any(a.endswith("ForCausalLM") for a in architectures):
        return AutoModelForCausalLM
    raise ModelError(f"saved config has architectures {architectures}: neither a causal LM nor a sequence classifier")


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
    ``cache_checkpoint`` False: applying it again costs less than reloading a saved copy (a dtype cast), so
    sweeps keep no checkpoint of it, only its measured size."""

    name: str
    description: str
    apply: Callable[[nn.Module, Any], nn.Module]
    config_cls: type[MethodConfig] = MethodConfig
    requires: Requirements = Requirements()
    save: Callable[[nn.Module, Path], None] = save_pretrained
    load: Callable[[Path, str], nn.Module] | None = None
    calibrate: Callable[[nn.Module, Any, CalibrationSource], nn.Module] | None = None
    cache_checkpoint: bool = True

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
    calibration = partial(calibration_batches, tokenizer, data_dir, device)
    with torch.no_grad():
        return method.quantize(model, config, calibration)


def register(method: Method) -> Method:
    return METHODS.register(method.name, method)


def module_matches(name: str, patterns: tuple[str, ...]) -> bool:
    """A pattern matches a module by full name, by a dotted prefix or suffix, or as a glob."""
    return any(
        name == p or name.startswith(p + ".") or name.endswith("." + p) or fnmatch.fnmatchcase(name, p)
        for p in patterns
    )


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module], skip_modules: tuple[str, ...]) -> int:
    """Replace every nn.Linear not matched by ``skip_modules`` with ``make(linear)``; returns the count."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not module_matches(name, skip_modules)
    ]
    for name, linear in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            new = make(linear)
        # New modules start in training mode; some backends (bnb int8, quanto) compute differently there.
        setattr(parent, child_name, new.train(linear.training))
    return len(targets)
