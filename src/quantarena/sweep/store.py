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

from quantarena.errors import QuantarenaError
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


class Store:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / STORE_FILE
        try:
            self._db = sqlite3.connect(self.path)
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise QuantarenaError(f"results store {self.path} cannot be opened: {e}") from None

    def _write(self, sql: str, params: tuple) -> None:
        try:
            with self._db:
                self._db.execute(sql, params)
        except sqlite3.Error as e:
            raise QuantarenaError(f"cannot write to the results store {self.path}: {e}") from None

    def get(self, key: str) -> CellResult | None:
        row = self._db.execute("SELECT record FROM cells WHERE key = ?", (key,)).fetchone()
        return None if row is None else CellResult(**json.loads(row[0]))

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
        """Every stored cell, as the latest run sees them; None when no run was recorded."""
        run = self._db.execute("SELECT baseline, environment, config, plan FROM runs ORDER BY id DESC").fetchone()
        if run is None:
            return None
        baseline, environment, config, plan = run[0], *map(json.loads, run[1:])
        records = {key: CellResult(**json.loads(record)) for key, record in self._db.execute(
            "SELECT key, record FROM cells ORDER BY finished_at")}  # fmt: skip
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
        store = Store(output_dir)
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
