"""quantarena: which quantization should I use, and what does it cost me?

The names below are imported on first use, so ``import quantarena`` (and any of its lower modules: models,
data, measure) stays cheap and loads no backend, task or report code until it is needed.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "run": "quantarena.sweep.api",
    "prepare": "quantarena.sweep.api",
    "lm_eval_model": "quantarena.sweep.api",
    "SweepConfig": "quantarena.config",
    "load_config": "quantarena.config",
    "sweep_config": "quantarena.config",
    "ConfigError": "quantarena.errors",
    "DataError": "quantarena.errors",
    "ModelError": "quantarena.errors",
    "QuantarenaError": "quantarena.errors",
    "CellResult": "quantarena.results",
    "Results": "quantarena.results",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quantarena' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
