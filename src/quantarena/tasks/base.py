"""What a task is: typed config, the model kind it needs, how to load its data and evaluate a model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt

from quantarena.registry import Registry

ModelKind = Literal["causal-lm", "sequence-classification"]


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: PositiveInt | None = None


def _no_progress(done: int, total: int) -> None:
    pass


@dataclass
class EvalContext:
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    batch_size: int
    seed: int
    progress: Callable[[int, int], None] = field(default=_no_progress)


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
