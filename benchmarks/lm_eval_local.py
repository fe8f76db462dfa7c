"""lm-eval task YAMLs that read the offline data folder, for lm-eval's CLI and quantarena's ``lm-eval`` task.

Each YAML includes lm-eval's installed one (prompts, choices, metrics, few-shot sampler) and replaces only
its dataset with the local file, under the installed task's own name: a folder passed as ``--include_path``
overrides the installed task, so ``--tasks arc_easy`` (or the ``mmlu`` group, whose subject tasks are
overridden one by one) evaluates the local records. MMLU's records are split per subject into the folder.

HellaSwag is the exception: the offline copy is llama.cpp's preprocessed text (``ctx``, ``endings``), not
the original fields the installed YAML's ``process_docs`` reads, so its YAML names a ``process_docs`` of its
own (a ``!function``: Python in the folder, which quantarena runs only with ``trust_code = true``) applying
lm-eval's own ``preprocess`` to that text.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "lambada_openai", "mmlu")

# The offline folder holds only the evaluated split.
NO_SPLITS = {"training_split": "null", "validation_split": "null"}

HELLASWAG_UTILS = """from lm_eval.tasks.hellaswag.utils import preprocess


def process_docs(dataset):
    return dataset.map(
        lambda doc: {
            "query": preprocess(doc["ctx"]),
            "choices": [preprocess(e) for e in doc["endings"]],
        }
    )
"""


def _installed(relative: str) -> str:
    import lm_eval

    return str(Path(lm_eval.__file__).parent / "tasks" / relative)


def _yaml(task: str, include: str, files: dict[str, Path], **extra: str) -> str:
    # JSON is YAML: paths and texts need no escaping of their own.
    lines = [f"task: {task}", f"include: {json.dumps(include)}", "dataset_path: json", "dataset_name: null"]
    lines.append(f"dataset_kwargs: {json.dumps({'data_files': {k: str(v) for k, v in files.items()}})}")
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def _read(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_tasks(data_dir: Path, folder: Path) -> Path:
    """The YAMLs (and MMLU's per-subject files) in ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    arc = data_dir / "arc"
    (folder / "arc_easy.yaml").write_text(
        _yaml("arc_easy", _installed("arc/arc_easy.yaml"), {"test": arc / "ARC-Easy-test.jsonl"}, **NO_SPLITS)
    )
    (folder / "arc_challenge.yaml").write_text(
        _yaml(
            "arc_challenge",
            _installed("arc/arc_challenge.yaml"),
            {"test": arc / "ARC-Challenge-test.jsonl"},
            **NO_SPLITS,
        )
    )
    (folder / "lambada_openai.yaml").write_text(
        _yaml(
            "lambada_openai",
            _installed("lambada/lambada_openai.yaml"),
            {"test": data_dir / "lambada_openai" / "lambada_test.jsonl"},
        )
    )
    (folder / "hellaswag_local_utils.py").write_text(HELLASWAG_UTILS)
    (folder / "hellaswag.yaml").write_text(
        _yaml(
            "hellaswag",
            _installed("hellaswag/hellaswag.yaml"),
            {"validation": data_dir / "hellaswag" / "validation_preprocessed.jsonl.gz"},
            process_docs="!function hellaswag_local_utils.process_docs",
            training_split="null",
        )
    )
    subjects = folder / "mmlu_data"
    subjects.mkdir(exist_ok=True)
    splits = {"test": _read(data_dir / "mmlu" / "test.jsonl.gz"), "dev": _read(data_dir / "mmlu" / "dev.jsonl")}
    for subject in sorted({r["subject"] for r in splits["test"]}):
        files = {}
        for split, records in splits.items():
            files[split] = subjects / f"{subject}_{split}.jsonl"
            files[split].write_text("".join(json.dumps(r) + "\n" for r in records if r["subject"] == subject))
        (folder / f"mmlu_{subject}.yaml").write_text(
            _yaml(f"mmlu_{subject}", _installed(f"mmlu/default/mmlu_{subject}.yaml"), files)
        )
    return folder
