"""Calibration data for methods that calibrate (activation ranges): sentences of a training split, never the
sentences any task evaluates, tokenized on the model's device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantarena.data import dataset_path, file_sha256, read_records

CALIBRATION_DATASET = "sst2-train"
CALIBRATION_TEXT_COLUMN = "sentence"

# A few tokenized batches (on the model's device), called with the number of examples wanted.
CalibrationSource = Callable[[int], list[dict[str, torch.Tensor]]]


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


def calibration_digest(data_dir: Path) -> str:
    """The calibration file's sha256: part of the identity of every variant a calibrating method makes."""
    return file_sha256(dataset_path(CALIBRATION_DATASET, data_dir))
