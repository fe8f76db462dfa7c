"""Result records: one per cell (model x method x task), and the whole sweep's set of them."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 1

Status = Literal["ok", "skipped", "failed"]


@dataclass
class CellResult:
    model: str
    method: str
    task: str
    status: Status
    reason: str | None = None
    method_name: str = ""
    task_name: str = ""
    method_config: dict[str, Any] = field(default_factory=dict)
    task_config: dict[str, Any] = field(default_factory=dict)
    quality_metric: str | None = None
    higher_is_better: bool = True
    latency_metric: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    measurements: dict[str, Any] = field(default_factory=dict)
    per_example: dict[str, list] = field(default_factory=dict)
    device: str = "cpu"
    duration_s: float = 0.0

    @property
    def key(self) -> tuple[str, str, str]:
        return self.model, self.method, self.task


@dataclass
class Results:
    baseline: str
    environment: dict[str, Any]
    config: dict[str, Any]
    cells: list[CellResult] = field(default_factory=list)

    def baseline_of(self, cell: CellResult) -> CellResult | None:
        for other in self.cells:
            if (other.model, other.task, other.method) == (cell.model, cell.task, self.baseline):
                return other if other.status == "ok" else None
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "baseline": self.baseline,
            "environment": self.environment,
            "config": self.config,
            "cells": [asdict(c) for c in self.cells],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Results:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"results schema version {data.get('schema_version')} is not {SCHEMA_VERSION}")
        return cls(
            baseline=data["baseline"],
            environment=data["environment"],
            config=data["config"],
            cells=[CellResult(**c) for c in data["cells"]],
        )

    @classmethod
    def read(cls, path: Path) -> Results:
        return cls.from_json(json.loads(Path(path).read_text()))


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared and served
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
