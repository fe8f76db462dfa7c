"""Runs cells one at a time, each in a fresh child process by default.

A child per cell gives each cell its own honest peak memory, and a segfault, out-of-memory kill
or hang in a native backend takes down only that cell.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from collections.abc import Callable

from quantarena.cell import Cell, run_cell
from quantarena.results import CellResult

Progress = Callable[[int, int], None]


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _child(cell: Cell, conn) -> None:
    _quiet()
    try:
        result = run_cell(cell, lambda done, total: conn.send(("progress", (done, total))))
        conn.send(("result", result))
    finally:
        conn.close()


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"worker process killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"worker process exited with code {exitcode} before reporting a result"


def run_in_child(cell: Cell, progress: Progress) -> CellResult:
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(cell, send), daemon=True)
    process.start()
    send.close()
    result = None
    try:
        while True:
            try:
                kind, payload = receive.recv()
            except EOFError:
                break
            if kind == "progress":
                progress(*payload)
            else:
                result = payload
    except BaseException:
        process.kill()
        raise
    finally:
        process.join()
    return result or cell.result("failed", _exit_reason(process.exitcode))


def run_inline(cell: Cell, progress: Progress) -> CellResult:
    return run_cell(cell, progress)
