"""Quantized checkpoints on disk, content-addressed by everything that determines them.

A variant (a model with one method applied) is quantized once; later sweeps that add a task, resume, or
measure it again reload its checkpoint instead. The key is a sha256 of the model's digest (weights, config,
tokenizer), the method and its options, the calibration data's digest, the device, the seed and the library
versions (``plan.Variant.identity``). An entry is written under a temporary name and renamed into place,
so a crash never leaves half an entry; every file's size and sha256 are recorded and checked before a
reload, so a truncated or bit-rotted checkpoint is found, dropped and rebuilt rather than measured.

Layout: ``<root>/<key>/checkpoint/`` (what the method's ``save`` wrote) and ``<root>/<key>/variant.json``
(the identity, the files' digests, and the quantization's own figures: ``quantize_s``, ``disk_bytes``...).
Variants that are quantized again in every run (casts; methods without a loader) keep only their measured
size, ``<root>/<key>.json``, so no run saves them again just to measure it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantarena.data import file_sha256
from quantarena.measure import dir_bytes, timed
from quantarena.results import write_atomic

RECORD_FILE = "variant.json"
CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class Entry:
    checkpoint: Path
    record: dict[str, Any]  # quantize_s, load_s, save_s, disk_bytes of the run that quantized it


def _manifest(folder: Path) -> dict[str, list]:
    return {
        str(f.relative_to(folder)): [f.stat().st_size, file_sha256(f)] for f in sorted(folder.rglob("*")) if f.is_file()
    }


class VariantCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _dir(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> tuple[Entry | None, str | None]:
        """The verified entry, or None and why an entry that was there is unusable (then it is removed)."""
        folder = self._dir(key)
        if not folder.is_dir():
            return None, None
        problem = self._problem(folder)
        if problem:
            self.drop(key)
            return None, f"cached checkpoint was unusable ({problem}); quantized again"
        record = json.loads((folder / RECORD_FILE).read_text())
        return Entry(folder / CHECKPOINT_DIR, record), None

    @staticmethod
    def _problem(folder: Path) -> str | None:
        try:
            record = json.loads((folder / RECORD_FILE).read_text())
            expected = record["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{RECORD_FILE} missing or unreadable"
        checkpoint = folder / CHECKPOINT_DIR
        have = {str(f.relative_to(checkpoint)) for f in checkpoint.rglob("*") if f.is_file()}
        if have != set(expected):
            return f"files differ from the recorded ones ({', '.join(sorted(have ^ set(expected))[:3])})"
        for name, (size, sha) in expected.items():
            path = checkpoint / name
            if path.stat().st_size != size:
                return f"{name} is {path.stat().st_size} bytes, {size} were written"
            if file_sha256(path) != sha:
                return f"{name} does not match its recorded sha256"
        return None

    def put(self, key: str, save: Callable[[Path], None], record: dict[str, Any]) -> Entry:
        """``save(folder)`` writes the checkpoint; the entry replaces any earlier one under ``key``."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key[:16]}-"))
        try:
            checkpoint = tmp / CHECKPOINT_DIR
            with timed() as saving:
                save(checkpoint)
            record = record | {
                "save_s": saving.seconds,
                "disk_bytes": dir_bytes(checkpoint),
                "files": _manifest(checkpoint),
            }
            write_atomic(tmp / RECORD_FILE, json.dumps(record, indent=1, sort_keys=True))
            self.drop(key)
            os.replace(tmp, self._dir(key))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Entry(self._dir(key) / CHECKPOINT_DIR, record)

    def figures(self, key: str) -> dict[str, Any] | None:
        """The measured size of a variant kept without its checkpoint."""
        try:
            figures = json.loads((self.root / f"{key}.json").read_text())
            return {k: figures[k] for k in ("disk_bytes", "save_s")}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put_figures(self, key: str, figures: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / f"{key}.json", json.dumps(figures, indent=1, sort_keys=True))

    def drop(self, key: str) -> None:
        folder = self._dir(key)
        if folder.exists():
            # Renamed away first, so a reader never sees a half-deleted entry.
            trash = Path(tempfile.mkdtemp(dir=self.root, prefix=".drop-"))
            os.replace(folder, trash / key)
            shutil.rmtree(trash, ignore_errors=True)
