"""Test-only methods and tasks that break the worker process in the ways native backends do, or use memory in
one phase only."""

import ctypes
import time
from dataclasses import replace

import torch
from pydantic import NonNegativeFloat, PositiveInt

from quantarena.methods.base import Method, MethodConfig, register
from quantarena.tasks.base import TaskConfig, TaskOutput
from quantarena.tasks.base import register as register_task
from quantarena.tasks.perplexity import Perplexity


class SleepConfig(MethodConfig):
    seconds: NonNegativeFloat = 1.0


class AllocateConfig(MethodConfig):
    megabytes: PositiveInt = 400


def _segfault(model, config):
    ctypes.string_at(0)


def _sleep(model, config: SleepConfig):
    time.sleep(config.seconds)
    return model


def _import_error(model, config):
    import quantarena_backend_that_does_not_exist  # noqa: F401


def _allocate_while_quantizing(model, config: AllocateConfig):
    """Holds a buffer of ``megabytes`` while quantizing (as a backend's scratch space would), then frees it."""
    scratch = bytearray(config.megabytes << 20)
    scratch[::4096] = b"\x01" * len(scratch[::4096])  # touch every page, so it is resident
    del scratch
    return model


def _nan_weights(model, config):
    """What an fp16 overflow does: non-finite numbers in the forward."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data.fill_(float("nan"))
            break
    return model


# They replace no layer: declared, so the sweep does not skip them as methods that quantized nothing.
for _method in (
    Method("test-segfault", "dereferences NULL in the worker", _segfault),
    Method("test-sleep", "sleeps, then leaves the model as is", _sleep, SleepConfig),
    Method("test-import-error", "imports a missing native backend", _import_error),
    Method("test-allocate", "uses memory while quantizing only", _allocate_while_quantizing, AllocateConfig),
    Method("test-nan", "fills a Linear weight with NaN", _nan_weights),
):
    register(replace(_method, quantizes_layers=False))


class CrashConfig(TaskConfig):
    pass


@register_task
class CrashingTask(Perplexity):
    """A task whose evaluation kills its worker (as a native kernel's segfault would)."""

    name = "test-crash"
    description = "dereferences NULL while evaluating"
    Config = CrashConfig

    def load(self) -> str:
        return ""

    def evaluate(self, ctx, data) -> TaskOutput:
        ctypes.string_at(0)
