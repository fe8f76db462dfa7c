"""A report as a list of blocks, rendered to Markdown here and to HTML by html_report.

Text may use two inline marks, `code` and **bold**, which both renderers understand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_NUMBER = re.compile(r"^[+\-−]?[\d\[]")


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[dict[str, str]]
    # Raw numbers behind formatted cells, so the HTML can sort numerically: (row index, column) -> value.
    sort_keys: dict[tuple[int, str], float] = field(default_factory=dict)

    def numeric(self, column: str) -> bool:
        """Right-aligned and sorted as numbers: every filled cell starts with a number (or an interval)."""
        values = [r[column] for r in self.rows if r.get(column)]
        return bool(values) and all(_NUMBER.match(v) for v in values)


@dataclass(frozen=True)
class Image:
    path: Path  # relative to the report's folder
    alt: str


Block = Heading | Paragraph | Bullets | Table | Image


def markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Bullets):
            lines += [*(f"- {item}" for item in block.items), ""]
        elif isinstance(block, Table):
            cols = block.columns
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "|".join("---:" if block.numeric(c) else "---" for c in cols) + "|")
            lines += ["| " + " | ".join(r.get(c, "").replace("|", "\\|") for c in cols) + " |" for r in block.rows]
            lines.append("")
        else:
            lines += [f"![{block.alt}]({block.path.as_posix()})", ""]
    return "\n".join(lines).rstrip() + "\n"
