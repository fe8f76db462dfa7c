"""Quantize a model to disk in its method's own format, reload it, and compare it with the original.

``quantize_to_disk`` writes the method's checkpoint, the tokenizer and ``quantarena_method.json``
(which method and options made it), so ``compare`` can reload the folder with that method's own
loader and evaluate it next to the original on one task.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt

from quantarena import measure, models
from quantarena.config import MethodChoice, TaskChoice, method_choice, task_choice, validated
from quantarena.data import resolve_data_dir
from quantarena.environment import check_device
from quantarena.errors import ConfigError, ModelError, QuantarenaError, first_line
from quantarena.methods import METHODS, Method, quantize_with_calibration
from quantarena.models import ModelKind
from quantarena.tasks import TASKS, EvalContext

METHOD_FILE = "quantarena_method.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_on_disk(folder: Path) -> int:
    """Bytes of the weight files in a model folder (tokenizer and docs left out, so both sides compare alike).

    Where safetensors are present only they count: they are what gets loaded, a ``.bin`` beside them is a copy.
    """
    files = [f for f in Path(folder).rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    loaded = [f for f in files if f.suffix == ".safetensors"] or files
    return sum(f.stat().st_size for f in loaded)


class Marker(BaseModel):
    """``quantarena_method.json``: which method and options made a quantized folder, from which model."""

    model_config = ConfigDict(extra="forbid")

    method: str
    label: str = ""
    config: dict[str, Any] = {}
    source: str = ""
    kind: ModelKind
    num_labels: PositiveInt | None = None
    allow_untrained_head: bool = False


def _resolve(
    source: str, kind: ModelKind | None, num_labels: int | None, allow_untrained_head: bool
) -> models.ResolvedModel:
    if kind not in (None, *get_args(ModelKind)):
        raise ConfigError(f"kind {kind!r}: use {' or '.join(get_args(ModelKind))}")
    if num_labels is not None and num_labels < 1:
        raise ConfigError(f"num_labels {num_labels}: a classifier has at least 1 label")
    resolved = models.resolve(source, kind=kind, num_labels=num_labels, allow_untrained_head=allow_untrained_head)
    if resolved.kind is None:
        raise ConfigError(f"model {source}: say what it is (kind = causal-lm or sequence-classification)")
    models.check_classifier_head(resolved, resolved.kind)
    return resolved


def _check_run_options(device: str, seed: int, batch_size: int = 1) -> None:
    check_device(device)
    if not 0 <= seed < 2**63:
        raise ConfigError(f"seed {seed}: give a number from 0 to 2**63 - 1")
    if batch_size < 1:
        raise ConfigError(f"batch-size {batch_size}: give at least 1")


def quantize_to_disk(
    model_source: str,
    method: MethodChoice | str | dict[str, Any],
    out_dir: Path,
    *,
    kind: ModelKind | None = None,
    num_labels: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    data_dir: Path | None = None,
    allow_untrained_head: bool = False,
) -> Path:
    """Load ``model_source`` in fp32, quantize it with ``method`` and save it, reloadable, to ``out_dir``."""
    choice = method_choice(method)
    spec = METHODS.get(choice.name)
    out_dir = Path(out_dir)
    _check_run_options(device, seed)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output dir {out_dir} is a file")
    unmet = spec.requires.unmet(device)
    if unmet:
        raise ConfigError(f"method {choice.label} cannot run here: {unmet}")
    if spec.reloader is None:
        raise ConfigError(f"method {choice.label} has no loader for what it saves; it cannot be saved for compare")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"output dir {out_dir} is not empty")
    resolved = _resolve(model_source, kind, num_labels, allow_untrained_head)
    model, tokenizer = models.load(resolved, resolved.kind, seed)
    model.to(device)
    model = quantize_with_calibration(
        spec, choice.config, model, tokenizer, resolve_data_dir(data_dir), torch.device(device)
    )
    spec.save(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    marker = {
        "method": choice.name,
        "label": choice.label,
        "config": choice.config.model_dump(mode="json"),
        "source": model_source,
        "kind": resolved.kind,
        "num_labels": num_labels,
        "allow_untrained_head": allow_untrained_head,
    }
    (out_dir / METHOD_FILE).write_text(json.dumps(marker, indent=1))
    return out_dir


@dataclass(frozen=True)
class Side:
    """One model of the comparison, measured the same way as the other."""

    path: str
    disk_bytes: int
    weight_bytes: int
    metrics: dict[str, Any]
    peak_cuda_bytes: int | None = None


@dataclass(frozen=True)
class Comparison:
    method: str
    task: str
    quality_metric: str
    higher_is_better: bool
    latency_metric: str
    original: Side
    quantized: Side
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, float | None, float | None]]:
        """(quantity, original, quantized) in display units."""
        mb = 1e-6
        rows = [
            ("weights on disk (MB)", self.original.disk_bytes * mb, self.quantized.disk_bytes * mb),
            ("weight memory (MB)", self.original.weight_bytes * mb, self.quantized.weight_bytes * mb),
        ]
        if self.device == "cuda":
            rows.append(
                ("peak CUDA memory (MB)", self.original.peak_cuda_bytes * mb, self.quantized.peak_cuda_bytes * mb)
            )
        for name in (self.quality_metric, self.latency_metric, "inference_s"):
            rows.append((name, self.original.metrics.get(name), self.quantized.metrics.get(name)))
        return rows


def difference_pct(original: float | None, quantized: float | None) -> float | None:
    if original is None or quantized is None or original == 0:
        return None
    return (quantized - original) / abs(original) * 100


def _evaluate(load, path: str, disk_bytes: int, task, data, device: torch.device, batch_size: int, seed: int) -> Side:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, tokenizer = load()
    ctx = EvalContext(model, tokenizer, device, batch_size, seed)
    torch.manual_seed(seed)
    output = task.run(ctx, data)
    side = Side(
        path=path,
        disk_bytes=disk_bytes,
        weight_bytes=measure.weight_bytes(model),
        metrics=output.metrics,
        peak_cuda_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )
    del model, ctx
    gc.collect()
    return side


def read_marker(quantized_dir: Path) -> tuple[Marker, MethodChoice]:
    """The folder's marker, checked: a known method with valid options, a known model kind."""
    path = Path(quantized_dir) / METHOD_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{quantized_dir} has no {METHOD_FILE}: write it with `quantarena quantize`") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path} is not valid JSON ({first_line(e)})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path} holds a {type(raw).__name__}, not an object")
    marker = validated(Marker, raw, str(path))
    choice = method_choice({"name": marker.method, **marker.config} | ({"label": marker.label} if marker.label else {}))
    return marker, choice


def _refuse_pickle(method: Method, quantized_dir: Path, trust_pickle: bool) -> None:
    if method.pickled_checkpoint and not trust_pickle:
        raise ModelError(
            f"{quantized_dir} holds a pickled {method.name} program, and loading a pickle can run code from the "
            "folder; pass --trust-pickle (trust_pickle=True) only for a folder you made yourself"
        )


def load_quantized(quantized_dir: Path, device: str = "cpu", trust_pickle: bool = False) -> tuple[torch.nn.Module, Any]:
    """A folder written by ``quantize_to_disk``, reloaded by its method's own loader. A method whose checkpoint
    is a pickle (loading it can run code from the folder) is loaded only with ``trust_pickle``."""
    _, choice = read_marker(quantized_dir)
    method = METHODS.get(choice.name)
    _refuse_pickle(method, quantized_dir, trust_pickle)
    if method.reloader is None:
        raise ModelError(f"method {method.name} has no loader")
    try:
        model = method.reloader(Path(quantized_dir), device)
    except QuantarenaError:
        raise
    except Exception as e:  # a damaged or foreign folder: what the backend's loader said, on one line
        raise ModelError(
            f"{quantized_dir}: its {method.name} checkpoint cannot be loaded ({type(e).__name__}: {first_line(e, '')})"
        ) from None
    return model, models.load_tokenizer(quantized_dir, model)


def compare(
    original: str,
    quantized_dir: Path,
    task: TaskChoice | str | dict[str, Any],
    *,
    device: str = "cpu",
    batch_size: int = 8,
    seed: int = 0,
    data_dir: Path | None = None,
    trust_pickle: bool = False,
) -> Comparison:
    """Evaluate the original model and the reloaded quantized one on ``task``, measured alike."""
    choice = task_choice(task)
    marker, method = read_marker(quantized_dir)
    task_cls = TASKS.get(choice.name)
    _check_run_options(device, seed, batch_size)
    _refuse_pickle(METHODS.get(method.name), quantized_dir, trust_pickle)
    unmet = METHODS.get(method.name).requires.unmet(device)
    if unmet:
        raise ConfigError(f"method {method.label} cannot run here: {unmet}")
    resolved = _resolve(original, marker.kind, marker.num_labels, marker.allow_untrained_head)
    if resolved.kind != task_cls.model_kind:
        raise ConfigError(f"task {choice.label} needs a {task_cls.model_kind} model; {original} is {resolved.kind}")
    runner = task_cls(choice.config, resolve_data_dir(data_dir))
    data = runner.load()
    dev = torch.device(device)

    def load_original():
        model, tokenizer = models.load(resolved, resolved.kind, seed)
        return model.to(dev), tokenizer

    sides = [
        _evaluate(
            load_original, resolved.path, weights_on_disk(Path(resolved.path)), runner, data, dev, batch_size, seed
        ),
        _evaluate(
            lambda: load_quantized(Path(quantized_dir), device, trust_pickle),
            str(quantized_dir),
            weights_on_disk(Path(quantized_dir)),
            runner,
            data,
            dev,
            batch_size,
            seed,
        ),
    ]
    notes = []
    if marker.source != original:
        notes.append(f"{quantized_dir} was quantized from {marker.source}, compared with {original}")
    return Comparison(
        method=method.label,
        task=choice.label,
        quality_metric=task_cls.quality_metric,
        higher_is_better=task_cls.higher_is_better,
        latency_metric=task_cls.latency_metric,
        original=sides[0],
        quantized=sides[1],
        device=device,
        notes=notes,
    )
