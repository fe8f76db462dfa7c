"""llmcompressor, run as a program in its own environment (``scripts/setup_llmcompressor.sh``): llmcompressor 0.14
pins transformers<=5.17 and compressed-tensors 0.19, older than this project's, so it cannot share them. The
environment sees the installed torch; ``llmc_worker.py`` runs one ``oneshot`` there and writes a
compressed-tensors checkpoint, which this environment's transformers loads."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from quantarena.errors import QuantarenaError

NAME = "llmcompressor"
VERSION = "0.14.0.1"
ENV = "QUANTARENA_LLMCOMPRESSOR"
SETUP = "bash scripts/setup_llmcompressor.sh"
WORKER = Path(__file__).with_name("llmc_worker.py")


class LlmCompressorError(QuantarenaError):
    pass


def root() -> Path:
    default = Path.home() / ".cache" / "quantarena" / f"llmcompressor-{VERSION}"
    return Path(os.environ.get(ENV) or default).expanduser()


def python() -> Path:
    return root() / "bin" / "python"


def unmet() -> str | None:
    if not os.access(python(), os.X_OK):
        return f"needs llmcompressor's environment in {root()} (not installed; {SETUP}, or set {ENV})"
    return None


def version() -> str:
    return VERSION if unmet() is None else "not installed"


def oneshot(job: dict[str, Any], job_file: Path) -> None:
    """Run one job (see ``llmc_worker``); a failure is one line with llmcompressor's last words."""
    problem = unmet()
    if problem:
        raise LlmCompressorError(problem)
    job_file.write_text(json.dumps(job))
    done = subprocess.run([str(python()), str(WORKER), str(job_file)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(" ")]
        raise LlmCompressorError(f"llmcompressor failed (exit {done.returncode}): {said[-1] if said else 'no output'}")
