"""Report regeneration from stored results: Markdown, CSV, JSON, PNG charts and the self-contained HTML,
for one run, older records without per-example data, and several runs combined; the HTML in Chromium."""

import csv
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from quantarena.cli import app
from quantarena.measure import measure_bandwidth, record_bandwidth
from quantarena.metrics import classification_metrics
from quantarena.report import CSV_COLUMNS, Report, Run, write_report
from quantarena.report.document import markdown
from quantarena.report.roofline import roofline
from quantarena.report.sections import document
from quantarena.results import CellResult, Results
from quantarena.sweep.api import load_runs

MB = 1_000_000
PNG = b"\x89PNG\r\n\x1a\n"
LABELS = [i % 2 for i in range(120)]


def classification(method, flips, weight_mb, latency_ms) -> CellResult:
    predictions = [1 - y if i < flips else y for i, y in enumerate(LABELS)]
    return CellResult(
        "tiny-bert",
        method,
        "classification(dataset=tiny)",
        "ok",
        method_name=method,
        task_name="classification",
        quality_metric="accuracy",
        latency_metric="latency_ms_median",
        metrics=classification_metrics(LABELS, predictions, 2) | {"latency_ms_median": latency_ms},
        measurements={"weight_bytes": weight_mb * MB, "disk_bytes": weight_mb * MB, "quantize_s": 0.1},
        per_example={"predictions": predictions, "labels": LABELS},
    )


def perplexity(method, scale, weight_mb, ms_per_token, per_example=True) -> CellResult:
    nll = list(np.linspace(1500, 1700, 12) * scale)
    tokens = [512] * 12
    return CellResult(
        "tiny-llama",
        method,
        "perplexity(max_tokens=6144)",
        "ok",
        method_name=method,
        task_name="perplexity",
        quality_metric="perplexity",
        higher_is_better=False,
        latency_metric="ms_per_token",
        metrics={
            "perplexity": math.exp(sum(nll) / sum(tokens)),
            "n_tokens": sum(tokens),
            "n_forwards": 3,
            "ms_per_token": ms_per_token,
        },
        measurements={"weight_bytes": weight_mb * MB, "disk_bytes": weight_mb * MB, "quantize_s": 0.2},
        per_example={"window_nll_sum": nll, "window_tokens": tokens} if per_example else {},
    )


def results(device="cpu", per_example=True) -> Results:
    env = {"hardware": {"cpu": "Test CPU", "cpu_count": 2}, "packages": {"torch": "2.x"}}
    env["memory_bandwidth"] = {"device": device, "bytes_per_s": 20e9, "source": "measured: test"}
    cells = [
        classification("fp32", 0, 90, 9.0),
        classification("own-int8", 1, 25, 20.0),
        classification("own-int4", 25, 15, 6.0),
        CellResult("tiny-bert", "nf4", "classification(dataset=tiny)", "skipped", reason="needs cuda"),
        perplexity("fp32", 1.0, 500, 6.0, per_example),
        perplexity("own-int8", 1.002, 130, 5.0, per_example),
        perplexity("own-int4", 1.1, 70, 5.5, per_example),
    ]
    for c in cells:
        c.device = device
    return Results("fp32", env, {"device": device}, cells)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    (out / "results.json").write_text(json.dumps(results().to_json()))
    write_report(Report(load_runs([out])), out)
    return out


def test_every_view_is_written(report_dir):
    for name in ("results.md", "results.csv", "report.json", "report.html"):
        assert (report_dir / name).stat().st_size > 0
    pngs = sorted(p.name for p in (report_dir / "charts").iterdir())
    assert any(n.endswith("-accuracy.png") for n in pngs) and any(n.endswith("-pareto.png") for n in pngs)
    assert any(n.endswith("-confusion.png") for n in pngs) and any(n.endswith("-perplexity.png") for n in pngs)
    assert all((report_dir / "charts" / n).read_bytes().startswith(PNG) for n in pngs)


def test_markdown_has_statistics_roofline_and_recommendation(report_dir):
    md = (report_dir / "results.md").read_text()
    assert "## Recommendation" in md and "use `own-int8`" in md
    assert "ruled out by quality drop 20.83 pt > 1.00 pt" in md  # own-int4: 25 of 120 flipped
    assert "not significant (p=1.000)" in md  # own-int8: one flipped example
    assert "McNemar exact" in md and "paired bootstrap" in md
    assert "Only 12 windows" in md
    assert "## Trade-offs" in md and "Best use case" in md
    assert "Overhead-bound" in md and "why is INT8 slower than FP16" in md  # own-int8 classification: slower
    assert "Compute-bound" in md  # perplexity: 2048 tokens per weight read
    assert "![Pareto" in md and "skipped: needs cuda" in md


def test_csv_and_json_carry_the_statistics(report_dir):
    with open(report_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    int4 = next(r for r in rows if r["Quantization"] == "own-int4" and r["Task"].startswith("classification"))
    assert int4["Test"] == "McNemar exact" and int4["Significant"] == "True"
    assert float(int4["Quality CI Low"]) < float(int4["Accuracy"]) < float(int4["Quality CI High"])
    assert float(int4["Memory Floor (ms)"]) == pytest.approx(15 * MB / 20e9 * 1000)
    data = json.loads((report_dir / "report.json").read_text())
    group = data["groups"][0]
    assert group["recommendation"]["choice"] == "own-int8"
    assert group["cells"][1]["comparisons"]["accuracy"]["discordant"] == [1, 0]


def test_html_is_self_contained_and_sortable(report_dir):
    page = (report_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list((report_dir / "charts").iterdir()))
    assert "http://" not in page and "https://" not in page
    assert 'class="sortable"' in page and "addEventListener" in page
    assert '<td class="text ns">' in page or 'class="num ns"' in page


def test_older_records_without_per_example_data(tmp_path):
    old = results(per_example=False)
    old.environment.pop("memory_bandwidth")
    for c in old.cells:
        c.metrics.pop("n_forwards", None)
    md = markdown(document(Report([Run("old", old)])))
    assert "confidence intervals and paired tests are absent" in md
    assert "Memory bandwidth unknown" in md


def test_combined_report_of_two_runs(tmp_path):
    for name, device in (("cpu-run", "cpu"), ("gpu-run", "cuda")):
        run = results(device)
        run.cells = [c for c in run.cells if c.task_name == "classification"]  # fewer charts: a faster test
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(run.to_json()))
    out = tmp_path / "combined"
    result = CliRunner().invoke(
        app, ["report", str(tmp_path / "cpu-run"), str(tmp_path / "gpu-run"), "--output-dir", str(out)]
    )
    assert result.exit_code == 0, result.output
    md = (out / "results.md").read_text()
    assert "tiny-bert · classification(dataset=tiny) · cuda · gpu-run" in md and "**cpu-run**" in md
    with open(out / "results.csv") as f:
        assert {r["Run"] for r in csv.DictReader(f)} == {"cpu-run", "gpu-run"}
    assert (out / "report.html").is_file()


def test_report_command_errors(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "holds neither results.sqlite nor results.json" in result.output


def test_roofline_floor_and_bandwidth():
    cell = classification("fp32", 0, 90, 9.0)
    line = roofline(cell, 20e9)
    assert line.floor_ms == pytest.approx(4.5) and line.efficiency == pytest.approx(0.5)
    ppl = roofline(perplexity("fp32", 1.0, 500, 6.0), 20e9)
    assert ppl.floor_ms == pytest.approx(3 / 6144 * 500 * MB / 20e9 * 1000) and ppl.compute_bound
    assert roofline(cell, None) is None
    # Log-likelihood tasks: 40 examples in 4 forwards of 1,000 positions each, 30 ms per example.
    scored = CellResult("m", "fp32", "arc_easy", "ok", latency_metric="ms_per_example")
    scored.metrics = {"ms_per_example": 30.0, "n_examples": 40, "n_forwards": 4, "n_tokens_forwarded": 4000}
    scored.measurements = {"weight_bytes": 100 * MB}
    line = roofline(scored, 20e9)
    assert line.floor_ms == pytest.approx(4 / 40 * 100 * MB / 20e9 * 1000) and line.compute_bound
    assert measure_bandwidth(nbytes=8 << 20, repeats=2) > 1e8
    env = record_bandwidth({}, "cpu")
    assert env["memory_bandwidth"]["device"] == "cpu" and env["memory_bandwidth"]["bytes_per_s"] > 0


def chromium(*args: str) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    flags += ["--disable-component-update", "--no-first-run"]
    done = subprocess.run(["chromium", *flags, *args], check=True, capture_output=True, text=True, timeout=120)
    return done.stdout


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium (apt-get install chromium)")


@needs_chromium
def test_html_renders_in_headless_chromium(report_dir, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1400,2000", (report_dir / "report.html").as_uri())
    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1400)
    # A rendered page, not a blank one: many distinct colours (text, tables, charts).
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1])[::97], axis=0)) > 50


@needs_chromium
def test_tables_sort_on_a_header_click(report_dir, tmp_path):
    click = (
        "<script>const t = document.querySelectorAll('table.sortable')[1];"
        "[...t.querySelectorAll('th')].find(h => h.textContent === 'Weight MB').click();</script></body>"
    )
    page = tmp_path / "click.html"
    page.write_text((report_dir / "report.html").read_text().replace("</body>", click))
    dom = chromium("--dump-dom", page.as_uri())
    table = re.findall(r'<table class="sortable">(.*?)</table>', dom, re.S)[1]
    assert 'data-order="asc"' in table
    methods = re.findall(r"<tr class=\"\w+\"><td class=\"text\">([^<]+)</td>", table)
    assert methods == ["own-int4", "own-int8", "fp32", "nf4"]  # by weight MB; the skipped row has none: last


def test_a_method_caveat_is_shown_with_its_results():
    run = results()
    run.cells[1].caveat = "its scores depend on the batch"
    md = markdown(document(Report([Run("caveat", run)])))
    assert md.count("own-int8: its scores depend on the batch.") == 1
