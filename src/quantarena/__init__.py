"""quantarena: which quantization should I use, and what does it cost me?"""

from quantarena.api import prepare, run
from quantarena.config import SweepConfig, load_config, sweep_config
from quantarena.errors import ConfigError, DataError, ModelError, QuantarenaError
from quantarena.results import CellResult, Results

__all__ = [
    "CellResult",
    "ConfigError",
    "DataError",
    "ModelError",
    "QuantarenaError",
    "Results",
    "SweepConfig",
    "load_config",
    "prepare",
    "run",
    "sweep_config",
]
