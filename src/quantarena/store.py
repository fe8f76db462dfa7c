"""The results store: an SQLite file in the output dir, one row per cell, keyed by what determines it.

SQLite commits are atomic and durable, so a sweep killed at any instant keeps every cell it had
finished and never a half-written one; the JSON, CSV and Markdown files are views rebuilt from it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path

from quantarena.errors import QuantarenaError
from quantarena.results import CellResult

STORE_FILE = "results.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    record TEXT NOT NULL,
    finished_at REAL NOT NULL
);
"""


class Store:
    def __init__(self, output_dir: Path):
        self.path = output_dir / STORE_FILE
        try:
            self._db = sqlite3.connect(self.path)
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise QuantarenaError(f"results store {self.path} cannot be opened: {e}") from None

    def get(self, key: str) -> tuple[CellResult, float] | None:
        row = self._db.execute("SELECT record, finished_at FROM cells WHERE key = ?", (key,)).fetchone()
        return None if row is None else (CellResult(**json.loads(row[0])), row[1])

    def put(self, key: str, result: CellResult) -> None:
        try:
            with self._db:
                self._db.execute(
                    "INSERT OR REPLACE INTO cells (key, status, record, finished_at) VALUES (?, ?, ?, ?)",
                    (key, result.status, json.dumps(asdict(result)), time.time()),
                )
        except sqlite3.Error as e:
            raise QuantarenaError(f"cannot write to the results store {self.path}: {e}") from None

    def keys(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT key FROM cells ORDER BY rowid")]

    def close(self) -> None:
        self._db.close()
