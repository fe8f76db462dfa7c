"""Where the local executor's worker processes come from: a fork server that has imported torch, transformers
and quantarena once, so each worker starts ready instead of spending seconds on imports.

Importing this module is cheap (no torch): the CLI starts the server first thing, so its imports overlap with
the sweep's own checks. A worker forked from the server gets the caller's environment and working directory
as they are now (the server's are those of when it started). Where fork servers do not exist (Windows),
workers are spawned.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing as mp
import os
import signal
import sys
import threading
from typing import Any

# Imported by the server before it forks workers.
PRELOAD = ["quantarena.sweep.preload"]


def context() -> Any:
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start() -> None:
    """Start the fork server now (it imports in the background); later workers fork from it."""
    if "forkserver" in mp.get_all_start_methods():
        context()
        from multiprocessing import forkserver

        forkserver.ensure_running()


def stop() -> None:
    """End the fork server now (a process about to exit): it would otherwise tear down its imports after this
    process has gone, holding the terminal's output open for a second or two. Killed first, then forgotten by
    multiprocessing (its ``_stop``), so a later ``start`` starts a new one."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None or not hasattr(server, "_stop"):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    server._stop()


def caller_state() -> dict[str, Any]:
    return {"environ": dict(os.environ), "cwd": os.getcwd()}


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when its parent ends (the sweep, or the fork server, which ends with
    the sweep), so a killed sweep leaves no worker running on."""
    libc = ctypes.util.find_library("c")
    if libc and sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(libc, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def adopt(state: dict[str, Any]) -> None:
    """In a worker: the environment and directory of the process that asked for it, and its lifetime.

    Also gives tqdm (transformers' loading bars, created even when disabled) a thread lock: its default is a
    multiprocessing semaphore, which a worker killed once its results are in would leave for the resource
    tracker to report as leaked.
    """
    _die_with_parent()
    os.environ.clear()
    os.environ.update(state["environ"])
    os.chdir(state["cwd"])
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())
