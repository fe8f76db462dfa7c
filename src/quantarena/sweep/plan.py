"""What a sweep runs: variants (a model with one method applied) and cells (a variant evaluated on one task).

A variant is quantized once and serves every task of the sweep; its identity keys the checkpoint cache, and a
cell's key (the variant's identity plus the task, its data's digest and the run settings) keys the results
store, so equal keys mean a reusable result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantarena.config import MethodChoice, TaskChoice
from quantarena.data import json_digest
from quantarena.environment import package_version
from quantarena.methods import METHODS
from quantarena.methods.calibration import calibration_digest
from quantarena.models import ModelKind, ResolvedModel
from quantarena.results import CellResult
from quantarena.tasks import TASKS

CORE_PACKAGES = ("quantarena", "torch", "transformers")


@dataclass(frozen=True)
class Variant:
    model: ResolvedModel
    kind: ModelKind
    method: MethodChoice
    device: str
    seed: int
    data_dir: Path

    @property
    def label(self) -> str:
        return f"{self.model.name} · {self.method.label}"

    def with_method(self, method: MethodChoice) -> Variant:
        return Variant(self.model, self.kind, method, self.device, self.seed, self.data_dir)

    def identity(self) -> dict[str, Any]:
        """Everything that determines the quantized model (display labels excluded)."""
        method = METHODS.get(self.method.name)
        calibration = self.method.config.calibrates_on() if method.calibrate is not None else None
        packages = (*CORE_PACKAGES, *method.requires.packages)
        tool = method.requires.tool
        tools = {tool.NAME: tool.version()} if tool else {}
        return {
            # The seed initialises a classifier head the checkpoint lacks.
            "model": [self.model.digest, self.kind, self.model.num_labels, self.seed],
            "method": [self.method.name, self.method.config.model_dump(mode="json")],
            "calibration": calibration_digest(self.data_dir, calibration) if calibration else None,
            "device": self.device,
            "versions": {p: package_version(p) for p in packages} | tools,
        }

    def key(self) -> str:
        return json_digest(self.identity())


@dataclass(frozen=True)
class Cell:
    """One result of the table: a variant evaluated on one task."""

    variant: Variant
    task: TaskChoice
    batch_size: int
    data_digest: str  # of the task's data as loaded (selection included)

    @property
    def label(self) -> str:
        return f"{self.variant.label} · {self.task.label}"

    @property
    def labels(self) -> tuple[str, str, str]:
        return self.variant.model.name, self.variant.method.label, self.task.label

    def key(self) -> str:
        return json_digest(
            {
                "variant": self.variant.identity(),
                "task": [self.task.name, self.task.config.model_dump(mode="json"), self.data_digest],
                "batch_size": self.batch_size,
            }
        )

    def result(self, status: str, reason: str | None = None, **fields) -> CellResult:
        """``fields`` may name the headline (quality_metric, higher_is_better) where the task output does."""
        task = TASKS.get(self.task.name)
        model, method, task_label = self.labels
        headline = {"quality_metric": task.quality_metric, "higher_is_better": task.higher_is_better}
        return CellResult(
            model=model,
            method=method,
            task=task_label,
            status=status,
            reason=reason,
            method_name=self.variant.method.name,
            task_name=self.task.name,
            method_config=self.variant.method.config.model_dump(mode="json"),
            task_config=self.task.config.model_dump(mode="json"),
            latency_metric=task.latency_metric,
            device=self.variant.device,
            **(headline | fields),
        )


@dataclass(frozen=True)
class Job:
    """What one worker runs: a variant and the cells of it still to do."""

    variant: Variant
    cells: tuple[Cell, ...]
    cache_dir: Path | None  # None: quantize in every run, keep no checkpoint
    rebuild: bool  # quantize even when the cache holds the variant (--force)
    scratch_dir: Path  # where uncached checkpoints are written to measure their size
    plugins: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.variant.label


def jobs_of(cells: list[Cell], **options: Any) -> list[Job]:
    """The cells grouped by variant, variants in the order their first cell comes."""
    grouped: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        grouped.setdefault((cell.variant.key(), cell.variant.label), []).append(cell)
    return [Job(group[0].variant, tuple(group), **options) for group in grouped.values()]
