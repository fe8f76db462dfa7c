"""Test-only methods that break the worker process in the ways native backends do."""

import ctypes
import time

from pydantic import NonNegativeFloat

from quantarena.methods.base import Method, MethodConfig, register


class SleepConfig(MethodConfig):
    seconds: NonNegativeFloat = 1.0


def _segfault(model, config):
    ctypes.string_at(0)


def _sleep(model, config: SleepConfig):
    time.sleep(config.seconds)
    return model


def _import_error(model, config):
    import quantarena_backend_that_does_not_exist  # noqa: F401


register(Method("test-segfault", "dereferences NULL in the worker", _segfault))
register(Method("test-sleep", "sleeps, then leaves the model as is", _sleep, SleepConfig))
register(Method("test-import-error", "imports a missing native backend", _import_error))
