"""Everything a report derives from its results, computed once per report: each cell's statistics and roofline,
each group's recommendation and use cases; and the runs and groups a report is made of.

Several runs (output dirs of ``quantarena run``, e.g. one on a CPU and one on a GPU) make one combined report:
each keeps its own baseline, statistics and roofline.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantarena.report.recommend import Constraints, Recommendation, recommend_group, use_cases
from quantarena.report.roofline import Roofline, bandwidth_of, roofline
from quantarena.report.stats import Estimate, PairedTest, compare, estimates
from quantarena.results import CellResult, Results


@dataclass(frozen=True)
class Run:
    label: str
    results: Results
    bandwidth_bytes_per_s: float | None = None
    bandwidth_source: str = ""

    @classmethod
    def recorded(cls, results: Results, label: str = "") -> Run:
        """The run with the memory bandwidth recorded in its environment, if any."""
        env = results.environment
        bandwidth = bandwidth_of(env, results.config.get("device", "cpu"))
        return cls(label, results, bandwidth, (env.get("memory_bandwidth") or {}).get("source", ""))


@dataclass(frozen=True)
class CellAnalysis:
    estimates: dict[str, Estimate]
    comparisons: dict[str, PairedTest]
    roofline: Roofline | None


def analyze(results: Results, cell: CellResult, bandwidth_bytes_per_s: float | None = None) -> CellAnalysis:
    if cell.status != "ok":
        return CellAnalysis({}, {}, None)
    base = results.baseline_of(cell)
    paired = compare(cell, base) if base is not None and base is not cell else {}
    return CellAnalysis(estimates(cell), paired, roofline(cell, bandwidth_bytes_per_s))


def grouped(results: Results) -> dict[tuple[str, str], list[CellResult]]:
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for cell in results.cells:
        groups.setdefault((cell.model, cell.task), []).append(cell)
    return groups


@dataclass(frozen=True)
class Group:
    """One model x task of one run: the unit every table, test and recommendation works within."""

    run: Run
    cells: list[CellResult]
    title: str
    series: str  # the name of this group's bars and points in the charts
    short: str  # model · task name, where that is unambiguous

    @property
    def results(self) -> Results:
        return self.run.results

    @property
    def baseline(self) -> CellResult | None:
        return self.results.baseline_of(self.cells[0])


class Report:
    """The runs, their groups, and each cell's statistics and roofline, computed once for every view."""

    def __init__(self, runs: list[Run], limits: Constraints | None = None):
        self.runs = runs
        self.limits = limits or Constraints()
        several = len(runs) > 1
        named = [(run, model, cells) for run in runs for (model, _), cells in grouped(run.results).items()]
        shorts = [
            f"{model} · {cells[0].task_name}" + (f" · {run.label}" if several else "") for run, model, cells in named
        ]
        self.groups = []
        for (run, model, cells), short in zip(named, shorts, strict=True):
            suffix = f" · {run.label}" if several else ""
            title = f"{model} · {cells[0].task} · {cells[0].device}{suffix}"
            self.groups.append(
                Group(run, cells, title, f"{model}{suffix}", short if shorts.count(short) == 1 else title)
            )
        self._analyses: dict[int, CellAnalysis] = {}
        self._recommendations: dict[int, Recommendation] = {}
        self._use_cases: dict[int, dict[str, str]] = {}

    @classmethod
    def of(cls, results: Results, limits: Constraints | None = None) -> Report:
        return cls([Run.recorded(results)], limits)

    def analysis(self, group: Group, cell: CellResult) -> CellAnalysis:
        if id(cell) not in self._analyses:
            self._analyses[id(cell)] = analyze(group.results, cell, group.run.bandwidth_bytes_per_s)
        return self._analyses[id(cell)]

    def recommendation(self, group: Group) -> Recommendation:
        if id(group) not in self._recommendations:
            tests = [self.analysis(group, c).comparisons.get(c.quality_metric or "") for c in group.cells]
            self._recommendations[id(group)] = recommend_group(
                group.results.baseline, group.baseline, group.cells, tests, self.limits
            )
        return self._recommendations[id(group)]

    def use_cases(self, group: Group) -> dict[str, str]:
        if id(group) not in self._use_cases:
            self._use_cases[id(group)] = use_cases(group.baseline, group.cells, self.limits)
        return self._use_cases[id(group)]
