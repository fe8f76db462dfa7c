"""Where the local executor's worker processes come from: a fork server that has imported torch, transformers
and quantarena once, so each worker starts ready instead of spending seconds on imports.

Importing this module is cheap (no torch): the CLI starts the server first thing, so its imports overlap with
the sweep's own checks. A worker forked from the server gets the caller's environment and working directory
as they are now (the server's are those of when it started). Where fork servers do not exist (Windows),
workers are spawned.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from typing import Any

# Imported by the server before it forks workers; a module missing in another transformers version is skipped.
PRELOAD = [
    "quantarena.sweep.variant",
    "transformers.modeling_utils",
    "transformers.cache_utils",
    "transformers.core_model_loading",
    "transformers.models.auto.modeling_auto",
]


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


def caller_state() -> dict[str, Any]:
    return {"environ": dict(os.environ), "cwd": os.getcwd()}


def adopt(state: dict[str, Any]) -> None:
    """In a worker: the environment and directory of the process that asked for it.

    Also gives tqdm (transformers' loading bars, created even when disabled) a thread lock: its default is a
    multiprocessing semaphore, which a worker killed once its results are in would leave for the resource
    tracker to report as leaked.
    """
    os.environ.clear()
    os.environ.update(state["environ"])
    os.chdir(state["cwd"])
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())
