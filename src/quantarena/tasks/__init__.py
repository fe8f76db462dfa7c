"""Evaluation tasks. Each task family module registers its tasks on import."""

from quantarena.tasks import classification, perplexity  # noqa: F401  (registration)
from quantarena.tasks.base import TASKS, EvalContext, Task, TaskConfig, TaskOutput

__all__ = ["TASKS", "EvalContext", "Task", "TaskConfig", "TaskOutput"]
