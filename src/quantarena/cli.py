"""Command line: a thin layer that turns flags into a config and calls the API."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from quantarena import api
from quantarena.config import read_toml, sweep_config, tomllib
from quantarena.errors import QuantarenaError
from quantarena.methods import METHODS
from quantarena.results import Results
from quantarena.tasks import TASKS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Quantize a model many ways and compare.")
# Off a terminal (CI logs, pipes) Rich would wrap tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)


def _user_errors(fn):
    """Bad input ends as one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QuantarenaError as e:
            err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _entry(spec: str) -> dict[str, Any]:
    """'own-int4:group_size=64,label=g64' -> {'name': 'own-int4', 'group_size': 64, 'label': 'g64'}."""
    name, _, options = spec.partition(":")
    entry: dict[str, Any] = {"name": name}
    for option in filter(None, options.split(",")):
        key, sep, value = option.partition("=")
        if not sep:
            raise QuantarenaError(f"option {option!r} in {spec!r} is not KEY=VALUE")
        entry[key.strip()] = _value(value.strip())
    return entry


@app.command()
@_user_errors
def run(
    config: Annotated[Path | None, typer.Argument(help="TOML sweep config; flags override its values")] = None,
    model: Annotated[list[str] | None, typer.Option(help="folder, .gguf, pypi:PACKAGE or cached hub id")] = None,
    method: Annotated[list[str] | None, typer.Option(help="NAME or NAME:key=value,... (repeatable)")] = None,
    task: Annotated[list[str] | None, typer.Option(help="NAME or NAME:key=value,... (repeatable)")] = None,
    baseline: Annotated[str | None, typer.Option(help="method label the others are compared with")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    output_dir: Annotated[Path | None, typer.Option()] = None,
    data_dir: Annotated[Path | None, typer.Option(help="folder of the offline datasets ($QUANTARENA_DATA_DIR)")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    isolation: Annotated[str | None, typer.Option(help="process (a child per cell) or none")] = None,
) -> None:
    """Run a sweep: every model × method × task, written to the output dir as each cell finishes."""
    raw = read_toml(config) if config else {}
    flags = {
        "models": model,
        "methods": [_entry(m) for m in method or []],
        "tasks": [_entry(t) for t in task or []],
        "baseline": baseline,
        "device": device,
        "batch_size": batch_size,
        "output_dir": output_dir,
        "data_dir": data_dir,
        "seed": seed,
        "isolation": isolation,
    }
    if raw.get("model") and model:
        raw.pop("model")
    cfg = sweep_config(raw | {k: v for k, v in flags.items() if v})
    results = api.run(cfg)
    api.report(results, console)
    console.print(f"results: {cfg.output_dir}/results.json, results.csv, results.md")
    if any(c.status == "failed" for c in results.cells):
        raise typer.Exit(1)


@app.command()
@_user_errors
def report(results_dir: Annotated[Path, typer.Argument(help="output dir of a run")]) -> None:
    """Rebuild the tables and views of a finished run from its results.json, without rerunning."""
    path = results_dir / "results.json"
    if not path.is_file():
        raise QuantarenaError(f"{path} does not exist: give the output dir of a quantarena run")
    results = Results.read(path)
    from quantarena.report import write_all

    write_all(results, results_dir)
    api.report(results, console)


@app.command("list")
def list_() -> None:
    """Methods and tasks this installation knows, and whether each method can run here."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = Table("method", "description", f"on {device}", title="methods")
    for m in METHODS:
        methods.add_row(m.name, m.description, m.requires.unmet(device) or "ok")
    tasks = Table("task", "model kind", "description", title="tasks")
    for t in TASKS:
        tasks.add_row(t.name, t.model_kind, t.description)
    console.print(methods, tasks)


def main() -> None:
    sys.exit(app())
