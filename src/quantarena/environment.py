"""Library versions and hardware, recorded with every result so numbers can be traced and compared."""

from __future__ import annotations

import os
import platform
import shutil
from importlib import metadata

import torch

from quantarena.errors import ConfigError

PACKAGES = (
    "quantarena",
    "torch",
    "transformers",
    "safetensors",
    "accelerate",
    "numpy",
    "gguf",
    "bitsandbytes",
    "optimum-quanto",
    "torchao",
    "hqq",
    "peft",
    "triton",
)


def cxx_compiler() -> str | None:
    """The C++ compiler on PATH that Inductor's and torch's extension builds call (``c++``, else ``g++``), or None."""
    return shutil.which("c++") or shutil.which("g++")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    hardware = {
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hardware |= {
            "gpu": props.name,
            "gpu_compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
        }
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: v for p in PACKAGES if (v := package_version(p))},
        "hardware": hardware,
    }


def check_device(device: str) -> None:
    """Refuse a CUDA run on a machine without a CUDA GPU, before any work."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available here; use device = 'cpu'")
