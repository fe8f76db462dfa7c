"""lm-evaluation-harness on the same documents as quantarena's tasks, for the agreement test and the benchmark.

lm-eval is a dev dependency (``pip install 'quantarena[dev]'``). Its own task YAMLs (prompts, choices,
metrics, MMLU's first-n few-shot sampler, WikiText's detokenizer and word/byte counts) are loaded from the
installed package and only their dataset is replaced: the records quantarena read from the offline data
folder, passed as an in-memory ``custom_dataset``, so nothing is downloaded. HellaSwag is the exception: its
YAML's ``process_docs`` needs the original fields (ctx_a, ctx_b), which the offline copy lacks, so lm-eval
gets the preprocessed query and endings directly and only its scoring is compared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DROPPED = ("tag", "dataset_path", "dataset_name", "training_split", "validation_split", "test_split", "process_docs")
DROPPED += ("should_decontaminate", "doc_to_decontamination_query", "task_alias")


@dataclass(frozen=True)
class HarnessTask:
    yaml: str  # path under lm_eval/tasks
    splits: dict[str, list[dict]]  # "test" is evaluated; "dev" serves MMLU's few-shot examples
    overrides: dict[str, Any]


def _tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def task_config(name: str, task: HarnessTask) -> dict[str, Any]:
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml

    config = {k: v for k, v in load_yaml(_tasks_dir() / task.yaml).items() if k not in DROPPED}
    splits = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in task.splits.items()})
    custom: Callable[..., datasets.DatasetDict] = lambda **_: splits  # noqa: E731
    return config | {"task": name, "custom_dataset": custom, "test_split": "test"} | task.overrides


def arc(records: list[dict]) -> HarnessTask:
    return HarnessTask("arc/arc_easy.yaml", {"test": records}, {})


def mmlu_subject(subject: str, test: list[dict], dev: list[dict]) -> HarnessTask:
    return HarnessTask(f"mmlu/default/mmlu_{subject}.yaml", {"test": test, "dev": dev}, {"fewshot_split": "dev"})


def hellaswag(questions: list[Any]) -> HarnessTask:
    docs = [{"query": q.context, "choices": list(q.choices), "label": q.gold} for q in questions]
    return HarnessTask("hellaswag/hellaswag.yaml", {"test": docs}, {})


def lambada(texts: list[str]) -> HarnessTask:
    return HarnessTask("lambada/lambada_openai.yaml", {"test": [{"text": t} for t in texts]}, {})


def wikitext(pages: list[str]) -> HarnessTask:
    return HarnessTask("wikitext/wikitext.yaml", {"test": [{"page": p} for p in pages]}, {})


@dataclass
class HarnessRun:
    metrics: dict[str, dict[str, Any]]  # task -> lm-eval's "metric,none" -> value
    responses: dict[str, list[list[tuple[float, bool]]]]  # task -> per document, per request: (loglik, greedy)
    # Inside the model's loglikelihood calls only (tokenization and scoring), not lm-eval's task building.
    scoring_s: float
    tokens_forwarded: int  # input positions of its model calls, padding included; it takes logits at every one


def _counted_calls(lm: Any) -> list[int]:
    """Input positions of every model call (HFLM's ``_model_call``), padding included."""
    counted: list[int] = []
    call = lm._model_call

    def wrapper(inps, *args, **kwargs):
        counted.append(inps.numel())
        return call(inps, *args, **kwargs)

    lm._model_call = wrapper
    return counted


def _timed_methods(lm: Any, names: tuple[str, ...]) -> list[float]:
    spent: list[float] = []
    for name in names:
        method = getattr(lm, name)

        def wrapper(*args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - start)

        setattr(lm, name, wrapper)
    return spent


def run(
    tasks: dict[str, HarnessTask],
    model_dir: Path,
    *,
    batch_size: int,
    device: str = "cpu",
    num_fewshot: int | None = None,
    max_length: int | None = None,
) -> HarnessRun:
    """lm-eval's HFLM on ``model_dir`` (float32, as quantarena's baseline), its default settings otherwise."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    extra = {"max_length": max_length} if max_length else {}
    lm = HFLM(pretrained=str(model_dir), batch_size=batch_size, device=device, dtype="float32", **extra)
    configs = [task_config(name, t) for name, t in tasks.items()]
    spent = _timed_methods(lm, ("loglikelihood", "loglikelihood_rolling"))
    counted = _counted_calls(lm)
    out = simple_evaluate(
        model=lm,
        tasks=configs,
        num_fewshot=num_fewshot,
        log_samples=True,
        task_manager=TaskManager(),
        verbosity="ERROR",
    )
    responses = {
        name: [[tuple(r[0]) if isinstance(r[0], (list, tuple)) else (r[0], False) for r in s["resps"]] for s in samples]
        for name, samples in ((n, sorted(out["samples"][n], key=lambda s: s["doc_id"])) for n in tasks)
    }
    return HarnessRun({n: out["results"][n] for n in tasks}, responses, sum(spent), sum(counted))
