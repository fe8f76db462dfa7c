"""Calibration data for methods that calibrate: text of a training split, never text any task evaluates,
tokenized by the model's tokenizer on its device.

Two shapes: a few batches of sentences (activation ranges: quanto, inductor-int8), and fixed-length token
sequences cut from the split's sentences in a seeded order and joined (the Hessians of GPTQ-style rounding,
as GPTQ and llmcompressor calibrate on concatenated text).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, NonNegativeInt, PositiveInt, field_validator

from quantarena.data import NAMED_DATASETS, dataset_path, file_sha256, read_records, require_columns, text_column
from quantarena.errors import DataError

CALIBRATION_DATASET = "sst2-train"
CALIBRATION_TEXT_COLUMN = "sentence"
# The named datasets that are training splits; every other named one is scored by some task.
TRAINING_SPLITS = (CALIBRATION_DATASET,)
# Sentences tokenized per call while sequences are assembled (SST-2's are short).
_SENTENCES_PER_CALL = 512


class CalibrationOptions(BaseModel):
    """Which text a calibrating method sees and how much of it (options of the method's config)."""

    # A named training split or a .jsonl/.csv/.tsv file; the named evaluation splits are refused.
    calibration_dataset: str = CALIBRATION_DATASET
    calibration_text_column: str | None = None
    calibration_samples: PositiveInt = 64
    calibration_seq_len: PositiveInt = 512
    calibration_seed: NonNegativeInt = 0

    @field_validator("calibration_dataset")
    @classmethod
    def _never_evaluated(cls, dataset: str) -> str:
        if dataset.startswith("hf:"):
            raise ValueError("hf: datasets cannot calibrate (their digest keys the variant); save the split as .jsonl")
        if dataset in NAMED_DATASETS and dataset not in TRAINING_SPLITS:
            raise ValueError(
                f"{dataset!r} is an evaluation split (a task scores it); calibrate on a training split: "
                f"{', '.join(TRAINING_SPLITS)} or a file path"
            )
        return dataset


@dataclass(frozen=True)
class Calibration:
    """Calibration text for one model: ``calibration(n)`` gives sentence batches, ``sequences`` token rows."""

    tokenizer: Any
    data_dir: Path
    device: torch.device

    def __call__(self, examples: int, batch_size: int = 8, max_length: int = 128) -> list[dict[str, torch.Tensor]]:
        return calibration_batches(self.tokenizer, self.data_dir, self.device, examples, batch_size, max_length)

    def sequences(self, options: CalibrationOptions) -> torch.Tensor:
        """(samples, seq_len) token ids: the split's texts shuffled by the seed, joined by newlines, cut."""
        dataset = options.calibration_dataset
        column = text_column(dataset, options.calibration_text_column)
        records = read_records(dataset, self.data_dir, "train")
        require_columns(records, [column], dataset)
        texts = [str(r[column]) for r in records]
        random.Random(options.calibration_seed).shuffle(texts)
        needed = options.calibration_samples * options.calibration_seq_len
        ids: list[int] = []
        for start in range(0, len(texts), _SENTENCES_PER_CALL):
            if len(ids) >= needed:
                break
            chunk = "\n".join(texts[start : start + _SENTENCES_PER_CALL]) + "\n"
            ids += self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
        if len(ids) < needed:
            raise DataError(
                f"calibration dataset {dataset}: {len(ids)} tokens, calibration_samples x calibration_seq_len "
                f"needs {needed}; lower one of them"
            )
        rows = torch.tensor(ids[:needed], dtype=torch.long).view(options.calibration_samples, -1)
        return rows.to(self.device)


# What calibrating methods are handed (kept as a name: the methods' signatures read better with it).
CalibrationSource = Calibration


def calibration_batches(
    tokenizer: Any, data_dir: Path, device: torch.device, examples: int, batch_size: int = 8, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    texts = [r[CALIBRATION_TEXT_COLUMN] for r in read_records(CALIBRATION_DATASET, data_dir, "train")[:examples]]
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batches.append({k: v.to(device) for k, v in enc.items()})
    return batches


def calibration_digest(data_dir: Path, dataset: str = CALIBRATION_DATASET) -> str:
    """The calibration file's sha256: part of the identity of every variant a calibrating method makes."""
    return file_sha256(dataset_path(dataset, data_dir))
