"""End-to-end sweeps on tiny random models: every cell recorded, views derived, deltas computed."""

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from typer.testing import CliRunner

import quantarena
from quantarena.cli import app
from quantarena.errors import DataError
from quantarena.methods import METHODS, Method, Requirements
from quantarena.report import CSV_COLUMNS, Report, table_rows

ALL_METHODS = ["fp32", "fp16", "bf16", "own-int8", "own-int4", "torch-dynamic-int8"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_llama_dir, tiny_bert_dir):
    out = tmp_path_factory.mktemp("sweep")
    rows = [{"text": f"sample sentence number {i} " + "word " * (i % 7), "label": i % 2} for i in range(40)]
    data = out / "tiny.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = quantarena.sweep_config(
        {
            "models": [str(tiny_llama_dir), {"source": str(tiny_bert_dir), "name": "tiny-bert"}],
            "methods": ALL_METHODS,
            "tasks": [
                {"name": "perplexity", "max_tokens": 300, "max_length": 64, "stride": 32},
                {"name": "classification", "dataset": str(data), "latency_examples": 4},
            ],
            "output_dir": str(out / "run"),
            "executor": "inline",
            "batch_size": 4,
        }
    )
    return quantarena.run(config), out / "run"


def cells_of(results, task):
    return {c.method: c for c in results.cells if c.task_name == task}


def test_every_cell_ran(sweep):
    results, _ = sweep
    assert [(c.task_name, c.method) for c in results.cells] == [
        (task, m) for task in ("perplexity", "classification") for m in ALL_METHODS
    ]
    assert all(c.status == "ok" for c in results.cells), [(c.method, c.reason) for c in results.cells]


def test_half_casts_multiply_with_the_exact_half_gemm_where_pytorchs_is_slow(sweep):
    """Llama: q, k, v, o, gate, up of 2 layers and the head (64 features; down_proj reads 160). BERT: q, k, v, o,
    intermediate, output of 2 layers, the pooler and the classifier."""
    from quantarena.halfgemm import kernel_unavailable, native_half_gemm

    results, _ = sweep
    for task, layers in (("perplexity", 13), ("classification", 14)):
        cells = cells_of(results, task)
        for method, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            taken = 0 if kernel_unavailable() or native_half_gemm(dtype) else layers
            assert cells[method].measurements.get("half_gemm_layers", 0) == taken
        assert "half_gemm_layers" not in cells["fp32"].measurements


def test_weight_bytes_shrink_with_precision(sweep):
    results, _ = sweep
    for task in ("perplexity", "classification"):
        wb = {m: c.measurements["weight_bytes"] for m, c in cells_of(results, task).items()}
        # BERT's int64 position/token-type id buffers are not cast, so fp16 is a little over half there.
        assert wb["fp16"] == wb["bf16"] == pytest.approx(wb["fp32"] / 2, rel=1e-3)
        assert wb["own-int4"] < wb["own-int8"] < wb["fp32"]
    # Llama body: 2 layers of q,o (64x64), k,v (32x64), gate,up (160x64), down (64x160); lm_head kept.
    # own-int8 stores 1 byte a weight plus a 4-byte scale a row instead of 4 bytes a weight.
    shapes = 2 * [(64, 64), (64, 64), (32, 64), (32, 64), (160, 64), (160, 64), (64, 160)]
    saved = sum(n * k * 3 - n * 4 for n, k in shapes)
    wb = {m: c.measurements["weight_bytes"] for m, c in cells_of(results, "perplexity").items()}
    assert wb["fp32"] - wb["own-int8"] == saved
    assert all(c.measurements["disk_bytes"] > 0 for c in results.cells)


def test_quality_is_close_to_fp32(sweep):
    results, _ = sweep
    ppl = {m: c.metrics["perplexity"] for m, c in cells_of(results, "perplexity").items()}
    assert ppl["fp16"] == pytest.approx(ppl["fp32"], rel=1e-2)
    assert ppl["own-int8"] == pytest.approx(ppl["fp32"], rel=2e-2)
    assert ppl["own-int4"] == pytest.approx(ppl["fp32"], rel=0.2)


def test_classification_record_agrees_with_its_predictions(sweep):
    results, _ = sweep
    cell = cells_of(results, "classification")["own-int8"]
    labels = [i % 2 for i in range(40)]
    predictions = cell.per_example["predictions"]
    assert cell.metrics["f1"] == pytest.approx(f1_score(labels, predictions, zero_division=0))
    assert cell.metrics["accuracy"] == pytest.approx(np.mean(np.array(labels) == np.array(predictions)))
    for key in ("inference_s", "examples_per_s", "s_per_example", "latency_ms_median"):
        assert cell.metrics[key] > 0
    assert cell.metrics["examples_per_s"] == pytest.approx(40 / cell.metrics["inference_s"])


def test_result_files(sweep):
    results, out = sweep
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == 2
    assert data["environment"]["packages"]["torch"]
    assert data["environment"]["hardware"]["cpu_count"] >= 1
    assert len(data["cells"]) == len(results.cells)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    assert {r["Quantization"] for r in rows} == set(ALL_METHODS)
    md = (out / "results.md").read_text()
    assert "| own-int4 |" in md and "Memory saved" in md


def test_deltas_against_baseline(sweep):
    results, _ = sweep
    report = Report.of(results)
    group = next(g for g in report.groups if g.cells[0].task_name == "perplexity")
    rows = {row["Method"]: row for row in table_rows(report, group)[1]}
    assert rows["fp16"]["Memory saved"] == "50.0% (2.00×)"
    assert rows["fp32"]["Δ vs fp32"].startswith("+0.000")


def test_report_command_rebuilds_views(sweep):
    _, out = sweep
    (out / "results.md").unlink()
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "results.md").is_file()
    assert "own-int4" in result.stdout


def test_unavailable_backend_is_skipped_with_reason(tmp_path, tiny_llama_dir, monkeypatch):
    needs = Method("needs-missing", "test", lambda m, c: m, requires=Requirements(packages=("no_such_package_x",)))
    monkeypatch.setitem(METHODS._entries, needs.name, needs)
    config = quantarena.sweep_config(
        {
            "model": str(tiny_llama_dir),
            "methods": ["fp32", "needs-missing"],
            "tasks": [{"name": "perplexity", "max_tokens": 100, "max_length": 50, "stride": 50}],
            "output_dir": str(tmp_path),
            "executor": "inline",
        }
    )
    cells = quantarena.run(config).cells
    assert [c.status for c in cells] == ["ok", "skipped"]
    assert cells[1].reason == "needs package no_such_package_x (not installed)"
    assert "skipped: needs package no_such_package_x" in (tmp_path / "results.md").read_text()


def test_cell_in_child_process(tmp_path, tiny_llama_dir):
    config = quantarena.sweep_config(
        {
            "model": str(tiny_llama_dir),
            "methods": ["own-int4"],
            "tasks": [{"name": "perplexity", "max_tokens": 100, "max_length": 50, "stride": 25}],
            "output_dir": str(tmp_path),
        }
    )
    assert config.executor == "local"
    (cell,) = quantarena.run(config).cells
    assert cell.status == "ok", cell.reason
    m = cell.measurements
    assert m["serve_peak_rss_bytes"] > 0 and m["load_peak_rss_bytes"] > 0
    assert cell.metrics["n_tokens"] == 99


def test_a_label_beyond_the_models_labels_is_refused_before_any_work(tmp_path, tiny_bert_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 7}\n')
    config = quantarena.sweep_config(
        {
            "model": str(tiny_bert_dir),
            "methods": ["fp32", "own-int8"],
            "tasks": [{"name": "classification", "dataset": str(data)}],
            "output_dir": str(tmp_path / "out"),
            "executor": "inline",
        }
    )
    with pytest.raises(DataError, match="label 7 is out of range for tiny-bert"):
        quantarena.run(config)
    assert not (tmp_path / "out" / "results.json").exists()
