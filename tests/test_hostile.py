"""Hostile and careless input, as an attacker or a new user would give it, through every command.

Each case asserts what the user sees (the exit code; exactly one line on stderr, naming the problem; no
traceback), that nothing was written outside the output dir and the cache, and, where a store is involved,
that nothing already stored was lost. Most cases are refused before any model is loaded, so they are fast.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantarena.cli import app

PPL = "perplexity:max_tokens=60,max_length=30,stride=15"
MARKER = "PWNED"


class Payload:
    """Unpickling this writes the marker file: the proof that a loader ran code from a folder."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path(self.path).write_text, (MARKER,))


def malicious_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": Payload(marker)}))


@dataclass
class Outcome:
    code: int
    stderr: list[str]
    stdout: str
    exception: BaseException | None


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture()
def sandbox(tmp_path, monkeypatch):
    """A working dir whose every file is accounted for: cases may write only into out/ and cache/."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTARENA_CACHE", str(tmp_path / "cache"))
    return tmp_path


def invoke(sandbox: Path, *args: str) -> Outcome:
    before = files_under(sandbox)
    result = CliRunner().invoke(app, [str(a) for a in args])
    written = {p for p in files_under(sandbox) - before if not p.is_relative_to(sandbox / "cache")}
    allowed = [sandbox / name for name in ("out", "ft", "q", "report")]
    stray = [p for p in written if not any(p.is_relative_to(a) for a in allowed)]
    assert not stray, f"written outside the output dir: {stray}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    exception = result.exception if not isinstance(result.exception, SystemExit) else None
    return Outcome(result.exit_code, lines, result.stdout, exception)


def refused(outcome: Outcome, *words: str, code: int = 2) -> None:
    assert outcome.exception is None, f"{type(outcome.exception).__name__}: {outcome.exception}"
    text = "\n".join(outcome.stderr)
    assert "Traceback" not in text and "Traceback" not in outcome.stdout
    assert outcome.code == code, (outcome.code, text)
    assert len(outcome.stderr) == 1, text
    assert outcome.stderr[0].startswith("error: "), text
    for word in words:
        assert word in outcome.stderr[0], (word, outcome.stderr[0])


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def run_args(model: Path | str, *extra: str, task: str = PPL, method: str = "fp32") -> list[str]:
    return ["run", "--model", str(model), "--method", method, "--task", task, "--output-dir", "out", *extra]


# ---- the sweep config -----------------------------------------------------------------------------------

CONFIG_CASES = {
    "toml syntax": ("model = 'x'\nmethods = [fp32\n", "is not valid TOML"),
    "toml not utf-8": (b"model = '\xff\xfe'\n", "is not valid TOML"),
    "unknown key": ("model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity']\ncolour = 'blue'\n", "'colour'"),
    "model is a number": ("model = 3\nmethods = ['fp32']\ntasks = ['perplexity']\n", "model"),
    "methods a string table": ("model = 'x'\nmethods = 3\ntasks = ['perplexity']\n", "methods"),
    "empty methods": ("model = 'x'\nmethods = []\ntasks = ['perplexity']\n", "non-empty list"),
    "empty tasks": ("model = 'x'\nmethods = ['fp32']\ntasks = []\n", "non-empty list"),
    "empty models": ("models = []\nmethods = ['fp32']\ntasks = ['perplexity']\n", "models"),
    "unknown method": ("model = 'x'\nmethods = ['int3']\ntasks = ['perplexity']\n", "unknown method 'int3'"),
    "unknown task": ("model = 'x'\nmethods = ['fp32']\ntasks = ['mmlu-pro']\n", "unknown task 'mmlu-pro'"),
    "option type": (
        "model = 'x'\nmethods = [{ name = 'own-int4', group_size = 'big' }]\ntasks = ['perplexity']\n",
        "group_size",
    ),
    "option negative": (
        "model = 'x'\nmethods = [{ name = 'own-int4', group_size = -8 }]\ntasks = ['perplexity']\n",
        "group_size",
    ),
    "unknown option": (
        "model = 'x'\nmethods = [{ name = 'own-int4', bits = 3 }]\ntasks = ['perplexity']\n",
        "unknown key 'bits'",
    ),
    "limit zero": ("model = 'x'\nmethods = ['fp32']\ntasks = [{ name = 'arc_easy', limit = 0 }]\n", "limit"),
    "limit_seed alone": (
        "model = 'x'\nmethods = ['fp32']\ntasks = [{ name = 'arc_easy', limit_seed = 3 }]\n",
        "set limit too",
    ),
    "max_tokens one": (
        "model = 'x'\nmethods = ['fp32']\ntasks = [{ name = 'perplexity', max_tokens = 1 }]\n",
        "max_tokens",
    ),
    "stride over window": (
        "model = 'x'\nmethods = ['fp32']\ntasks = [{ name = 'perplexity', stride = 4096 }]\n",
        "stride (4096) must be <= max_length (1024)",
    ),
    "baseline not a method": (
        "model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity']\nbaseline = 'bf16'\n",
        "baseline 'bf16'",
    ),
    "method listed twice": ("model = 'x'\nmethods = ['fp32', 'fp32']\ntasks = ['perplexity']\n", "listed twice"),
    "task listed twice": (
        "model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity', 'perplexity']\n",
        "listed twice",
    ),
    "batch size zero": ("model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity']\nbatch_size = 0\n", "batch_size"),
    "batch size huge": (
        "model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity']\nbatch_size = 100000000000\n",
        "batch_size",
    ),
    "seed beyond 64 bits": (
        "model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity']\nseed = 100000000000000000000\n",
        "seed",
    ),
    "seed negative": ("model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity']\nseed = -1\n", "seed"),
    "device tpu": ("model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity']\ndevice = 'tpu'\n", "device"),
    "executor unknown": (
        "model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity']\nexecutor = 'slurm'\n",
        "unknown executor 'slurm'",
    ),
    "timeout negative": (
        "model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity']\ncell_timeout_s = -5\n",
        "cell_timeout_s",
    ),
    "timeout nan": (
        "model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity']\ncell_timeout_s = nan\n",
        "cell_timeout_s",
    ),
    "label with newline": (
        'model = \'x\'\nmethods = [{ name = "fp32", label = "a\\nb" }]\ntasks = ["perplexity"]\n',
        "label",
    ),
    "label 300 characters": (
        f"model = 'x'\nmethods = [{{ name = 'fp32', label = '{'x' * 300}' }}]\ntasks = ['perplexity']\n",
        "label",
    ),
    "model name 300 characters": (
        f"models = [{{ source = 'x', name = '{'m' * 300}' }}]\nmethods = ['fp32']\ntasks = ['perplexity']\n",
        "name",
    ),
    "model name with a slash": (
        "models = [{ source = 'x', name = '../../etc' }]\nmethods = ['fp32']\ntasks = ['perplexity']\n",
        "name",
    ),
    "plugins not a list": ("model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity']\nplugins = 'os'\n", "plugins"),
    "plugin missing": (
        "model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity']\nplugins = ['no_such_plugin_x']\n",
        "no_such_plugin_x",
    ),
    "num_labels negative": (
        "models = [{ source = 'x', num_labels = -3 }]\nmethods = ['fp32']\ntasks = ['classification']\n",
        "num_labels",
    ),
    "kind unknown": (
        "models = [{ source = 'x', kind = 'vision' }]\nmethods = ['fp32']\ntasks = ['perplexity']\n",
        "kind",
    ),
    "reference method unknown": (
        "model = 'x'\nmethods = ['fp32']\ntasks = [{ name = 'divergence', reference_method = 'magic' }]\n",
        "reference_method 'magic'",
    ),
    "data dir missing": (
        "model = 'x'\nmethods = ['fp32']\ntasks = ['perplexity']\ndata_dir = '/no/such/data'\n",
        "not found",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config(sandbox, case):
    text, words = CONFIG_CASES[case]
    path = write(sandbox / "sweep.toml", text)
    refused(invoke(sandbox, "run", path, "--output-dir", "out"), words)


def test_config_file_missing(sandbox):
    refused(invoke(sandbox, "run", "nowhere.toml"), "config file nowhere.toml does not exist")


def test_cuda_without_a_gpu(sandbox, tiny_llama_dir):
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has a GPU")
    refused(invoke(sandbox, *run_args(tiny_llama_dir, "--device", "cuda")), "no CUDA GPU")


def test_output_dir_is_a_file(sandbox, tiny_llama_dir):
    write(sandbox / "taken", "x")
    args = ["run", "--model", tiny_llama_dir, "--method", "fp32", "--task", PPL, "--output-dir", "taken"]
    refused(invoke(sandbox, *args), "output dir taken")


def test_output_dir_not_writable(sandbox, tiny_llama_dir, monkeypatch):
    """As a user without write access sees it (root writes anywhere, so the check is made to say no)."""
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path).name == "out" else access(path, mode))
    refused(invoke(sandbox, *run_args(tiny_llama_dir)), "not writable")


def test_window_longer_than_the_model_context_is_refused(sandbox, tiny_llama_dir):
    """The tiny Llama has 512 positions: a 1024-token window cannot be represented."""
    refused(invoke(sandbox, *run_args(tiny_llama_dir, task="perplexity:max_length=1024,max_tokens=2000")), "512")


def test_the_same_model_twice_is_refused(sandbox, tiny_llama_dir):
    args = ["run", "--model", tiny_llama_dir, "--model", tiny_llama_dir, "--method", "fp32", "--task", PPL]
    refused(invoke(sandbox, *args, "--output-dir", "out"), "listed twice")


# ---- model files ------------------------------------------------------------------------------------------

SAFETENSORS_HEADER_CASES = {
    "header is a list": b"[1, 2]",
    "header is a string": b'"hello"',
    "tensor without data_offsets": json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode(),
    "offsets negative": json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}).encode(),
    "offsets reversed": json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}).encode(),
    "offsets not numbers": json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["a", "b"]}}).encode(),
    "offsets beyond the file": json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4096]}}).encode(),
    "header not json": b"{not json",
}


def model_folder(sandbox: Path, config: str | bytes = '{"architectures": ["LlamaForCausalLM"]}') -> Path:
    folder = sandbox / "model"
    write(folder / "config.json", config)
    return folder


@pytest.mark.parametrize("case", list(SAFETENSORS_HEADER_CASES))
def test_corrupt_safetensors(sandbox, case):
    folder = model_folder(sandbox)
    header = SAFETENSORS_HEADER_CASES[case]
    write(folder / "model.safetensors", struct.pack("<Q", len(header)) + header + bytes(8))
    refused(invoke(sandbox, *run_args(folder)), "model.safetensors is corrupt")


def test_safetensors_header_length_beyond_the_file(sandbox):
    folder = model_folder(sandbox)
    write(folder / "model.safetensors", struct.pack("<Q", 1 << 40) + b"{}")
    refused(invoke(sandbox, *run_args(folder)), "model.safetensors is corrupt")


def test_empty_safetensors(sandbox):
    folder = model_folder(sandbox)
    write(folder / "model.safetensors", b"")
    refused(invoke(sandbox, *run_args(folder)), "model.safetensors is corrupt")


@pytest.mark.parametrize(
    "config",
    [b'{"architectures": ["LlamaForCausalLM"]', b"[1, 2, 3]", b'"text"', b"\xff\xfe", b""],
    ids=["truncated", "a list", "a string", "not utf-8", "empty"],
)
def test_bad_config_json(sandbox, config):
    folder = model_folder(sandbox, config)
    write(folder / "model.safetensors", struct.pack("<Q", 2) + b"{}")
    refused(invoke(sandbox, *run_args(folder)), "config.json")


def test_folder_without_config(sandbox):
    write(sandbox / "model" / "model.safetensors", b"x")
    refused(invoke(sandbox, *run_args(sandbox / "model")), "no config.json")


def test_folder_without_weights(sandbox):
    refused(invoke(sandbox, *run_args(model_folder(sandbox))), "has no weights")


def test_model_path_missing(sandbox):
    refused(invoke(sandbox, *run_args(sandbox / "nowhere")), "does not exist")


def test_a_file_that_is_not_gguf(sandbox):
    refused(invoke(sandbox, *run_args(write(sandbox / "weights.bin", b"x"))), "must be a .gguf")


@pytest.mark.parametrize(
    "content",
    [b"", b"GGUF", b"GGUF" + bytes(12), os.urandom(4096), b"GGUF\x03\x00\x00\x00" + b"\xff" * 64],
    ids=["empty", "magic only", "truncated header", "random", "absurd counts"],
)
def test_bad_gguf(sandbox, content):
    refused(invoke(sandbox, *run_args(write(sandbox / "model.gguf", content))), "model.gguf")


def test_pickle_weights_are_refused_unless_allowed(sandbox, tiny_llama_dir):
    """A folder whose only weights are a pickle: refused before anything reads it, so no code runs."""
    folder = sandbox / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_llama_dir / name).read_bytes())
    malicious_pickle(folder / "pytorch_model.bin", sandbox / "out" / MARKER)
    refused(invoke(sandbox, *run_args(folder, "--executor", "inline")), "pytorch_model.bin", "allow_pickle_weights")
    assert not (sandbox / "out" / MARKER).exists()


def test_remote_code_is_not_run(sandbox, tiny_llama_dir):
    folder = sandbox / "model"
    folder.mkdir()
    for f in tiny_llama_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    write(folder / "evil.py", f"open({str(sandbox / 'out' / MARKER)!r}, 'w').write('x')\nclass EvilModel: pass\n")
    invoke(sandbox, *run_args(folder, "--executor", "inline"))
    assert not (sandbox / "out" / MARKER).exists()


def test_an_untrained_classifier_head_is_refused(sandbox, tiny_llama_dir, tiny_jsonl):
    """A causal LM's checkpoint has no classification head: evaluating it on SST-2 would score a random head."""
    config = write(
        sandbox / "sweep.toml",
        f"models = [{{ source = {json.dumps(str(tiny_llama_dir))}, kind = 'sequence-classification' }}]\n"
        f"methods = ['fp32']\ntasks = [{{ name = 'classification', dataset = {json.dumps(str(tiny_jsonl))} }}]\n",
    )
    refused(invoke(sandbox, "run", config, "--output-dir", "out"), "head", "untrained")


# ---- datasets -------------------------------------------------------------------------------------------------

DATASET_CASES: dict[str, tuple[str, bytes, tuple[str, ...]]] = {
    "line not json": ("d.jsonl", b'{"text": "a", "label": 0}\n{oops\n', ("line 2",)),
    "line an array": ("d.jsonl", b'{"text": "a", "label": 0}\n[1, 2]\n', ("line 2",)),
    "line a string": ("d.jsonl", b'{"text": "a", "label": 0}\n"just text"\n', ("line 2",)),
    "line null": ("d.jsonl", b'{"text": "a", "label": 0}\nnull\n', ("line 2",)),
    "later row without its label": ("d.jsonl", b'{"text": "a", "label": 0}\n{"text": "b"}\n', ("line 2", "label")),
    "null text": ("d.jsonl", b'{"text": "a", "label": 0}\n{"text": null, "label": 1}\n', ("line 2", "text")),
    "label --1": ("d.jsonl", b'{"text": "a", "label": "--1"}\n', ("--1",)),
    "label superscript two": ("d.jsonl", '{"text": "a", "label": "²"}\n'.encode(), ("²",)),
    "label float": ("d.jsonl", b'{"text": "a", "label": 0.5}\n', ("0.5",)),
    "label boolean": ("d.jsonl", b'{"text": "a", "label": true}\n', ("True",)),
    "label negative": ("d.jsonl", b'{"text": "a", "label": -1}\n', ("-1",)),
    "label out of range": ("d.jsonl", b'{"text": "a", "label": 0}\n{"text": "b", "label": 7}\n', ("7",)),
    "not utf-8": ("d.jsonl", b'{"text": "\xff\xfe", "label": 0}\n', ("d.jsonl",)),
    "empty file": ("d.jsonl", b"", ("no records",)),
    "only blank lines": ("d.jsonl", b"\n\n  \n", ("no records",)),
    "missing column": ("d.jsonl", b'{"sentence": "a", "label": 0}\n', ("missing column", "text")),
    "csv unbalanced quote": ("d.csv", b'text,label\n"a,0\nb,1\nc,0\n', ("line",)),
    "csv extra field": ("d.csv", b"text,label\na,0\nb,1,extra\n", ("line 3",)),
    "csv missing field": ("d.csv", b"text,label\na,0\nb\n", ("line 3",)),
    "unsupported extension": ("d.txt", b"hello\n", ("unsupported",)),
    "gzip that is not gzip": ("d.jsonl.gz", b"not gzip at all", ("d.jsonl.gz",)),
}


@pytest.mark.parametrize("case", list(DATASET_CASES))
def test_dataset(sandbox, tiny_bert_dir, case):
    name, content, words = DATASET_CASES[case]
    path = write(sandbox / "data" / name, content)
    task = f"classification:dataset={json.dumps(str(path))}"
    args = ["run", "--model", tiny_bert_dir, "--method", "fp32", "--task", task, "--output-dir", "out"]
    refused(invoke(sandbox, *args), *words)


def test_dataset_missing(sandbox, tiny_bert_dir):
    task = 'classification:dataset="no/such.jsonl"'
    args = ["run", "--model", tiny_bert_dir, "--method", "fp32", "--task", task, "--output-dir", "out"]
    refused(invoke(sandbox, *args), "not found")


def classification_rows(sandbox: Path, tiny_bert_dir: Path, path: Path) -> dict:
    task = f"classification:dataset={json.dumps(str(path))},latency_examples=1"
    args = ["run", "--model", tiny_bert_dir, "--method", "fp32", "--task", task, "--output-dir", "out"]
    outcome = invoke(sandbox, *args, "--executor", "inline")
    assert outcome.code == 0, outcome.stderr
    (cell,) = json.loads((sandbox / "out" / "results.json").read_text())["cells"]
    return cell["metrics"]


def test_csv_with_a_byte_order_mark_reads_every_row(sandbox, tiny_bert_dir):
    path = write(sandbox / "d.csv", "\ufefftext,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(16)))
    assert classification_rows(sandbox, tiny_bert_dir, path)["n_examples"] == 16


def test_tsv_with_quotes_in_the_text_reads_every_row(sandbox, tiny_bert_dir):
    rows = [f'he said "hi {i}\tthere\t{i % 2}' if i % 5 == 0 else f"plain {i}\t{i % 2}" for i in range(16)]
    text = "text\tlabel\n" + "\n".join(r.replace("\tthere", " there") for r in rows) + "\n"
    path = write(sandbox / "d.tsv", text)
    assert classification_rows(sandbox, tiny_bert_dir, path)["n_examples"] == 16


# ---- the results store and results files -----------------------------------------------------------------------


def stored(out: Path) -> list[tuple]:
    with sqlite3.connect(out / "results.sqlite") as db:
        return db.execute("SELECT key, status, record FROM cells ORDER BY key").fetchall()


@pytest.fixture()
def finished(sandbox, tiny_llama_dir) -> list[tuple]:
    """An output dir holding one finished cell."""
    assert invoke(sandbox, *run_args(tiny_llama_dir, "--executor", "inline")).code == 0
    return stored(sandbox / "out")


def test_a_store_that_is_not_sqlite(sandbox, tiny_llama_dir):
    write(sandbox / "out" / "results.sqlite", os.urandom(2048))
    refused(invoke(sandbox, *run_args(tiny_llama_dir)), "results.sqlite")


def test_a_foreign_sqlite_store(sandbox, tiny_llama_dir):
    (sandbox / "out").mkdir()
    with sqlite3.connect(sandbox / "out" / "results.sqlite") as db:
        db.execute("CREATE TABLE cells (id INTEGER, payload BLOB)")
    refused(invoke(sandbox, *run_args(tiny_llama_dir)), "results.sqlite", "not a quantarena")


def test_a_store_from_a_newer_quantarena(sandbox, tiny_llama_dir, finished):
    with sqlite3.connect(sandbox / "out" / "results.sqlite") as db:
        db.execute("PRAGMA user_version = 99")
    refused(invoke(sandbox, *run_args(tiny_llama_dir)), "newer")
    assert stored(sandbox / "out") == finished


def test_a_truncated_store(sandbox, tiny_llama_dir, finished):
    path = sandbox / "out" / "results.sqlite"
    path.write_bytes(path.read_bytes()[:1500])
    refused(invoke(sandbox, *run_args(tiny_llama_dir)), "results.sqlite")


def test_a_store_with_an_unreadable_record(sandbox, tiny_llama_dir, finished):
    with sqlite3.connect(sandbox / "out" / "results.sqlite") as db:
        db.execute("UPDATE cells SET record = '{\"model\": 3'")
    refused(invoke(sandbox, "report", sandbox / "out"), "results.sqlite")


def test_a_read_only_store_is_refused_before_any_work(sandbox, tiny_llama_dir, finished, monkeypatch):
    """A store that cannot take results (read-only: opened here with SQLite's mode=ro, which binds root too)."""
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda path: connect(f"file:{path}?mode=ro", uri=True))
    refused(invoke(sandbox, *run_args(tiny_llama_dir, task=PPL + ",label=other")), "results.sqlite", "readonly")
    monkeypatch.undo()
    assert stored(sandbox / "out") == finished


@pytest.mark.parametrize(
    "content",
    [
        b"{",
        b"[]",
        b'{"schema_version": 1}',
        b'{"schema_version": 99, "cells": []}',
        b'{"schema_version": 2, "cells": 3}',
    ],
    ids=["truncated", "a list", "no cells", "newer", "cells not a list"],
)
def test_report_of_a_malformed_results_file(sandbox, content):
    write(sandbox / "run" / "results.json", content)
    refused(invoke(sandbox, "report", sandbox / "run", "-o", "report"), "results.json")


def test_report_output_is_a_file(sandbox, finished):
    write(sandbox / "report", "x")
    refused(invoke(sandbox, "report", sandbox / "out", "-o", "report"), "report")


def test_report_of_a_dir_without_results(sandbox):
    (sandbox / "empty").mkdir()
    refused(invoke(sandbox, "report", sandbox / "empty"), "holds neither")


@pytest.mark.parametrize(
    "option, value",
    [("--max-drop", "nan"), ("--max-drop", "-1"), ("--max-drop", "inf"), ("--max-memory-mb", "0"),
     ("--max-memory-mb", "nan"), ("--max-latency-ms", "-3"), ("--prefer", "cheapest")],
)  # fmt: skip
def test_recommend_limits(sandbox, finished, option, value):
    refused(invoke(sandbox, "recommend", sandbox / "out", option, value), option.lstrip("-").split("-")[-1])


def test_report_bandwidth_negative(sandbox, finished):
    refused(invoke(sandbox, "report", sandbox / "out", "--bandwidth-gbs", "-2", "-o", "report"), "bandwidth")


# ---- quantize and compare ----------------------------------------------------------------------------------------


def quantized_folder(sandbox: Path, marker: dict | bytes | None) -> Path:
    folder = sandbox / "shared-folder"
    folder.mkdir(exist_ok=True)
    if marker is not None:
        content = marker if isinstance(marker, bytes) else json.dumps(marker).encode()
        write(folder / "quantarena_method.json", content)
    return folder


GOOD_MARKER = {"method": "own-int8", "label": "own-int8", "config": {}, "source": "x", "kind": "causal-lm"}


@pytest.mark.parametrize(
    "marker, words",
    [
        (b"{", ("quantarena_method.json",)),
        (b"[1]", ("quantarena_method.json",)),
        ({"label": "x"}, ("quantarena_method.json", "method")),
        (GOOD_MARKER | {"method": "no-such-method"}, ("no-such-method",)),
        (GOOD_MARKER | {"config": {"bits": 3}}, ("bits",)),
        (GOOD_MARKER | {"kind": "vision"}, ("kind",)),
        (GOOD_MARKER | {"num_labels": -3}, ("num_labels",)),
        (None, ("quantarena_method.json",)),
    ],
    ids=["truncated", "a list", "no method", "unknown method", "unknown option", "bad kind", "bad labels", "missing"],
)
def test_compare_with_a_bad_marker(sandbox, tiny_llama_dir, marker, words):
    folder = quantized_folder(sandbox, marker)
    refused(invoke(sandbox, "compare", tiny_llama_dir, folder, "--task", PPL), *words)


def test_compare_refuses_a_pickled_program_unless_trusted(sandbox, tiny_bert_dir, tiny_jsonl):
    """inductor-int8 folders hold a torch.export program, which loading unpickles: a shared folder could run code."""
    marker_file = sandbox / "out" / MARKER
    folder = quantized_folder(sandbox, GOOD_MARKER | {"method": "inductor-int8", "kind": "sequence-classification"})
    malicious_pickle(folder / "model.pt2", marker_file)
    task = f"classification:dataset={json.dumps(str(tiny_jsonl))}"
    refused(invoke(sandbox, "compare", tiny_bert_dir, folder, "--task", task), "--trust-pickle")
    assert not marker_file.exists()


@pytest.mark.parametrize(
    "method, weights",
    [
        ("hqq-int4", "qmodel.pt"),
        ("own-int8", "model.safetensors"),
        ("quanto-int8", "model.safetensors"),
        ("torchao-int8-wo", "model.safetensors"),
        ("bnb-int8", "model.safetensors"),
        ("fp16", "model.safetensors"),
    ],
)
def test_compare_loads_no_planted_pickle(sandbox, tiny_llama_dir, method, weights):
    """A shared quantized folder whose weights file is a pickle payload, for each backend's loader: refused on
    one line, and no code runs (HQQ reads with torch's weights-only unpickler, the others read safetensors)."""
    marker_file = sandbox / "out" / MARKER
    folder = quantized_folder(sandbox, GOOD_MARKER | {"method": method})
    (folder / "config.json").write_bytes((tiny_llama_dir / "config.json").read_bytes())
    for name in ("quanto_qmap.json", "quantarena_quant.json", "quanto_float_outputs.json"):
        write(folder / name, "{}")
    malicious_pickle(folder / weights, marker_file)
    outcome = invoke(sandbox, "compare", tiny_llama_dir, folder, "--task", PPL)
    assert not marker_file.exists()
    refused(outcome, str(folder))


@pytest.mark.parametrize(
    "args, words",
    [
        (["--batch-size", "0"], ("batch-size",)),
        (["--batch-size", "-4"], ("batch-size",)),
        (["--seed", "-1"], ("seed",)),
        (["--task", "nope"], ("unknown task 'nope'",)),
    ],
)
def test_compare_options(sandbox, tiny_llama_dir, args, words):
    folder = quantized_folder(sandbox, GOOD_MARKER)
    options = ["--task", PPL] if "--task" not in args else []
    refused(invoke(sandbox, "compare", tiny_llama_dir, folder, *options, *args), *words)


def test_compare_on_cuda_without_a_gpu(sandbox, tiny_llama_dir):
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has a GPU")
    folder = quantized_folder(sandbox, GOOD_MARKER)
    refused(invoke(sandbox, "compare", tiny_llama_dir, folder, "--task", PPL, "--device", "cuda"), "no CUDA GPU")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--method", "nope"], ("unknown method 'nope'",)),
        (["--method", "own-int4:group_size=-1"], ("group_size",)),
        (["--method", "fp32", "--num-labels", "-3"], ("num_labels",)),
        (["--method", "fp32", "--kind", "vision"], ("kind",)),
        (["--method", "fp32", "--device", "cuda"], ("cuda",)),
        (["--method", "fp32", "--seed", "-5"], ("seed",)),
    ],
)
def test_quantize_options(sandbox, tiny_llama_dir, args, words):
    if "cuda" in args and pytest.importorskip("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    refused(invoke(sandbox, "quantize", tiny_llama_dir, *args, "--out", "q"), *words)


def test_quantize_out_is_a_file(sandbox, tiny_llama_dir):
    write(sandbox / "q", "x")
    refused(invoke(sandbox, "quantize", tiny_llama_dir, "--method", "fp32", "--out", "q"), "q")


def test_quantize_out_not_empty(sandbox, tiny_llama_dir):
    write(sandbox / "q" / "keep.txt", "x")
    refused(invoke(sandbox, "quantize", tiny_llama_dir, "--method", "fp32", "--out", "q"), "not empty")


# ---- finetune -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["--epochs", "inf"], ("epochs",)),
        (["--epochs", "nan"], ("epochs",)),
        (["--epochs", "0"], ("epochs",)),
        (["--learning-rate", "nan"], ("learning_rate",)),
        (["--batch-size", "0"], ("batch_size",)),
        (["--lora", "r=0"], ("r",)),
        (["--lora", "rank"], ("KEY=VALUE",)),
        (["--task", "nosuch"], ("nosuch",)),
        (["--device", "cuda"], ("cuda",)),
    ],
)
def test_finetune_options(sandbox, tiny_bert_dir, args, words):
    if "cuda" in args and pytest.importorskip("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    refused(invoke(sandbox, "finetune", tiny_bert_dir, "--out", "ft", *args), *words)


def test_finetune_out_is_a_file(sandbox, tiny_bert_dir):
    write(sandbox / "ft", "x")
    refused(invoke(sandbox, "finetune", tiny_bert_dir, "--out", "ft"), "ft")


# ---- numbers that cannot mean what they say -----------------------------------------------------------------------


def test_non_finite_quality_fails_the_cell_and_is_never_recommended(sandbox, tiny_llama_dir):
    path = write(sandbox / "sweep.toml", 'plugins = ["plugins.breaking_methods"]\n')
    args = ["run", path, "--model", tiny_llama_dir, "--method", "fp32", "--method", "test-nan", "--task", PPL]
    outcome = invoke(sandbox, *args, "--output-dir", "out", "--executor", "inline")
    assert outcome.code == 1
    cells = json.loads((sandbox / "out" / "results.json").read_text(), parse_constant=pytest.fail)["cells"]
    nan = next(c for c in cells if c["method"] == "test-nan")
    assert nan["status"] == "failed" and nan["reason"].startswith("perplexity is nan")
    report = json.loads((sandbox / "out" / "report.json").read_text(), parse_constant=pytest.fail)
    assert report["groups"][0]["recommendation"]["choice"] == "fp32"


def test_json_files_are_strict(sandbox, finished):
    def bare(constant: str):
        pytest.fail(f"a results file holds a bare {constant}")

    for name in ("results.json", "report.json"):
        text = (sandbox / "out" / name).read_text()
        assert not any(math.isnan(v) for v in _floats(json.loads(text, parse_constant=bare)))


def _floats(value) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return []


def test_gzip_dataset_accounted(sandbox, tiny_bert_dir):
    rows = b"".join(json.dumps({"text": f"row {i}", "label": i % 2}).encode() + b"\n" for i in range(12))
    path = write(sandbox / "d.jsonl.gz", gzip.compress(rows))
    assert classification_rows(sandbox, tiny_bert_dir, path)["n_examples"] == 12
