"""What a task is: typed config, the model kind it needs, how to load its data and evaluate a model."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator

from quantarena.registry import Registry

ModelKind = Literal["causal-lm", "sequence-classification"]
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


@dataclass(frozen=True)
class Origin:
    """Where the evaluated model came from, for tasks that compare it with another variant of the same weights."""

    model_digest: str
    method: str
    method_config: dict[str, Any]
    # The unquantized model and its tokenizer, loaded afresh (on the CPU, as models.load returns them).
    load: Callable[[], tuple[torch.nn.Module, Any]]


@dataclass
class EvalContext:
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    batch_size: int
    seed: int
    progress: Callable[[int, int], None] = field(default=_no_progress)
    origin: Origin | None = None


@dataclass
class TaskOutput:
    metrics: dict[str, Any]
    # Per-example outputs kept for paired statistics; not shown in tables.
    per_example: dict[str, list] = field(default_factory=dict)


class Task(ABC):
    """A task is its data plus ``load`` (validate and read, at the edge) and ``evaluate``."""

    name: ClassVar[str]
    description: ClassVar[str]
    model_kind: ClassVar[ModelKind]
    Config: ClassVar[type[TaskConfig]]
    quality_metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    latency_metric: ClassVar[str]

    def __init__(self, config: TaskConfig, data_dir: Path):
        self.config = config
        self.data_dir = data_dir

    @abstractmethod
    def load(self) -> Any:
        """Read and validate the data; raise DataError with one clear line if it is unusable."""

    @abstractmethod
    def evaluate(self, ctx: EvalContext, data: Any) -> TaskOutput: ...


TASKS: Registry[type[Task]] = Registry("task")


def register(cls: type[Task]) -> type[Task]:
    TASKS.register(cls.name, cls)
    return cls
