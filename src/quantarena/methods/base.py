"""What a quantization method is: a name, a typed config, what it needs, and how to apply/save it."""

from __future__ import annotations

import fnmatch
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from quantarena.registry import Registry

DEFAULT_SKIP_MODULES = ("lm_head", "classifier", "score")


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightQuantConfig(MethodConfig):
    """Options shared by methods that quantize Linear weights.

    ``skip_modules`` keeps output heads in full precision by default: they are small next to the
    body for classifiers, tied to the embeddings in many LMs, and the most sensitive layer.
    """

    skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES


@dataclass(frozen=True)
class Requirements:
    devices: tuple[str, ...] = ("cpu", "cuda")
    packages: tuple[str, ...] = ()

    def unmet(self, device: str) -> str | None:
        """Why this method cannot run on ``device`` here, or None if it can."""
        if device not in self.devices:
            return f"needs device {' or '.join(self.devices)}, sweep runs on {device}"
        missing = [p for p in self.packages if importlib.util.find_spec(p) is None]
        if missing:
            return f"needs package {', '.join(missing)} (not installed)"
        return None


def save_pretrained(model: nn.Module, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    apply: Callable[[nn.Module, Any], nn.Module]
    config_cls: type[MethodConfig] = MethodConfig
    requires: Requirements = Requirements()
    save: Callable[[nn.Module, Path], None] = save_pretrained


METHODS: Registry[Method] = Registry("method")


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
            setattr(parent, child_name, make(linear))
    return len(targets)
