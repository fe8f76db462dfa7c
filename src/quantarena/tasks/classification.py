"""Sequence classification on any dataset with a text and a label column."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

import torch
from pydantic import NonNegativeInt, PositiveInt

from quantarena.data import NAMED_DATASETS, read_records, require_columns, text_column
from quantarena.errors import DataError
from quantarena.measure import repeated_ms, timed
from quantarena.metrics import classification_metrics
from quantarena.models import ResolvedModel
from quantarena.tasks.base import EvalContext, Task, TaskConfig, TaskOutput, register


class ClassificationConfig(TaskConfig):
    dataset: str = "sst2"
    split: str = "validation"
    text_column: str | None = None
    label_column: str | None = None
    max_length: PositiveInt = 256
    latency_examples: PositiveInt = 32
    latency_warmup: NonNegativeInt = 3


@dataclass
class LabeledTexts:
    texts: list[str]
    labels: list[int]


def _class_id(value, where: str) -> int:
    """A class id from an int or a string of ASCII digits (not "--1", not "²", not 0.5, not true)."""
    if isinstance(value, int) and not isinstance(value, bool):
        label = value
    elif isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
        label = int(value)
    else:
        raise DataError(f"{where}: label {value!r} is not an integer class id")
    if label < 0:
        raise DataError(f"{where}: label {label} is negative; class ids are 0, 1, ...")
    return label


@register
class Classification(Task):
    name = "classification"
    description = "accuracy, precision, recall, F1, confusion matrix, throughput and batch-1 latency"
    model_kind = "sequence-classification"
    Config = ClassificationConfig
    quality_metric = "accuracy"
    higher_is_better = True
    latency_metric = "latency_ms_median"

    def load(self) -> LabeledTexts:
        cfg = self.config
        named = NAMED_DATASETS.get(cfg.dataset)
        text_col = text_column(cfg.dataset, cfg.text_column)
        label_col = cfg.label_column or (named.label_column if named and named.label_column else "label")
        records = read_records(cfg.dataset, self.data_dir, cfg.split)
        require_columns(records, [text_col, label_col], cfg.dataset)
        lines = getattr(records, "lines", None) or range(1, len(records) + 1)
        rows = [(str(r[text_col]), _class_id(r[label_col], f"dataset {cfg.dataset} line {line}"))
                for r, line in zip(records, lines, strict=True)]  # fmt: skip
        rows = cfg.select(rows)
        return LabeledTexts(texts=[text for text, _ in rows], labels=[label for _, label in rows])

    def check(self, data: LabeledTexts, model: ResolvedModel) -> None:
        super().check(data, model)
        # transformers gives a classifier 2 labels unless told otherwise
        num_labels = model.num_labels or 2
        bad = sorted({y for y in data.labels if y >= num_labels})
        if bad:
            raise DataError(
                f"dataset {self.config.dataset}: label {bad[0]} is out of range for {model.name}, which has "
                f"{num_labels} labels (set num_labels in the model table)"
            )

    def evaluate(self, ctx: EvalContext, data: LabeledTexts) -> TaskOutput:
        cfg = self.config
        num_labels = ctx.model.config.num_labels
        bad = sorted({y for y in data.labels if not 0 <= y < num_labels})
        if bad:
            raise DataError(
                f"dataset {cfg.dataset}: labels {bad[:5]} out of range for a model with {num_labels} labels"
            )

        def encode(texts: list[str]) -> dict:
            enc = ctx.tokenizer(texts, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt")
            return {k: v.to(ctx.device) for k, v in enc.items()}

        # Length-sorted batches waste little on padding; predictions go back to dataset order.
        order = sorted(range(len(data.texts)), key=lambda i: len(data.texts[i]))
        predictions = [0] * len(order)
        with torch.inference_mode(), timed(ctx.device) as total:
            for start in range(0, len(order), ctx.batch_size):
                batch = order[start : start + ctx.batch_size]
                logits = ctx.model(**encode([data.texts[i] for i in batch])).logits
                for i, p in zip(batch, logits.argmax(-1).tolist(), strict=True):
                    predictions[i] = p
                ctx.progress(min(start + ctx.batch_size, len(order)), len(order))

        # Batch-1 latency: forward only (tokenization excluded), one synchronized call per example.
        samples = [encode([t]) for t in data.texts[: cfg.latency_examples]]
        with torch.inference_mode():
            for s in samples[: cfg.latency_warmup]:
                ctx.model(**s)
            latencies_ms = [repeated_ms(lambda s=s: ctx.model(**s), ctx.device, 0, 1)[0] for s in samples]

        n = len(order)
        metrics = classification_metrics(data.labels, predictions, num_labels) | {
            "inference_s": total.seconds,
            "examples_per_s": n / total.seconds,
            "s_per_example": total.seconds / n,
            "latency_ms_median": statistics.median(latencies_ms),
            "latency_ms_p90": float(torch.tensor(latencies_ms).quantile(0.9)),
            "latency_examples": len(latencies_ms),
        }
        # Labels beside predictions make paired tests (McNemar) possible from the record alone.
        return TaskOutput(metrics, {"predictions": predictions, "labels": data.labels})
