"""The public entry points. The CLI is a thin layer over these."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from quantarena import models
from quantarena.cell import Cell
from quantarena.config import SweepConfig
from quantarena.data import resolve_data_dir
from quantarena.environment import environment
from quantarena.errors import ConfigError
from quantarena.executor import run_in_child, run_inline
from quantarena.models import ResolvedModel
from quantarena.report import print_tables, write_all
from quantarena.results import Results
from quantarena.tasks import TASKS


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available here; use device = 'cpu'")


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output dir {output_dir} cannot be created: {e.strerror}") from None
    if not os.access(output_dir, os.W_OK):
        raise ConfigError(f"output dir {output_dir} is not writable")


def plan(config: SweepConfig, resolved: list[ResolvedModel], data_dir: Path) -> list[Cell]:
    """model × task (where the model can serve the task) × method, in the order the config lists them."""
    cells = []
    for task in config.tasks:
        kind = TASKS.get(task.name).model_kind
        serving = [m for m in resolved if m.kind in (None, kind)]
        if not serving:
            have = ", ".join(f"{m.name} ({m.kind})" for m in resolved)
            raise ConfigError(f"task {task.label} needs a {kind} model; the sweep has {have}")
        for model in serving:
            cells += [
                Cell(
                    model,
                    kind,
                    method,
                    task,
                    config.device,
                    config.batch_size,
                    config.seed,
                    data_dir,
                    config.output_dir / ".scratch",
                )
                for method in config.methods
            ]
    return cells


def prepare(config: SweepConfig) -> list[Cell]:
    """Every check that can fail on bad input, before any cell runs."""
    _check_device(config.device)
    data_dir = resolve_data_dir(config.data_dir)
    for task in config.tasks:
        TASKS.get(task.name)(task.config, data_dir).load()
    resolved = [
        models.resolve(
            m.source,
            name=m.name,
            gguf_file=m.gguf_file,
            kind=m.kind,
            num_labels=m.num_labels,
            trust_remote_code=m.trust_remote_code,
        )
        for m in config.models
    ]
    cells = plan(config, resolved, data_dir)
    _check_writable(config.output_dir)
    return cells


def run(config: SweepConfig, console: Console | None = None) -> Results:
    """Run the sweep; every finished cell is on disk before the next one starts."""
    console = console or Console(stderr=True)
    cells = prepare(config)
    results = Results(config.baseline, environment(), config.model_dump(mode="json"))
    execute = run_in_child if config.isolation == "process" else run_inline
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        sweep = progress.add_task("sweep", total=len(cells))
        for cell in cells:
            label = f"{cell.model.name} · {cell.method.label} · {cell.task.label}"
            progress.update(sweep, description=f"cells ({label})")
            inner = progress.add_task(f"  {cell.task.label}", total=None)
            result = execute(cell, lambda done, total, t=inner: progress.update(t, completed=done, total=total))
            progress.remove_task(inner)
            results.cells.append(result)
            write_all(results, config.output_dir)
            progress.advance(sweep)
            if result.status != "ok":
                console.print(f"[yellow]{label}: {result.status}: {result.reason}[/]")
    return results


def report(results: Results, console: Console | None = None) -> None:
    print_tables(results, console)
