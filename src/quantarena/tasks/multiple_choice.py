"""Multiple choice by log-likelihood, as lm-evaluation-harness scores it: ARC-Easy, ARC-Challenge, MMLU, HellaSwag.

Each choice is the continuation ``" " + choice`` of the question's prompt (lm-eval's target delimiter).
``acc``: the choice with the highest summed log-likelihood is the gold one. ``acc_norm``: the same after
dividing each log-likelihood by the choice's length in characters (without the delimiter). Ties go to the
first choice (numpy's argmax), as in lm-eval. Standard errors are lm-eval's ``mean_stderr``: the sample
standard deviation of the 0/1 scores over sqrt(n). The prompts are lm-eval's task YAMLs, written out here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator

from quantarena.data import read_records, require_columns
from quantarena.errors import DataError
from quantarena.metrics import accuracy_stderr
from quantarena.tasks import scoring
from quantarena.tasks.base import EvalContext, Task, TaskOutput, register

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"

# lm-eval's MMLU subject groups (tasks/mmlu/_generate_configs.py).
MMLU_CATEGORIES = {
    "stem": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning"
    ),
    "other": (
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"
    ),
    "social_sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
        "public_relations security_studies sociology us_foreign_policy"
    ),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
        "professional_law world_religions"
    ),
}
MMLU_SUBJECTS = {s: category for category, names in MMLU_CATEGORIES.items() for s in names.split()}


@dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...]  # as lm-eval's doc_to_choice: their lengths normalize acc_norm
    gold: int
    subject: str = ""


def predictions(logprobs: list[float], choices: tuple[str, ...]) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction): argmax of the log-likelihoods, raw and per character."""
    lls = np.asarray(logprobs)
    lengths = np.asarray([float(len(c)) for c in choices])
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def pooled_stderr(stderrs: list[float], sizes: list[int]) -> float:
    """lm-eval's ``pooled_sample_stderr``: a group's stderr from its subtasks' stderrs and sizes (NaN when
    every subtask has a single example)."""
    if sum(sizes) <= len(sizes):
        return math.nan
    # A single-example subtask has no variance of its own (its stderr is NaN): it adds nothing.
    pooled_var = sum((n - 1) * se**2 * n for n, se in zip(sizes, stderrs, strict=True) if n > 1)
    pooled_var /= sum(sizes) - len(sizes)
    return math.sqrt(pooled_var / sum(sizes))


def _accuracy(correct: list[bool]) -> tuple[float, float]:
    acc = sum(correct) / len(correct)
    return acc, accuracy_stderr(acc, len(correct))


class MultipleChoiceConfig(scoring.LogLikelihoodConfig):
    pass


class MultipleChoice(Task):
    model_kind = "causal-lm"
    Config = MultipleChoiceConfig
    higher_is_better = True
    latency_metric = "ms_per_example"
    columns: ClassVar[tuple[str, ...]]

    def records(self) -> list[dict]:
        records = read_records(self.config.dataset, self.data_dir, self.config.split)
        require_columns(records, list(self.columns), self.config.dataset)
        return records

    def load(self) -> list[Question]:
        return self.config.select([self.question(r) for r in self.records()])

    def question(self, record: dict) -> Question:
        raise NotImplementedError

    def group_metrics(self, data: list[Question], correct: list[bool]) -> dict[str, Any]:
        return {}

    def evaluate(self, ctx: EvalContext, data: list[Question]) -> TaskOutput:
        pairs = [(q.context, TARGET_DELIMITER + c) for q in data for c in q.choices]
        run = scoring.score(ctx, scoring.encode(ctx, pairs), self.config)
        logprobs, start = [], 0
        for q in data:
            logprobs.append([s.logprob for s in run.scored.scores[start : start + len(q.choices)]])
            start += len(q.choices)
        preds = [predictions(lp, q.choices) for lp, q in zip(logprobs, data, strict=True)]
        labels = [q.gold for q in data]
        correct = [p == y for (p, _), y in zip(preds, labels, strict=True)]
        correct_norm = [p == y for (_, p), y in zip(preds, labels, strict=True)]
        acc, acc_se = _accuracy(correct)
        acc_norm, acc_norm_se = _accuracy(correct_norm)
        metrics = {"acc": acc, "acc_stderr": acc_se, "acc_norm": acc_norm, "acc_norm_stderr": acc_norm_se}
        metrics |= self.group_metrics(data, correct) | run.metrics(len(data))
        per_example = {
            "predictions": [p for p, _ in preds],
            "predictions_norm": [p for _, p in preds],
            "labels": labels,
            "choice_logprobs": logprobs,
        }
        return TaskOutput(metrics, per_example)


def _gold(record: dict, labels: list, key: Any, dataset: str) -> int:
    if key not in labels:
        raise DataError(f"dataset {dataset}: answer {key!r} is not one of the choice labels {labels}")
    return labels.index(key)


class ArcConfig(MultipleChoiceConfig):
    dataset: str = "arc_easy"


class ArcChallengeConfig(MultipleChoiceConfig):
    dataset: str = "arc_challenge"


@register
class ArcEasy(MultipleChoice):
    name = "arc_easy"
    description = "ARC-Easy multiple choice (lm-eval prompt): acc, acc_norm with stderr"
    Config = ArcConfig
    quality_metric = "acc_norm"
    columns = ("question", "choices", "answerKey")

    def question(self, record: dict) -> Question:
        choices = record["choices"]
        if not isinstance(choices, dict) or not {"text", "label"} <= set(choices):
            raise DataError(f"dataset {self.config.dataset}: 'choices' must be {{text: [...], label: [...]}}")
        return Question(
            f"Question: {record['question']}\nAnswer:",
            tuple(choices["text"]),
            _gold(record, list(choices["label"]), record["answerKey"], self.config.dataset),
        )


@register
class ArcChallenge(ArcEasy):
    name = "arc_challenge"
    description = "ARC-Challenge multiple choice (lm-eval prompt): acc, acc_norm with stderr"
    Config = ArcChallengeConfig


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess`` (WikiHow bracket artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


class HellaswagConfig(MultipleChoiceConfig):
    dataset: str = "hellaswag"
    split: str = "validation"


@register
class Hellaswag(MultipleChoice):
    name = "hellaswag"
    description = "HellaSwag sentence completion (lm-eval prompt): acc, acc_norm with stderr"
    Config = HellaswagConfig
    quality_metric = "acc_norm"
    columns = ("endings", "label")

    def question(self, record: dict) -> Question:
        if {"ctx_a", "ctx_b", "activity_label"} <= set(record):  # the original layout (hf:Rowan/hellaswag)
            context = record["activity_label"] + ": " + record["ctx_a"] + " " + record["ctx_b"].capitalize()
        elif "ctx" in record:  # the preprocessed text of the shared data folder
            context = record["ctx"]
        else:
            raise DataError(
                f"dataset {self.config.dataset}: needs ctx (or activity_label, ctx_a, ctx_b); "
                f"available: {', '.join(record)}"
            )
        return Question(
            hellaswag_preprocess(context),
            tuple(hellaswag_preprocess(e) for e in record["endings"]),
            int(record["label"]),
        )


class MmluConfig(MultipleChoiceConfig):
    dataset: str = "mmlu"
    fewshot_dataset: str = "mmlu-dev"
    fewshot_split: str = "dev"
    num_fewshot: int = Field(0, ge=0, le=5)
    # Empty: all 57. ``limit`` applies per subject, as lm-eval's does to each subtask.
    subjects: tuple[str, ...] = ()

    @field_validator("subjects")
    @classmethod
    def _known(cls, subjects: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(subjects) - set(MMLU_SUBJECTS))
        if unknown:
            raise ValueError(f"unknown subject(s) {', '.join(unknown)}; valid: {', '.join(sorted(MMLU_SUBJECTS))}")
        return subjects


def mmlu_prompt(record: dict) -> str:
    letters = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", record["choices"], strict=True))
    return f"{record['question'].strip()}{letters}\nAnswer:"


@register
class Mmlu(MultipleChoice):
    name = "mmlu"
    description = "MMLU, 57 subjects, 0- or 5-shot (lm-eval prompt): acc per subject, category and overall"
    Config = MmluConfig
    quality_metric = "acc"
    columns = ("question", "subject", "choices", "answer")

    def load(self) -> list[Question]:
        cfg = self.config
        wanted = cfg.subjects or tuple(sorted(MMLU_SUBJECTS))
        by_subject: dict[str, list[dict]] = {s: [] for s in wanted}
        for r in self.records():
            if r["subject"] in by_subject:
                by_subject[r["subject"]].append(r)
        shots: dict[str, list[dict]] = {s: [] for s in wanted}
        if cfg.num_fewshot:
            dev = read_records(cfg.fewshot_dataset, self.data_dir, cfg.fewshot_split)
            require_columns(dev, list(self.columns), cfg.fewshot_dataset)
            for r in dev:
                if r["subject"] in shots:
                    shots[r["subject"]].append(r)
        questions = []
        for subject in wanted:
            if not by_subject[subject]:
                raise DataError(f"dataset {cfg.dataset}: no questions for subject {subject}")
            if len(shots[subject]) < cfg.num_fewshot:
                raise DataError(
                    f"dataset {cfg.fewshot_dataset}: {len(shots[subject])} examples for {subject}, "
                    f"fewer than num_fewshot={cfg.num_fewshot}"
                )
            # lm-eval's first_n sampler: the first dev examples, each followed by its answer letter.
            prefix = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
            examples = [f"{mmlu_prompt(r)}{TARGET_DELIMITER}{'ABCD'[int(r['answer'])]}" for r in shots[subject]]
            head = FEWSHOT_DELIMITER.join([prefix, *examples[: cfg.num_fewshot]]) + FEWSHOT_DELIMITER
            questions += [
                Question(head + mmlu_prompt(r), ("A", "B", "C", "D"), int(r["answer"]), subject)
                for r in cfg.select(by_subject[subject])
            ]
        return questions

    def group_metrics(self, data: list[Question], correct: list[bool]) -> dict[str, Any]:
        per_subject: dict[str, list[bool]] = {}
        for q, ok in zip(data, correct, strict=True):
            per_subject.setdefault(q.subject, []).append(ok)
        subjects = {}
        for subject, oks in per_subject.items():
            acc, se = _accuracy(oks)
            subjects[subject] = {"acc": acc, "acc_stderr": se, "n": len(oks)}
        categories = {}
        for category in MMLU_CATEGORIES:
            members = [subjects[s] for s in subjects if MMLU_SUBJECTS[s] == category]
            if members:
                sizes = [m["n"] for m in members]
                acc = sum(m["acc"] * m["n"] for m in members) / sum(sizes)
                se = pooled_stderr([m["acc_stderr"] for m in members], sizes)
                categories[category] = {"acc": acc, "acc_stderr": se, "n": sum(sizes)}
        overall_se = pooled_stderr([s["acc_stderr"] for s in subjects.values()], [s["n"] for s in subjects.values()])
        return {"acc_stderr": overall_se, "categories": categories, "subjects": subjects}
