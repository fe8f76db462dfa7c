"""One worker's job: load a model, apply one method (or reload it from the cache), then evaluate every task.

``run_job`` yields ``Started`` before each step (preparing the variant, then each cell) and ``Finished`` with
each cell's result as soon as it exists; it never raises for a problem of the variant or a task, which comes
back as a failed or skipped result. Memory is measured per phase: the peak while loading and quantizing,
and the peak while serving each task after it (what a user provisions), the high-water marks reset between.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantarena import measure, models
from quantarena.config import reference_choice
from quantarena.errors import QuantarenaError, first_line
from quantarena.halfgemm import use_half_gemm
from quantarena.methods import METHODS, quantize_with_calibration
from quantarena.methods.base import coverage, linear_layers, nothing_quantized
from quantarena.ownquant import kernel_summary
from quantarena.ownquant.cpu import float_kernel_summary
from quantarena.ownquant.ggml import ggml_summary
from quantarena.results import CellResult
from quantarena.sweep.cache import VariantCache
from quantarena.sweep.plan import Cell, Job, Variant
from quantarena.tasks import TASKS, EvalContext, Reference, ReferenceConfig

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Started:
    cell_key: str | None  # None: the variant is being loaded and quantized


@dataclass(frozen=True)
class Finished:
    cell_key: str
    result: CellResult


Event = Started | Finished


@dataclass
class Prepared:
    model: torch.nn.Module
    tokenizer: Any
    source: str  # "quantized" in this run, or "cache"
    note: str | None  # why it was not cached, or was rebuilt
    measurements: dict[str, Any] = field(default_factory=dict)


def failure_reason(error: BaseException) -> str:
    """A user error's own message; otherwise the exception's first line and where it was raised."""
    if isinstance(error, QuantarenaError):
        return str(error)
    where = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__}: {first_line(error, '')} ({Path(where.filename).name}:{where.lineno})"


class NothingQuantized(QuantarenaError):
    """The method left every layer as it was: its cells are skipped rather than reported as the float model."""


def _quantize(variant: Variant) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The variant quantized from the float model, with its load and quantize times and what it quantized."""
    method = METHODS.get(variant.method.name)
    device = torch.device(variant.device)
    with measure.timed() as loading:
        model, tokenizer = models.load(variant.model, variant.kind, variant.seed)
    model.to(device)
    before, float_bytes = linear_layers(model), measure.weight_bytes(model)
    with measure.timed(device) as quantizing:
        model = quantize_with_calibration(method, variant.method.config, model, tokenizer, variant.data_dir, device)
    figures = {"load_s": loading.seconds, "quantize_s": quantizing.seconds}
    if method.quantizes_layers:
        figures |= coverage(before, model, float_bytes)
        if figures["quantized_layers"] == 0:
            raise NothingQuantized(nothing_quantized(method.name, before))
    return model, tokenizer, figures


def _scratch_disk_bytes(save: Callable, model: torch.nn.Module, scratch_dir: Path) -> tuple[int, float]:
    scratch_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=scratch_dir))
    try:
        with measure.timed() as saving:
            save(model, tmp / "model")
        return measure.dir_bytes(tmp), saving.seconds
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# A cached variant's figures from the run that quantized it.
RECORDED = ("quantize_s", "disk_bytes", "save_s", "quantized_layers", "linear_layers", "quantized_weight_share")


def prepare(variant: Variant, cache_dir: Path | None, rebuild: bool, scratch_dir: Path) -> Prepared:
    """The variant in memory, from the cache where it round-trips, with its size and preparation figures; its
    half-precision Linear layers multiply with PyTorch's numbers through the faster exact half GEMM where PyTorch's
    own is its slow fallback (``quantarena.halfgemm``), whatever the method."""
    prepared = _prepare(variant, cache_dir, rebuild, scratch_dir)
    half_gemm_layers = use_half_gemm(prepared.model)
    if half_gemm_layers:
        prepared.measurements["half_gemm_layers"] = half_gemm_layers
    return prepared


def _prepare(variant: Variant, cache_dir: Path | None, rebuild: bool, scratch_dir: Path) -> Prepared:
    method = METHODS.get(variant.method.name)
    cache = VariantCache(cache_dir) if cache_dir is not None else None
    keeps_checkpoint = cache is not None and method.reloader is not None and method.cache_checkpoint
    key = variant.key()
    entry, note = cache.get(key) if keeps_checkpoint and not rebuild else (None, None)
    if entry is not None:
        try:
            with measure.timed() as loading:
                model = method.reloader(entry.checkpoint, variant.device)
            tokenizer = models.load_tokenizer(variant.model.path, model, variant.model.trust_remote_code)
            figures = {k: v for k, v in entry.record.items() if k in RECORDED}
            return Prepared(model, tokenizer, "cache", None, figures | {"load_s": loading.seconds})
        except Exception as e:  # a loader that fails on a verified entry: rebuild rather than fail the variant
            cache.drop(key)
            note = f"cached checkpoint did not reload ({failure_reason(e)}); quantized again"
    model, tokenizer, figures = _quantize(variant)
    if keeps_checkpoint:
        entry = cache.put(key, lambda folder: method.save(model, folder), {"identity": variant.identity(), **figures})
        return Prepared(
            model, tokenizer, "quantized", note, figures | {k: entry.record[k] for k in ("disk_bytes", "save_s")}
        )
    known = cache.figures(key) if cache is not None and not rebuild else None
    if known is None:
        disk_bytes, save_s = _scratch_disk_bytes(method.save, model, scratch_dir)
        known = {"disk_bytes": disk_bytes, "save_s": save_s}
        if cache is not None:
            cache.put_figures(key, {"identity": variant.identity(), **known})
    if cache is not None:
        note = (
            "not cached: no loader reads its checkpoint back, so it is quantized in every run"
            if method.reloader is None
            else "not cached: applied again in every run, which costs less than reloading a copy"
        )
    return Prepared(model, tokenizer, "quantized", note, figures | known)


def _reference(cell: Cell, prepared: Prepared, job: Job) -> Reference | None:
    """For tasks that compare with another variant of the same weights (divergence vs the baseline)."""
    config = cell.task.config
    if not isinstance(config, ReferenceConfig):
        return None
    reference = cell.variant.with_method(reference_choice(config))
    identity = {"model": cell.variant.model.digest, "method": reference.identity()["method"]}
    if reference.identity()["method"] == cell.variant.identity()["method"]:
        return Reference(identity, lambda: prepared.model, is_self=True)

    def load() -> torch.nn.Module:
        return prepare(reference, job.cache_dir, False, job.scratch_dir).model

    return Reference(identity, load)


def evaluate(cell: Cell, prepared: Prepared, job: Job, progress: Progress, first: bool) -> CellResult:
    """``first``: the variant's first cell, after which the model it was quantized from is garbage."""
    started = time.perf_counter()
    variant = cell.variant
    device = torch.device(variant.device)
    try:
        task = TASKS.get(cell.task.name)(cell.task.config, variant.data_dir)
        data = task.load()
        fresh_peak = measure.reset_peak_memory(device, collect=first)
        torch.manual_seed(variant.seed)
        ctx = EvalContext(
            prepared.model,
            prepared.tokenizer,
            device,
            cell.batch_size,
            variant.seed,
            progress,
            _reference(cell, prepared, job),
        )
        output = task.run(ctx, data)
        serving = measure.peak_memory(device)
        if not fresh_peak:
            serving.pop("peak_rss_bytes", None)  # it would include loading and quantizing
    except Exception as e:
        return cell.result("failed", failure_reason(e), duration_s=time.perf_counter() - started)
    headline = {
        "quality_metric": output.quality_metric or task.quality_metric,
        "higher_is_better": task.higher_is_better if output.higher_is_better is None else output.higher_is_better,
    }
    quality = output.metrics.get(headline["quality_metric"])
    if not isinstance(quality, (int, float)) or not math.isfinite(quality):
        reason = (
            f"{headline['quality_metric']} is {quality}: the variant's outputs are not finite numbers "
            "(an overflow in a low-precision dtype?)"
        )
        return cell.result(
            "failed", reason, metrics=output.metrics, duration_s=time.perf_counter() - started, **headline
        )
    measurements = prepared.measurements | {f"serve_{k}": v for k, v in serving.items()}
    if variant.kind == "sequence-classification" and not variant.model.has_classifier_head:
        measurements["untrained_head"] = True  # allowed in the model table; the report says so
    return cell.result(
        "ok",
        metrics=output.metrics,
        measurements=measurements,
        per_example=output.per_example,
        duration_s=time.perf_counter() - started,
        variant_source=prepared.source,
        variant_note=prepared.note,
        caveat=METHODS.get(variant.method.name).caveat,
        **headline,
    )


def run_job(job: Job, progress: Progress) -> Iterator[Event]:
    variant = job.variant
    unmet = METHODS.get(variant.method.name).requires.unmet(variant.device)
    if unmet:
        for cell in job.cells:
            yield Finished(cell.key(), cell.result("skipped", unmet))
        return
    yield Started(None)
    device = torch.device(variant.device)
    try:
        measure.reset_peak_memory(device)
        with torch.no_grad():
            prepared = prepare(variant, job.cache_dir, job.rebuild, job.scratch_dir)
        loading = measure.peak_memory(device)
        prepared.measurements |= {f"load_{k}": v for k, v in loading.items()}
        prepared.measurements["weight_bytes"] = measure.weight_bytes(prepared.model)
        kernels = kernel_summary(prepared.model)
        if kernels:  # which forward the own formats run: fast kernels, or the portable fallback
            prepared.measurements["linear_kernels"] = kernels
        float_kernels = float_kernel_summary(prepared.model)
        if float_kernels:  # the float layers a quantized model keeps (its head), when they run the own GEMV
            prepared.measurements["float_linear_kernels"] = float_kernels
        gguf_types = ggml_summary(prepared.model)
        if gguf_types:  # the types llama.cpp chose per tensor (a GGUF file type is a mixture)
            prepared.measurements["gguf_tensor_types"] = gguf_types
    except Exception as e:
        status = "skipped" if isinstance(e, NothingQuantized) else "failed"
        reason = failure_reason(e)
        for cell in job.cells:
            yield Finished(cell.key(), cell.result(status, reason))
        return
    for i, cell in enumerate(job.cells):
        yield Started(cell.key())
        yield Finished(cell.key(), evaluate(cell, prepared, job, progress, first=i == 0))
