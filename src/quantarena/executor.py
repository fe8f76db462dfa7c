"""Executors run a sweep's cells and hand each result back as soon as it exists.

``local`` (the default) runs each cell in a fresh child process: each cell gets its own honest peak
memory, and a segfault, out-of-memory kill, import error or hang in a native backend takes down
only that cell. ``inline`` runs cells in this process (fast, for tests and debugging). ``ray`` runs
cells as Ray tasks with their resource needs, on a local Ray instance or a cluster.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import sys
import time
from collections.abc import Callable

from quantarena.cell import Cell, run_cell
from quantarena.config import SweepConfig, import_plugins
from quantarena.errors import ConfigError
from quantarena.results import CellResult

Progress = Callable[[int, int], None]
OnResult = Callable[[Cell, CellResult], None]
ProgressFor = Callable[[Cell], Progress]


def _child(cell: Cell, conn) -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it, killing this child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import_plugins(list(cell.plugins))
        result = run_cell(cell, lambda done, total: conn.send(("progress", (done, total))))
        conn.send(("result", result))
    finally:
        conn.close()


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"worker process killed by {name}{hint}"
    return f"worker process exited with code {exitcode} before reporting a result"


def run_in_child(cell: Cell, progress: Progress, timeout_s: float | None = None) -> CellResult:
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(cell, send), daemon=True)
    process.start()
    send.close()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    result = None
    try:
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not receive.poll(remaining):
                process.kill()
                return cell.result("failed", f"timed out after {timeout_s:g} s")
            try:
                kind, payload = receive.recv()
            except EOFError:
                break
            if kind == "progress":
                progress(*payload)
            else:
                result = payload
    finally:
        if result is None:
            process.kill()
        process.join()
    return result or cell.result("failed", _exit_reason(process.exitcode))


def run_local(cells: list[Cell], on_result: OnResult, progress_for: ProgressFor, config: SweepConfig) -> None:
    for cell in cells:
        on_result(cell, run_in_child(cell, progress_for(cell), config.cell_timeout_s))


def run_inline(cells: list[Cell], on_result: OnResult, progress_for: ProgressFor, config: SweepConfig) -> None:
    for cell in cells:
        on_result(cell, run_cell(cell, progress_for(cell)))


def _first_line(error: BaseException) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().split("\n")[0]


def _ray_cell(cell: Cell) -> CellResult:
    import_plugins(list(cell.plugins))
    return run_cell(cell)


def run_ray(cells: list[Cell], on_result: OnResult, progress_for: ProgressFor, config: SweepConfig) -> None:
    """Cells as Ray tasks; the driver (this process) writes every result to the store as it arrives.

    Ray isolates each task in a worker process; a worker that dies fails its cell alone. The per-cell
    timeout applies to the local executor only.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("executor 'ray' needs the ray package: pip install 'quantarena[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        # Workers of a local instance run this same Python: give them this process's import path so
        # plugins importable here import there too. A cluster's workers need them installed.
        runtime_env = None if config.ray_address else {"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}}
        ray.init(
            address=config.ray_address,
            runtime_env=runtime_env,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    task = ray.remote(max_retries=0)(_ray_cell)
    pending = {
        task.options(num_cpus=1, num_gpus=1 if cell.device == "cuda" else 0).remote(cell): cell for cell in cells
    }
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                result = cell.result("failed", f"ray task failed: {type(cause).__name__}: {_first_line(cause)}")
            on_result(cell, result)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


EXECUTORS = {"local": run_local, "inline": run_inline, "ray": run_ray}
