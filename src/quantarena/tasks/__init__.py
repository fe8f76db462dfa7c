"""Evaluation tasks. Each task family module registers its tasks on import."""

from quantarena.tasks import (  # noqa: F401  (registration)
    classification,
    divergence,
    generation,
    lambada,
    lmeval,
    multiple_choice,
    perplexity,
    wikitext,
)
from quantarena.tasks.base import TASKS, EvalContext, Reference, ReferenceConfig, Task, TaskConfig, TaskOutput

__all__ = ["TASKS", "EvalContext", "Reference", "ReferenceConfig", "Task", "TaskConfig", "TaskOutput"]
