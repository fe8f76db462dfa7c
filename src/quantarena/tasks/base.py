"""What a task is: typed config, the model kind it needs, how to load its data and evaluate a model."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from quantarena import numerics
from quantarena.errors import ConfigError
from quantarena.models import ModelKind, ResolvedModel
from quantarena.registry import Registry

T = TypeVar("T")


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The first ``limit`` examples, or with ``limit_seed`` a random sample of that many (kept in dataset order).
    limit: PositiveInt | None = None
    limit_seed: int | None = None

    @model_validator(mode="after")
    def _seed_needs_limit(self):
        if self.limit_seed is not None and self.limit is None:
            raise ValueError("limit_seed draws a random sample of `limit` examples; set limit too")
        return self

    def select(self, items: Sequence[T]) -> list[T]:
        if self.limit is None or self.limit >= len(items):
            return list(items)
        if self.limit_seed is None:
            return list(items[: self.limit])
        return [items[i] for i in sorted(random.Random(self.limit_seed).sample(range(len(items)), self.limit))]


def _no_progress(done: int, total: int) -> None:
    pass


class ReferenceConfig(TaskConfig):
    """Options of a task that compares each variant with a reference variant of the same weights (by default
    the sweep's baseline: the config fills these in from it). The method's name and options are checked
    against the methods registry where the config is read."""

    reference_method: str = "fp32"
    reference_config: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Reference:
    """The reference variant of the evaluated one: what identifies it, and how to get it (loaded or quantized
    by the sweep, possibly from its checkpoint cache) when a task needs its outputs."""

    identity: dict[str, Any]  # model digest and method: equal identities give equal outputs
    load: Callable[[], torch.nn.Module]
    is_self: bool = False  # the evaluated variant is the reference itself


@dataclass
class EvalContext:
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    batch_size: int
    seed: int
    progress: Callable[[int, int], None] = field(default=_no_progress)
    reference: Reference | None = None


@dataclass
class TaskOutput:
    metrics: dict[str, Any]
    # Per-example outputs kept for paired statistics; not shown in tables.
    per_example: dict[str, list] = field(default_factory=dict)
    # A task whose headline metric depends on what it evaluated (lm-eval's tasks) names it here; None: the
    # task class's.
    quality_metric: str | None = None
    higher_is_better: bool | None = None


class Task(ABC):
    """A task is its data plus ``load`` (validate and read, at the edge) and ``evaluate``."""

    name: ClassVar[str]
    description: ClassVar[str]
    model_kind: ClassVar[ModelKind]
    Config: ClassVar[type[TaskConfig]]
    quality_metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    latency_metric: ClassVar[str]
    # Scores are computed on exact numerics (every kernel gives the reference path's numbers); a task that times
    # decoding sets this False so the fast kernels are what it times.
    exact_numerics: ClassVar[bool] = True
    # The option a bare first word of the CLI's NAME:... fills ("lm-eval:mmlu" is task="mmlu"); it also names
    # the task's label.
    positional: ClassVar[str | None] = None

    def __init__(self, config: TaskConfig, data_dir: Path):
        self.config = config
        self.data_dir = data_dir

    @abstractmethod
    def load(self) -> Any:
        """Read and validate the data; raise DataError with one clear line if it is unusable."""

    def check(self, data: Any, model: ResolvedModel) -> None:
        """Refuse, with one line, a model this task cannot evaluate as configured (before any work).

        Here: a ``max_length`` asked for beyond the positions the model can represent (a default one is cut
        to the model's context where it is used, and the result records it)."""
        length, context = getattr(self.config, "max_length", None), model.context_length
        if context and length and "max_length" in self.config.model_fields_set and length > context:
            raise ConfigError(
                f"task {self.name}: max_length {length} exceeds the {context} positions {model.name} can "
                f"represent; set max_length <= {context}"
            )

    @abstractmethod
    def evaluate(self, ctx: EvalContext, data: Any) -> TaskOutput: ...

    def run(self, ctx: EvalContext, data: Any) -> TaskOutput:
        """``evaluate`` under the numerics the task asks for."""
        with numerics.exact(self.exact_numerics):
            return self.evaluate(ctx, data)


TASKS: Registry[type[Task]] = Registry("task")


def register(cls: type[Task]) -> type[Task]:
    TASKS.register(cls.name, cls)
    return cls
