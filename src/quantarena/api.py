"""The public entry points. The CLI is a thin layer over these."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from quantarena import models
from quantarena.analysis import load_runs
from quantarena.cell import Cell
from quantarena.config import ModelSpec, SweepConfig
from quantarena.data import resolve_data_dir
from quantarena.environment import environment
from quantarena.errors import ConfigError, QuantarenaError
from quantarena.executor import EXECUTORS
from quantarena.finetune import finetune
from quantarena.models import ResolvedModel
from quantarena.report import print_tables, write_all, write_report
from quantarena.results import CellResult, Results
from quantarena.roofline import record_bandwidth
from quantarena.store import Store
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
        scratch = config.output_dir / ".scratch"
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
                    scratch,
                    config.plugins,
                )
                for method in config.methods
            ]
    return cells


def _finetuned(config: SweepConfig, model: ModelSpec, data_dir: Path) -> ModelSpec:
    """The spec of ``model`` fine-tuned (trained now, resumed, or reused when already finished)."""
    name = model.name or f"{models.display_name(model.source, model.gguf_file)}-finetuned"
    out = config.output_dir / "finetune" / re.sub(r"[^\w.-]+", "_", name)
    tuned = finetune(model.source, config.finetune, out, data_dir, config.device)
    return model.model_copy(update={"source": str(tuned), "name": name, "gguf_file": None})


def prepare(config: SweepConfig) -> list[Cell]:
    """Every check that can fail on bad input, before any cell runs (fine-tuning, if asked, too)."""
    _check_device(config.device)
    _check_writable(config.output_dir)
    data_dir = resolve_data_dir(config.data_dir)
    for task in config.tasks:
        TASKS.get(task.name)(task.config, data_dir).load()
    specs = [_finetuned(config, m, data_dir) if config.finetune else m for m in config.models]
    resolved = [
        models.resolve(
            m.source,
            name=m.name,
            gguf_file=m.gguf_file,
            kind=m.kind,
            num_labels=m.num_labels,
            trust_remote_code=m.trust_remote_code,
        )
        for m in specs
    ]
    return plan(config, resolved, data_dir)


def run(config: SweepConfig, console: Console | None = None, force: bool = False) -> Results:
    """Run the sweep; every finished cell is in the store before the next one starts.

    Cells already stored with status ok under the same key are reused (``force`` reruns them);
    failed, skipped and missing cells run.
    """
    console = console or Console(stderr=True)
    cells = prepare(config)
    store = Store(config.output_dir)
    keys = {id(cell): cell.key() for cell in cells}
    finished: dict[int, CellResult] = {}
    for cell in cells:
        stored = None if force else store.get(keys[id(cell)])
        if stored and stored[0].status == "ok":
            # The key ignores display labels, so a renamed method still reuses its result.
            finished[id(cell)] = replace(
                stored[0], model=cell.model.name, method=cell.method.label, task=cell.task.label
            )
    todo = [cell for cell in cells if id(cell) not in finished]
    if finished:
        console.print(f"resuming: {len(finished)} of {len(cells)} cells already in {store.path}")
    # The bandwidth is measured once per run: the roofline floor of every latency divides by it.
    results = Results(config.baseline, record_bandwidth(environment(), config.device), config.model_dump(mode="json"))

    def publish() -> None:
        results.cells = [finished[id(c)] for c in cells if id(c) in finished]
        try:
            write_all(results, config.output_dir)
        except OSError as e:
            raise QuantarenaError(f"cannot write the results files in {config.output_dir}: {e.strerror}") from None

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        sweep = progress.add_task("cells", total=len(todo))
        inner = progress.add_task("", total=None, visible=False)

        def progress_for(cell: Cell):
            progress.update(sweep, description=f"cells ({cell.label})")
            progress.reset(inner, total=None, description=f"  {cell.task.label}", visible=True)
            return lambda done, total: progress.update(inner, completed=done, total=total)

        def on_result(cell: Cell, result: CellResult) -> None:
            store.put(keys[id(cell)], result)
            finished[id(cell)] = result
            publish()
            progress.advance(sweep)
            if result.status != "ok":
                console.print(Text(f"{cell.label}: {result.status}: {result.reason}", style="yellow"))

        try:
            publish()
            EXECUTORS[config.executor](todo, on_result, progress_for, config)
        finally:
            store.close()
    # Charts, statistics and the HTML page once at the end: too slow to redraw after every cell.
    write_report(load_runs([config.output_dir]), config.output_dir)
    return results


def report(results: Results, console: Console | None = None) -> None:
    print_tables(results, console)
