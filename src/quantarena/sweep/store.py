"""The results store: an SQLite file in the output dir, one row per cell, keyed by what determines it.

SQLite commits are atomic and durable, so a sweep killed at any instant keeps every cell it had finished and
never a half-written one. The store is the source of truth: every view (JSON, CSV, Markdown, HTML, charts) is
derived from all of it. The latest run's plan decides the order of its cells and hides older records under
the same (model, method, task) labels; records of earlier runs into the same dir that the latest did not
redo stay in the views after it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quantarena.errors import QuantarenaError, first_line
from quantarena.results import CellResult, Results, read_results

STORE_FILE = "results.sqlite"
RESULTS_FILE = "results.json"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    record TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    baseline TEXT NOT NULL,
    environment TEXT NOT NULL,
    config TEXT NOT NULL,
    plan TEXT NOT NULL
);
"""


# PRAGMA user_version of the stores this version writes; 0 is a store of the first version (cells only).
STORE_VERSION = 2
COLUMNS = {"cells": ["key", "status", "record", "finished_at"]}


class Store:
    """``writable``: checked (and the tables made) at once, so a store that cannot take results is refused before
    any work rather than after the first result, which would be lost."""

    def __init__(self, output_dir: Path, writable: bool = True):
        self.path = Path(output_dir) / STORE_FILE
        if self.path.exists() and not self.path.is_file():
            raise QuantarenaError(f"results store {self.path} is not a file")
        if not writable and not self.path.is_file():
            raise QuantarenaError(f"{output_dir} holds no {STORE_FILE}")
        try:
            self._db = sqlite3.connect(self.path)
            self._check()
            if writable:
                with self._db:
                    self._db.executescript(_SCHEMA)
                    self._db.execute(f"PRAGMA user_version = {STORE_VERSION}")
        except sqlite3.DatabaseError as e:
            raise QuantarenaError(f"results store {self.path} cannot be used: {e}") from None

    def _check(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > STORE_VERSION:
            raise QuantarenaError(
                f"results store {self.path} was written by a newer quantarena (store version {version}, this one "
                f"knows {STORE_VERSION}): use that version, or another output dir"
            )
        health = self._db.execute("PRAGMA quick_check").fetchone()[0]
        if health != "ok":
            raise QuantarenaError(f"results store {self.path} is damaged ({health}); move it away to start afresh")
        for table, expected in COLUMNS.items():
            columns = [row[1] for row in self._db.execute(f"PRAGMA table_info({table})")]
            if columns and columns != expected:
                raise QuantarenaError(
                    f"results store {self.path} is not a quantarena store (its {table} table has columns "
                    f"{', '.join(columns)}); move it away or use another output dir"
                )

    def _record(self, key: str, text: str) -> CellResult:
        try:
            return CellResult(**json.loads(text))
        except (ValueError, TypeError) as e:
            raise QuantarenaError(
                f"results store {self.path}: the record of cell {key[:12]} is unreadable ({first_line(e)}); "
                "move the store away to start afresh"
            ) from None

    def _write(self, sql: str, params: tuple) -> None:
        try:
            with self._db:
                self._db.execute(sql, params)
        except sqlite3.Error as e:
            raise QuantarenaError(f"cannot write to the results store {self.path}: {e}") from None

    def get(self, key: str) -> CellResult | None:
        row = self._db.execute("SELECT record FROM cells WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._record(key, row[0])

    def put(self, key: str, result: CellResult) -> None:
        self._write(
            "INSERT OR REPLACE INTO cells (key, status, record, finished_at) VALUES (?, ?, ?, ?)",
            (key, result.status, json.dumps(asdict(result)), time.time()),
        )

    def begin_run(self, baseline: str, environment: dict[str, Any], config: dict[str, Any], plan: list) -> None:
        """Record a run: its settings, and its cells as ``(key, (model, method, task))`` in the views' order."""
        self._write(
            "INSERT INTO runs (started_at, baseline, environment, config, plan) VALUES (?, ?, ?, ?, ?)",
            (time.time(), baseline, json.dumps(environment), json.dumps(config), json.dumps(plan)),
        )

    def results(self) -> Results | None:
        """Every stored cell, as the latest run sees them; None when no run was recorded (or the store is of the
        first version, which recorded none: its results.json has them)."""
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'").fetchone():
            return None
        run = self._db.execute("SELECT baseline, environment, config, plan FROM runs ORDER BY id DESC").fetchone()
        if run is None:
            return None
        try:
            baseline, environment, config, plan = run[0], *map(json.loads, run[1:])
        except ValueError as e:
            raise QuantarenaError(f"results store {self.path}: its last run's record is unreadable ({e})") from None
        rows = self._db.execute("SELECT key, record FROM cells ORDER BY finished_at")
        records = {key: self._record(key, record) for key, record in rows}
        planned_keys = [key for key, _ in plan]
        # A planned cell not finished yet still hides an older result under its labels.
        hidden = {tuple(labels) for _, labels in plan}
        planned = [records[key] for key in planned_keys if key in records]
        older = [r for key, r in records.items() if key not in set(planned_keys) and r.key not in hidden]
        return Results(baseline, environment, config, planned + older)

    def close(self) -> None:
        self._db.close()


def read_dir(output_dir: Path) -> Results:
    """The results of an output dir: from its store, or from a results.json alone (e.g. copied elsewhere)."""
    output_dir = Path(output_dir)
    if (output_dir / STORE_FILE).is_file():
        store = Store(output_dir, writable=False)
        try:
            results = store.results()
        finally:
            store.close()
        if results is not None:
            return results
    path = output_dir / RESULTS_FILE
    if not path.is_file():
        raise QuantarenaError(f"{output_dir} holds neither {STORE_FILE} nor {RESULTS_FILE}: give a run's output dir")
    return read_results(path)
