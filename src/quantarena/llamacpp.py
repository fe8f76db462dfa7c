"""llama.cpp's own tools, run as programs: ``convert_hf_to_gguf.py``, ``llama-imatrix``, ``llama-quantize`` and
``llama-bench``, built by ``scripts/build_llama_cpp.sh`` into ``$QUANTARENA_LLAMA_CPP`` (default
``~/.cache/quantarena/llama.cpp-VERSION``). Every failure is one line naming the tool and its last words."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from quantarena.errors import QuantarenaError

NAME = "llama.cpp"
VERSION = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp is built
ENV = "QUANTARENA_LLAMA_CPP"
BUILD = "bash scripts/build_llama_cpp.sh"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-bench")


class LlamaCppError(QuantarenaError):
    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode  # negative: killed by that signal


def root() -> Path:
    default = Path.home() / ".cache" / "quantarena" / f"llama.cpp-{VERSION}"
    return Path(os.environ.get(ENV) or default).expanduser()


def tool(name: str) -> Path:
    return root() / "build" / "bin" / name


def converter() -> Path:
    return root() / "src" / "convert_hf_to_gguf.py"


def unmet() -> str | None:
    """Why llama.cpp's tools cannot run here, or None."""
    missing = [name for name in TOOLS if not os.access(tool(name), os.X_OK)]
    if not converter().is_file():
        missing.append(converter().name)
    if missing:
        return f"needs llama.cpp's {', '.join(missing)} in {root()} (not built; {BUILD}, or set {ENV})"
    return None


def version() -> str:
    stamp = root() / "VERSION"
    return stamp.read_text().strip() if stamp.is_file() else "unbuilt"


def threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run(what: str, args: list[str | Path]) -> str:
    problem = unmet()
    if problem:
        raise LlamaCppError(f"{what}: {problem}")
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        message = f"{what} failed (exit {done.returncode}): {said[-1] if said else 'no output'}"
        raise LlamaCppError(message, done.returncode)
    return done.stdout


def convert(model_dir: Path, out: Path) -> Path:
    """A Hugging Face folder -> an f32 GGUF (the exact float weights, llama.cpp's tensor names and layout)."""
    _run("convert_hf_to_gguf.py", [sys.executable, converter(), model_dir, "--outtype", "f32", "--outfile", out])
    return out


def imatrix(model: Path, text: Path, out: Path, context: int, chunks: int) -> Path:
    """llama.cpp's importance matrix (mean squared activation per input column) over ``chunks`` of ``text``."""
    args = [tool("llama-imatrix"), "-m", model, "-f", text, "-o", out, "-c", context, "--chunks", chunks]
    _run("llama-imatrix", [*args, "-t", threads(), "--no-ppl"])
    return out


def quantize(model: Path, out: Path, file_type: str, importance: Path | None = None) -> Path:
    """``llama-quantize`` to a file type (``Q4_K_M``, ``IQ4_XS``, ...): llama.cpp picks each tensor's type."""
    extra: list[str | Path] = ["--imatrix", importance] if importance else []
    _run("llama-quantize", [tool("llama-quantize"), *extra, model, out, file_type, threads()])
    return out


def bench(model: Path, prompts: list[int], new_tokens: int, depth: int, repeats: int = 1) -> dict[str, Any]:
    """llama.cpp's own runtime on this CPU (``llama-bench``, all threads): prefill ms of each prompt length from an
    empty context, and batch-1 decode ms/token of ``new_tokens`` after ``depth`` tokens; medians of ``repeats``.

    Weights are repacked for the CPU's kernels as llama.cpp does by default; where that crashes (its AMX kernels
    segfault on prompts on some Xeons, llama.cpp issue 20824), the file is timed unrepacked and the result says so.
    """
    args = [tool("llama-bench"), "-m", model, "-p", ",".join(map(str, prompts)), "-n", new_tokens]
    args += ["-d", f"0,{depth}", "-r", repeats, "-t", threads(), "-o", "json"]
    repacked: bool | str = True
    try:
        records = json.loads(_run("llama-bench", args))
    except LlamaCppError as crash:
        if crash.returncode is None or crash.returncode >= 0:
            raise
        records = json.loads(_run("llama-bench", [*args, "--repack", 0]))
        repacked = f"no: with repacking, {crash}"

    def median_ms(record: dict[str, Any]) -> float:
        return statistics.median(record["samples_ns"]) / 1e6

    prefill = {r["n_prompt"]: median_ms(r) for r in records if r["n_gen"] == 0 and r["n_depth"] == 0}
    decode = next(median_ms(r) / new_tokens for r in records if r["n_gen"] == new_tokens and r["n_depth"] == depth)
    return {
        "prefill_ms": {str(n): prefill[n] for n in prompts},
        "decode_ms_per_token": decode,
        "threads": records[0]["n_threads"],
        "build_commit": records[0]["build_commit"],
        "repacked": repacked,
    }
