"""The package's rooms import only downwards, and importing a low room does not drag the high ones in."""

import ast
import subprocess
import sys
from pathlib import Path

import quantarena

PACKAGE = Path(quantarena.__file__).parent
# Lower number = lower room; a room imports only from lower ones, except that the shared modules at the top
# (level 0) and the entry points (level 8) use their neighbours. A method never knows about tasks, a task never
# knows about methods, and the report knows neither.
RANKS = {
    "errors": 0, "numerics": 0, "registry": 0, "environment": 0, "results": 0, "metrics": 0, "measure": 0,
    "extensions": 0,
    "data": 1,
    "models": 2, "llamacpp": 2, "llmc": 2, "llmc_worker": 2,  # programs outside this environment
    "ownquant": 3, "halfgemm": 3,  # kernels
    "methods": 4, "tasks": 4, "report": 4,
    "config": 5,
    "workflows": 6,
    "sweep": 7,
    "cli": 8, "__init__": 8, "__main__": 8,
}  # fmt: skip


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> list[tuple[str, str, int]]:
    """(importing module, imported quantarena module, line) for every import, inside functions too."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantarena"):
                targets = [node.module] if node.module != "quantarena" else [f"quantarena.{a.name}" for a in node.names]
                found += [(module, target, node.lineno) for target in targets]
            elif isinstance(node, ast.Import):
                found += [(module, a.name, node.lineno) for a in node.names if a.name.startswith("quantarena.")]
    return found


def test_every_module_belongs_to_a_room():
    modules = {m for m, _, _ in imports()} | {t for _, t, _ in imports()}
    assert {room(m) for m in modules} <= set(RANKS), sorted({room(m) for m in modules} - set(RANKS))


NEIGHBOURLY = {0, 8}


def wrong_way(importer: str, target: str) -> bool:
    mine, theirs = RANKS[room(importer)], RANKS[room(target)]
    return room(importer) != room(target) and (theirs > mine or (theirs == mine and mine not in NEIGHBOURLY))


def test_no_import_runs_upwards_or_sideways():
    wrong = [
        f"{importer} -> {target} (line {line})" for importer, target, line in imports() if wrong_way(importer, target)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_import():
    assert wrong_way("quantarena.tasks.divergence", "quantarena.methods")
    assert wrong_way("quantarena.report.analysis", "quantarena.sweep.api")
    assert wrong_way("quantarena.models", "quantarena.tasks.base")
    assert not wrong_way("quantarena.sweep.api", "quantarena.report")
    assert not wrong_way("quantarena.results", "quantarena.errors")


def test_importing_models_loads_no_backend_or_task():
    code = (
        "import sys, quantarena.models, quantarena.data, quantarena.measure; "
        "print(sorted(m for m in sys.modules if m.startswith(('quantarena.methods', 'quantarena.tasks', "
        "'quantarena.report', 'quantarena.sweep', 'matplotlib', 'scipy'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
