"""The recommendation on hand-made results: which variant meets the limits, and what rules out each other one."""

import json

import pytest
from typer.testing import CliRunner

from quantarena.cli import app
from quantarena.report import Constraints, Report
from quantarena.results import CellResult, Results

MB = 1_000_000


def cell(method, accuracy, weight_mb, latency_ms, status="ok") -> CellResult:
    if status != "ok":
        return CellResult("m", method, "classification", status, reason="needs cuda", task_name="classification")
    return CellResult(
        "m",
        method,
        "classification",
        "ok",
        task_name="classification",
        quality_metric="accuracy",
        latency_metric="latency_ms_median",
        metrics={"accuracy": accuracy, "latency_ms_median": latency_ms},
        measurements={"weight_bytes": weight_mb * MB, "disk_bytes": weight_mb * MB, "quantize_s": 0.0},
    )


@pytest.fixture()
def results() -> Results:
    return Results(
        "fp32",
        {},
        {},
        [
            cell("fp32", 0.910, 400, 20.0),
            cell("bf16", 0.909, 200, 30.0),  # smaller but slower
            cell("int8", 0.905, 110, 12.0),  # 0.5-point drop
            cell("int4", 0.880, 60, 10.0),  # 3-point drop
            cell("nf4", 0.0, 0, 0.0, status="skipped"),
        ],
    )


def recommend(results: Results, limits: Constraints) -> list:
    report = Report.of(results, limits)
    return [report.recommendation(group) for group in report.groups]


def use_cases(results: Results, limits: Constraints) -> dict[str, str]:
    report = Report.of(results, limits)
    (group,) = report.groups
    return report.use_cases(group)


def verdicts(rec) -> dict[str, str]:
    return {c.method: c.verdict for c in rec.candidates}


def test_smallest_within_the_quality_limit(results):
    (rec,) = recommend(results, Constraints(max_drop=1.0))
    assert rec.choice == "int8"
    v = verdicts(rec)
    assert v["int4"] == "ruled out by quality drop 3.00 pt > 1.00 pt"
    assert v["fp32"].startswith("meets the limits, but int8 is smaller")
    assert v["nf4"] == "ruled out by skipped: needs cuda"
    assert "use `int8`" in rec.summary() and "quality drop 0.50 pt" in rec.summary()


def test_looser_quality_limit_and_memory_limit(results):
    (rec,) = recommend(results, Constraints(max_drop=5.0))
    assert rec.choice == "int4"
    (rec,) = recommend(results, Constraints(max_drop=5.0, max_memory_mb=50))
    assert rec.choice is None
    assert verdicts(rec)["int4"] == "ruled out by weights 60.0 MB > 50 MB"
    assert "no variant meets quality drop ≤ 5 pt, weights ≤ 50 MB" in rec.summary()


def test_latency_limit_and_preference(results):
    (rec,) = recommend(results, Constraints(max_drop=0.2, max_latency_ms=25))
    assert rec.choice == "fp32"
    assert verdicts(rec)["bf16"] == "ruled out by latency 30 ms > 25 ms"
    assert verdicts(rec)["int8"].startswith("ruled out by quality drop 0.50 pt > 0.20 pt")
    (rec,) = recommend(results, Constraints(max_drop=1.0, prefer="latency"))
    assert rec.choice == "int8"
    assert verdicts(rec)["bf16"] == "meets the limits, but int8 is faster (12 vs 30 ms)"


def test_perplexity_drop_is_relative_percent():
    def ppl(method, value, mb):
        c = cell(method, 0, mb, 5.0)
        c.quality_metric, c.higher_is_better, c.task_name = "perplexity", False, "perplexity"
        c.metrics = {"perplexity": value, "latency_ms_median": 5.0}
        return c

    results = Results("fp32", {}, {}, [ppl("fp32", 20.0, 500), ppl("int8", 20.3, 200), ppl("int4", 21.0, 150)])
    (rec,) = recommend(results, Constraints(max_drop=2.0))
    assert rec.choice == "int8"  # +1.5% perplexity; int4 is +5%
    assert verdicts(rec)["int4"] == "ruled out by quality drop 5.00% > 2.00%"


def test_use_cases(results):
    lines = use_cases(results, Constraints(max_drop=1.0))
    assert lines["fp32"].startswith("the reference") and "best quality" in lines["fp32"]
    assert "memory-constrained deployment" in lines["int8"] and "latency-critical" in lines["int8"]
    assert lines["int4"].startswith("smallest overall, if a 3.00 pt quality drop is acceptable")
    assert "a middle ground" in lines["bf16"]
    assert lines["nf4"].startswith("did not run here")


def test_dominated_variant_has_no_use_case():
    results = Results("fp32", {}, {}, [cell("fp32", 0.91, 400, 20), cell("a", 0.90, 100, 10), cell("b", 0.89, 120, 11)])
    assert use_cases(results, Constraints(max_drop=5))["b"].startswith("none here: a is at least")


def test_recommend_command(tmp_path, results):
    (tmp_path / "results.json").write_text(json.dumps(results.to_json()))
    ok = CliRunner().invoke(app, ["recommend", str(tmp_path), "--max-drop", "1"])
    assert ok.exit_code == 0, ok.output
    assert "use `int8`" in ok.stdout and "int4: ruled out by quality drop 3.00 pt > 1.00 pt" in ok.stdout
    none = CliRunner().invoke(app, ["recommend", str(tmp_path), "--max-memory-mb", "10"])
    assert none.exit_code == 1 and "no variant meets" in none.stdout
    bad = CliRunner().invoke(app, ["recommend", str(tmp_path), "--prefer", "speed"])
    assert bad.exit_code == 2
    missing = CliRunner().invoke(app, ["recommend", str(tmp_path / "nope")])
    assert missing.exit_code == 2


def test_a_drop_of_exactly_the_limit_meets_it():
    exact = Results("fp32", {}, {}, [cell("fp32", 0.53, 400, 20.0), cell("bf16", 0.52, 200, 30.0)])
    (rec,) = recommend(exact, Constraints(max_drop=1.0))  # 0.53 - 0.52 is 0.010000000000000009 in floats
    assert rec.choice == "bf16"
