"""The project's C++ CPU kernels (``csrc/``): built by PyTorch's extension builder on first use, cached under
``TORCH_EXTENSIONS_DIR`` and rebuilt only when the source changes."""

from __future__ import annotations

from pathlib import Path

import torch

from quantarena.environment import cxx_compiler

# OpenMP: at::parallel_for is inline, compiled into each extension. No contraction: kernels that must reproduce
# another computation's rounding say where they fuse.
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]


def build_avx2_extension(name: str, source: Path) -> str | None:
    """Build and load an AVX2 extension whose ops register themselves; why it cannot run here, or None."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"needs AVX2 (this CPU: {torch.backends.cpu.get_cpu_capability()})"
    if cxx_compiler() is None:
        return "needs a C++ compiler to build it (none on PATH)"
    from torch.utils.cpp_extension import is_ninja_available, load

    if not is_ninja_available():
        return "needs ninja to build it (pip install ninja)"
    try:
        load(name, [str(source)], extra_cflags=AVX2_FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
    except (RuntimeError, OSError) as error:  # a compiler that cannot build it: the caller's fallback runs
        lines = str(error).strip().splitlines()
        return f"its build failed: {lines[-1] if lines else type(error).__name__}"
    return None
