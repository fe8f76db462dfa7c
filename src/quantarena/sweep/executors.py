"""Executors run a sweep's jobs (a variant and its cells) and hand each result back as soon as it exists.

``local`` (the default) runs each variant in a fresh child process: a segfault, out-of-memory kill, import
error or hang in a native backend takes down only the cell it happened in, and the variant's remaining cells
continue in a new child, which reloads the variant from the checkpoint cache. ``inline`` runs in this process
(fast, for tests and debugging; nothing is isolated). ``ray`` runs each variant as a Ray generator task,
streaming its results, on a local Ray instance or a cluster; a lost worker is handled as a crashed child.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from quantarena.config import SweepConfig, import_plugins
from quantarena.errors import ConfigError
from quantarena.registry import Registry
from quantarena.sweep import workers
from quantarena.sweep.plan import Cell, Job
from quantarena.sweep.variant import Event, Finished, Progress, Started, run_job

OnEvent = Callable[[Job, Event], None]
Executor = Callable[[list[Job], OnEvent, Progress, SweepConfig], None]
EXECUTORS: Registry[Executor] = Registry("executor")


@dataclass(frozen=True)
class Lost:
    """A worker that ended without reporting every cell: which step it was in, and why it ended."""

    cell_key: str | None  # None: while loading and quantizing the variant
    reason: str


def run_isolated(job: Job, on_event: OnEvent, attempt: Callable[[Job, Callable[[Event], None]], Lost | None]) -> None:
    """Run ``job`` through ``attempt`` (one worker) until every cell has a result.

    A worker lost in a cell fails that cell only; the rest go to a fresh worker. Lost while preparing the
    variant, every remaining cell fails: a second attempt would crash the same way.
    """
    remaining: dict[str, Cell] = {cell.key(): cell for cell in job.cells}

    def track(event: Event) -> None:
        if isinstance(event, Finished):
            remaining.pop(event.cell_key, None)
        on_event(job, event)

    while remaining:
        lost = attempt(replace(job, cells=tuple(remaining.values())), track)
        if not remaining:
            break
        if lost is None:
            lost = Lost(next(iter(remaining)), "worker process ended before reporting a result")
        failed = list(remaining) if lost.cell_key is None else [lost.cell_key]
        for key in failed:
            if key in remaining:
                track(Finished(key, remaining[key].result("failed", lost.reason)))


# ---- local: a child process per variant -----------------------------------------------------------


def _child(job: Job, conn, state: dict) -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it, killing this child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    workers.adopt(state)
    try:
        import_plugins(list(job.plugins))
        for event in run_job(job, lambda done, total: conn.send((done, total))):
            conn.send(event)
    finally:
        conn.close()


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"worker process killed by {name}{hint}"
    return f"worker process exited with code {exitcode} before reporting a result"


def in_child(job: Job, on_event: Callable[[Event], None], progress: Progress, timeout_s: float | None) -> Lost | None:
    """One child process for ``job``; each step (preparing the variant, each cell) gets ``timeout_s``."""
    ctx = workers.context()
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(job, send, workers.caller_state()), daemon=True)
    process.start()
    send.close()
    step: str | None = None
    unreported = len(job.cells)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while unreported:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not receive.poll(remaining):
                return Lost(step, f"timed out after {timeout_s:g} s")
            try:
                message = receive.recv()
            except EOFError:
                process.join(10)  # the child closed its end: it is exiting
                break
            if isinstance(message, tuple):
                progress(*message)
                continue
            if isinstance(message, Started):
                step = message.cell_key
                deadline = None if timeout_s is None else time.monotonic() + timeout_s
            else:
                unreported -= 1
            on_event(message)
    finally:
        # Killed once every result is in: tearing down an interpreter with torch loaded takes seconds.
        if process.is_alive():
            process.kill()
        process.join()
    return None if not unreported or process.exitcode == 0 else Lost(step, _exit_reason(process.exitcode))


def run_local(jobs: list[Job], on_event: OnEvent, progress: Progress, config: SweepConfig) -> None:
    for job in jobs:
        run_isolated(job, on_event, lambda j, emit: in_child(j, emit, progress, config.cell_timeout_s))


def run_inline(jobs: list[Job], on_event: OnEvent, progress: Progress, config: SweepConfig) -> None:
    for job in jobs:
        for event in run_job(job, progress):
            on_event(job, event)


# ---- ray: a generator task per variant --------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().split("\n")[0]


def _ray_job(job: Job):
    import_plugins(list(job.plugins))
    yield from run_job(job, lambda done, total: None)


def _init_ray(address: str | None):
    try:
        import ray
    except ImportError:
        raise ConfigError("executor 'ray' needs the ray package: pip install 'quantarena[ray]'") from None
    if ray.is_initialized():
        return ray, False
    # Workers of a local instance run this same Python: give them this process's import path so plugins
    # importable here import there too. A cluster's workers need them installed.
    runtime_env = None if address else {"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}}
    ray.init(address=address, runtime_env=runtime_env, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    return ray, True


def run_ray(jobs: list[Job], on_event: OnEvent, progress: Progress, config: SweepConfig) -> None:
    """Variants as Ray generator tasks, all submitted at once; results are stored here as they stream in.

    A worker that dies fails the cell it was in, and the variant's other cells go to a new task. The
    per-step timeout applies to the local executor only.
    """
    ray, started_here = _init_ray(config.ray_address)
    remote = ray.remote(max_retries=0)(_ray_job)

    @dataclass
    class Running:
        job: Job
        remaining: dict[str, Cell]
        step: str | None = None

    def submit(job: Job) -> None:
        gpus = 1 if job.variant.device == "cuda" else 0
        running[remote.options(num_cpus=1, num_gpus=gpus).remote(job)] = Running(job, {c.key(): c for c in job.cells})

    def lose(state: Running, reason: str) -> None:
        failed = list(state.remaining) if state.step is None else [state.step]
        for key in failed:
            on_event(state.job, Finished(key, state.remaining.pop(key).result("failed", reason)))
        if state.remaining:
            submit(replace(state.job, cells=tuple(state.remaining.values())))

    running: dict = {}
    for job in jobs:
        submit(job)
    try:
        while running:
            (generator,), _ = ray.wait(list(running), num_returns=1)
            state = running[generator]
            try:
                event = ray.get(next(generator))
            except StopIteration:
                del running[generator]
                if state.remaining:
                    state.step = next(iter(state.remaining))
                    lose(state, "ray task ended before reporting a result")
                continue
            except ray.exceptions.RayError as e:
                del running[generator]
                cause = getattr(e, "cause", None) or e
                lose(state, f"ray task failed: {type(cause).__name__}: {_first_line(cause)}")
                continue
            if isinstance(event, Started):
                state.step = event.cell_key
            else:
                state.remaining.pop(event.cell_key, None)
            on_event(state.job, event)
    finally:
        for generator in running:
            ray.cancel(generator, force=True)
        if started_here:
            ray.shutdown()


EXECUTORS.register("local", run_local)
EXECUTORS.register("inline", run_inline)
EXECUTORS.register("ray", run_ray)
