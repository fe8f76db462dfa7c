"""Each cell's statistics and roofline, computed once per report, and the runs and groups a report is made of.

Several runs (output dirs of ``quantarena run``, e.g. one on a CPU and one on a GPU) make one combined report:
each keeps its own baseline, statistics and roofline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quantarena.environment import environment
from quantarena.errors import QuantarenaError
from quantarena.recommend import Constraints, Recommendation, recommend_group
from quantarena.results import CellResult, Results
from quantarena.roofline import Roofline, bandwidth_of, measure_bandwidth, roofline
from quantarena.stats import Comparison, Estimate, compare, estimates


@dataclass(frozen=True)
class Run:
    label: str
    results: Results
    bandwidth_bytes_per_s: float | None = None
    bandwidth_source: str = ""


@dataclass(frozen=True)
class CellAnalysis:
    estimates: dict[str, Estimate]
    comparisons: dict[str, Comparison]
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

    @classmethod
    def of(cls, results: Results) -> Report:
        env = results.environment
        return cls([Run("", results, bandwidth_of(env, results.config.get("device", "cpu")), _recorded(env))])

    def analysis(self, group: Group, cell: CellResult) -> CellAnalysis:
        if id(cell) not in self._analyses:
            self._analyses[id(cell)] = analyze(group.results, cell, group.run.bandwidth_bytes_per_s)
        return self._analyses[id(cell)]

    def recommendation(self, group: Group) -> Recommendation:
        return recommend_group(group.results, group.cells, self.limits)


def _recorded(environment: dict) -> str:
    return (environment.get("memory_bandwidth") or {}).get("source", "")


def _same_hardware(recorded: dict) -> bool:
    then, now = recorded.get("hardware", {}), environment()["hardware"]
    return all(then.get(k) == now.get(k) for k in ("cpu", "gpu", "machine"))


def load_runs(dirs: list[Path], bandwidth_gbs: float | None = None, measure: bool = True) -> list[Run]:
    """Read each dir's results.json; the bandwidth is configured, else recorded, else measured here (if
    ``measure`` and the results came from this hardware), else unknown."""
    runs = []
    names = [d.resolve().name for d in dirs]
    for d, name in zip(dirs, names, strict=True):
        path = d / "results.json"
        if not path.is_file():
            raise QuantarenaError(f"{path} does not exist: give the output dir of a quantarena run")
        try:
            results = Results.read(path)
        except (ValueError, KeyError, TypeError) as e:
            raise QuantarenaError(f"{path} is not a quantarena results file: {e}") from None
        label = name if names.count(name) == 1 else str(d)
        device = results.config.get("device", "cpu")
        if bandwidth_gbs:
            bandwidth, source = bandwidth_gbs * 1e9, "configured (--bandwidth-gbs)"
        elif (bandwidth := bandwidth_of(results.environment, device)) is not None:
            source = _recorded(results.environment)
        elif measure and _same_hardware(results.environment) and _device_here(device):
            bandwidth, source = measure_bandwidth(device), "measured now, on the hardware of the run"
        else:
            bandwidth, source = None, ""
        runs.append(Run(label, results, bandwidth, source))
    return runs


def _device_here(device: str) -> bool:
    return device == "cpu" or torch.cuda.is_available()
