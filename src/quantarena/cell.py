"""One cell of the sweep: load a model, apply one method, measure it, run one task."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from quantarena import measure, models
from quantarena.config import MethodChoice, TaskChoice
from quantarena.environment import package_version
from quantarena.errors import QuantarenaError
from quantarena.kernels import kernel_summary
from quantarena.methods import METHODS
from quantarena.methods.base import calibration_batches
from quantarena.models import ResolvedModel
from quantarena.results import CellResult
from quantarena.tasks import TASKS, EvalContext
from quantarena.tasks.base import ModelKind, Origin


@dataclass(frozen=True)
class Cell:
    model: ResolvedModel
    kind: ModelKind
    method: MethodChoice
    task: TaskChoice
    device: str
    batch_size: int
    seed: int
    data_dir: Path
    scratch_dir: Path
    plugins: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.model.name} · {self.method.label} · {self.task.label}"

    def key(self) -> str:
        """Hash of everything that determines this cell's result; equal keys mean reusable results."""
        method = METHODS.get(self.method.name)
        packages = ("quantarena", "torch", "transformers", *method.requires.packages)
        identity = {
            "model": [self.model.digest, self.kind, self.model.num_labels],
            "method": [self.method.name, self.method.config.model_dump(mode="json")],
            "task": [self.task.name, self.task.config.model_dump(mode="json"), str(self.data_dir)],
            "run": [self.device, self.batch_size, self.seed],
            "versions": {p: package_version(p) for p in packages},
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def result(self, status: str, reason: str | None = None, **fields) -> CellResult:
        task = TASKS.get(self.task.name)
        return CellResult(
            model=self.model.name,
            method=self.method.label,
            task=self.task.label,
            status=status,
            reason=reason,
            method_name=self.method.name,
            task_name=self.task.name,
            method_config=self.method.config.model_dump(mode="json"),
            task_config=self.task.config.model_dump(mode="json"),
            quality_metric=task.quality_metric,
            higher_is_better=task.higher_is_better,
            latency_metric=task.latency_metric,
            device=self.device,
            **fields,
        )


def _disk_bytes(save: Callable, model: torch.nn.Module, scratch_dir: Path) -> tuple[int, float]:
    scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch_dir) as tmp, measure.timed() as watch:
        save(model, Path(tmp) / "model")
        nbytes = measure.dir_bytes(Path(tmp))
    return nbytes, watch.seconds


def run_cell(cell: Cell, progress: Callable[[int, int], None] | None = None) -> CellResult:
    """Never raises for a problem of the cell itself: it comes back as a skipped or failed result."""
    started = time.perf_counter()
    method = METHODS.get(cell.method.name)
    unmet = method.requires.unmet(cell.device)
    if unmet:
        return cell.result("skipped", unmet)
    try:
        device = torch.device(cell.device)
        task = TASKS.get(cell.task.name)(cell.task.config, cell.data_dir)
        data = task.load()
        with measure.timed() as load:
            model, tokenizer = models.load(cell.model, cell.kind, cell.seed)
        model.to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        calibration = partial(calibration_batches, tokenizer, cell.data_dir, device)
        with torch.no_grad(), measure.timed(device) as quantize:
            model = method.quantize(model, cell.method.config, calibration)
        disk_bytes, save_s = _disk_bytes(method.save, model, cell.scratch_dir)
        torch.manual_seed(cell.seed)
        origin = Origin(
            cell.model.digest,
            cell.method.name,
            cell.method.config.model_dump(mode="json"),
            lambda: models.load(cell.model, cell.kind, cell.seed),
        )
        ctx = EvalContext(model, tokenizer, device, cell.batch_size, cell.seed, progress or (lambda d, t: None), origin)
        output = task.evaluate(ctx, data)
    except QuantarenaError as e:
        return cell.result("failed", str(e), duration_s=time.perf_counter() - started)
    except Exception as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        first_line = str(e).splitlines()[0] if str(e) else ""
        reason = f"{type(e).__name__}: {first_line} ({Path(where.filename).name}:{where.lineno})"
        return cell.result("failed", reason, duration_s=time.perf_counter() - started)

    measurements = {
        "weight_bytes": measure.weight_bytes(model),
        "disk_bytes": disk_bytes,
        "load_s": load.seconds,
        "quantize_s": quantize.seconds,
        "save_s": save_s,
        "peak_rss_bytes": measure.peak_rss_bytes(),
    }
    if device.type == "cuda":
        measurements["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    kernels = kernel_summary(model)
    if kernels:  # which forward the own formats ran: fast kernels, or the portable fallback
        measurements["linear_kernels"] = kernels
    return cell.result(
        "ok",
        metrics=output.metrics,
        measurements=measurements,
        per_example=output.per_example,
        duration_s=time.perf_counter() - started,
    )
