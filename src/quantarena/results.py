"""Result records: one per cell (a variant, i.e. a model with one method applied, evaluated on one task), and a
sweep's set of them."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from quantarena.errors import QuantarenaError

SCHEMA_VERSION = 2
# Version 1 records lack the variant fields and the per-phase memory peaks; they read with those absent.
READABLE_VERSIONS = (1, 2)

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
    # "quantized" (in the run that produced this result) or "cache" (reloaded from the checkpoint cache)
    variant_source: str | None = None
    variant_note: str | None = None  # why the variant was not cached, or was quantized again
    caveat: str | None = None  # what the method's scores depend on beyond the weights (Method.caveat)

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
        if data.get("schema_version") not in READABLE_VERSIONS:
            raise ValueError(f"results schema version {data.get('schema_version')} is not one of {READABLE_VERSIONS}")
        return cls(
            baseline=data["baseline"],
            environment=data["environment"],
            config=data["config"],
            cells=[CellResult(**c) for c in data["cells"]],
        )


def read_results(path: Path) -> Results:
    try:
        return Results.from_json(json.loads(Path(path).read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise QuantarenaError(f"{path} is not a quantarena results file: {e}") from None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def strict_json(value: Any) -> str:
    """JSON that every parser reads: NaN and infinities (which json.dumps writes as bare NaN) become null."""
    return json.dumps(_finite(value), indent=1, allow_nan=False)


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
