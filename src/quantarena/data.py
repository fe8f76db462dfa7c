"""Where evaluation data lives and how records are read (local JSONL/CSV/TSV or `datasets`); content digests for
the keys of stored results and cached checkpoints."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantarena.errors import DataError, first_line

DATA_DIR_ENV = "QUANTARENA_DATA_DIR"
DEFAULT_DATA_DIR = Path("../shared/data")


@dataclass(frozen=True)
class NamedDataset:
    path: str
    text_column: str = "text"
    label_column: str | None = "label"


# Short names for the files of the shared offline data folder (see its README).
NAMED_DATASETS = {
    "sst2": NamedDataset("sst2/validation.jsonl", "sentence"),
    "sst2-train": NamedDataset("sst2/train.jsonl.gz", "sentence"),
    "imdb": NamedDataset("imdb/test.jsonl.gz"),
    "wikitext2": NamedDataset("wikitext2/test.jsonl", label_column=None),
    "wikitext2-raw": NamedDataset("wikitext2/wiki.test.raw", label_column=None),
    "arc_easy": NamedDataset("arc/ARC-Easy-test.jsonl", "question", None),
    "arc_challenge": NamedDataset("arc/ARC-Challenge-test.jsonl", "question", None),
    "mmlu": NamedDataset("mmlu/test.jsonl.gz", "question", None),
    "mmlu-dev": NamedDataset("mmlu/dev.jsonl", "question", None),
    # llama.cpp's preprocessed text: ctx is already "activity_label: ctx" (see the data folder's SOURCE.md).
    "hellaswag": NamedDataset("hellaswag/validation_preprocessed.jsonl.gz", "ctx", None),
    "lambada": NamedDataset("lambada_openai/lambada_test.jsonl", label_column=None),
}


def resolve_data_dir(explicit: Path | None = None) -> Path:
    return Path(explicit or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def text_column(dataset: str, explicit: str | None = None) -> str:
    """The column holding a dataset's text: as given, else the named dataset's, else ``text``."""
    named = NAMED_DATASETS.get(dataset)
    return explicit or (named.text_column if named else "text")


def dataset_path(dataset: str, data_dir: Path) -> Path:
    """A named dataset inside ``data_dir``, or a file path as given."""
    path = data_dir / NAMED_DATASETS[dataset].path if dataset in NAMED_DATASETS else Path(dataset).expanduser()
    if not path.is_file():
        where = f"data dir {data_dir} (set {DATA_DIR_ENV} or --data-dir)" if dataset in NAMED_DATASETS else "disk"
        raise DataError(
            f"dataset {dataset!r}: {path} not found on {where}; "
            f"named datasets: {', '.join(NAMED_DATASETS)}, or a .jsonl/.jsonl.gz/.csv/.tsv path, or hf:NAME"
        )
    return path


class Records(list):
    """Rows of a dataset file, with the line each one starts on (for errors that name it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[int] = []

    def add(self, record: dict, line: int) -> None:
        self.append(record)
        self.lines.append(line)

    def line_of(self, index: int) -> int:
        return self.lines[index] if index < len(self.lines) else index + 1


def _jsonl(lines, path: Path) -> Records:
    records = Records()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"dataset {path} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            kind = "null" if record is None else type(record).__name__
            raise DataError(f"dataset {path} line {number}: expected a JSON object, got {kind}")
        records.add(record, number)
    return records


def _delimited(lines, path: Path, tsv: bool) -> Records:
    """Every row accounted for: a row with more or fewer fields than the header, or a quote that swallows the
    lines after it, is an error naming its line. TSV has no quoting (as GLUE's files), CSV the standard one."""
    reader = csv.reader(lines, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    records = Records()
    header = next(reader, None)
    for row in reader:
        if not row:
            continue
        if any("\n" in field or "\r" in field for field in row):
            raise DataError(
                f"dataset {path} line {reader.line_num}: a quoted field runs over several lines (an unbalanced quote?)"
            )
        if len(row) != len(header):
            raise DataError(f"dataset {path} line {reader.line_num}: {len(row)} fields, the header has {len(header)}")
        records.add(dict(zip(header, row, strict=True)), reader.line_num)
    return records


def read_records(dataset: str, data_dir: Path, split: str = "test") -> list[dict]:
    if dataset.startswith("hf:"):
        return _read_hf(dataset[3:], split)
    path = dataset_path(dataset, data_dir)
    name = path.name.removesuffix(".gz")
    if not name.endswith((".jsonl", ".csv", ".tsv")):
        raise DataError(f"dataset {path}: unsupported file type; use .jsonl, .jsonl.gz, .csv or .tsv")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        # utf-8-sig: a byte order mark (spreadsheet exports) is not part of the first column's name.
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            records = _jsonl(f, path) if name.endswith(".jsonl") else _delimited(f, path, name.endswith(".tsv"))
    except (UnicodeDecodeError, OSError, EOFError, csv.Error) as e:
        raise DataError(f"dataset {path}: cannot be read ({first_line(e)})") from None
    if not records:
        raise DataError(f"dataset {path}: has no records")
    return records


def corpus(dataset: str, data_dir: Path, split: str, column: str, select: Callable[[list], list] = list) -> str:
    """The (selected) rows' text joined by blank lines: the transformers perplexity recipe's corpus."""
    records = read_records(dataset, data_dir, split)
    require_columns(records, [column], dataset)
    return "\n\n".join(r[column] for r in select(records))


def read_text(dataset: str, data_dir: Path) -> str:
    """A plain-text file (named, e.g. ``wikitext2-raw``, or a path), whole."""
    path = dataset_path(dataset, data_dir)
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"dataset {path}: cannot be read ({e})") from None


def _read_hf(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError("hf: datasets need the 'datasets' package: pip install 'quantarena[datasets]'") from None
    path, _, config = name.partition(":")
    try:
        return list(datasets.load_dataset(path, config or None, split=split))
    except Exception as e:
        raise DataError(f"dataset hf:{name} split {split!r}: cannot be loaded ({type(e).__name__}: {e})") from None


def require_columns(records: list[dict], columns: list[str], dataset: str) -> None:
    """Every record has every column, and none of them is null; the first that does not is named with its line."""
    for i, record in enumerate(records):
        missing = [c for c in columns if record.get(c) is None]
        if not missing:
            continue
        where = f"line {records.line_of(i)}" if isinstance(records, Records) else f"record {i + 1}"
        if i == 0 and all(c not in record for c in missing):
            raise DataError(
                f"dataset {dataset}: missing column(s) {', '.join(missing)}; "
                f"available: {', '.join(record)} (set text_column / label_column)"
            )
        state = "null" if missing[0] in record else "missing"
        raise DataError(f"dataset {dataset} {where}: {missing[0]} is {state}")


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def json_digest(value: Any) -> str:
    """sha256 of a JSON-able value with sorted keys: the key of everything that determines a result."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Fields marked {"digest": False} hold built objects whose content other fields already stand for.
        fields = [f for f in dataclasses.fields(value) if f.metadata.get("digest", True)]
        return [type(value).__name__, {f.name: _canonical(getattr(value, f.name)) for f in fields}]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"cannot digest a {type(value).__name__}")


def content_digest(data: Any) -> str:
    """A digest of a task's loaded data (texts, labels, questions: the selection as evaluated), so an edited
    dataset never reuses a result computed on the old one."""
    return json_digest(_canonical(data))
