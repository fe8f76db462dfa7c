"""Fine-tune a sequence classifier (full or LoRA) before asking what quantization costs it.

The transformers Trainer does the training; this module adds what the comparison needs: the same
data loading and metric definitions as the classification task, a per-epoch table (Markdown, CSV),
TensorBoard logs, PNG curves, resuming from the last checkpoint, and a plain model folder (LoRA
merged into the base) that a sweep loads like any other.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from quantarena import models
from quantarena.config import FinetuneConfig, LoraOptions
from quantarena.data import resolve_data_dir
from quantarena.environment import check_device
from quantarena.errors import ConfigError, DataError
from quantarena.metrics import classification_metrics
from quantarena.tasks.classification import Classification, ClassificationConfig, LabeledTexts

DONE_FILE = "finetune.json"


class _Encoded(torch.utils.data.Dataset):
    def __init__(self, data: LabeledTexts, tokenizer, max_length: int):
        self.encodings = tokenizer(data.texts, truncation=True, max_length=max_length)
        self.labels = data.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.encodings.items()} | {"labels": self.labels[i]}


def _load(config: FinetuneConfig, dataset: str, limit: int | None, data_dir: Path) -> LabeledTexts:
    task_config = ClassificationConfig(
        dataset=dataset, text_column=config.text_column, label_column=config.label_column, limit=limit
    )
    data = Classification(task_config, data_dir).load()
    bad = sorted({y for y in data.labels if not 0 <= y < config.num_labels})
    if bad:
        raise DataError(f"dataset {dataset}: labels {bad[:5]} out of range for num_labels = {config.num_labels}")
    return data


def _check_quantized_base(lora: LoraOptions | None, device: str) -> None:
    if lora is None or lora.quantized_base is None:
        return
    if device != "cuda":
        raise ConfigError(
            f"LoRA on a {lora.quantized_base} base (QLoRA) trains through bitsandbytes' CUDA kernels; this run is on "
            f"{device}: use device cuda, or drop quantized_base for LoRA on the full-precision base"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("LoRA on a quantized base needs bitsandbytes: pip install 'quantarena[backends]'")


def _quantized_base(resolved: models.ResolvedModel, config: FinetuneConfig, quant_type: str) -> torch.nn.Module:
    """The QLoRA recipe: 4-bit base with double quantization, bf16 compute, the new head kept in full precision."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=["classifier", "score"],
    )
    torch.manual_seed(config.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolved.path, num_labels=config.num_labels, quantization_config=bnb, device_map={"": 0}
    )
    return prepare_model_for_kbit_training(model)


def _merged_into_full_precision(resolved: models.ResolvedModel, config: FinetuneConfig, adapter_dir: Path):
    """A QLoRA adapter is merged into the unquantized base, so the sweep quantizes one plain model
    like any other (merging into 4-bit weights would round the adapter away)."""
    from peft import PeftModel

    base, _ = models.load(resolved, "sequence-classification", config.seed)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def _with_lora(model: torch.nn.Module, lora: LoraOptions) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    unmatched = [t for t in lora.targets if t not in linear_names]
    if unmatched:
        raise ConfigError(
            f"LoRA target {unmatched[0]!r} matches no Linear module; they are named: {', '.join(linear_names)}"
        )
    peft_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
    )
    return get_peft_model(model, peft_config)


def epoch_rows(log_history: list[dict]) -> list[dict]:
    """One row per evaluated epoch: mean logged training loss over that epoch, then the eval metrics."""
    rows, previous_epoch = [], 0.0
    for entry in log_history:
        if "eval_loss" not in entry:
            continue
        epoch = entry["epoch"]
        train = [e["loss"] for e in log_history if "loss" in e and previous_epoch < e["epoch"] <= epoch]
        rows.append(
            {
                "epoch": round(epoch, 3),
                "train_loss": float(np.mean(train)) if train else None,
                "eval_loss": entry["eval_loss"],
                **{k: entry[f"eval_{k}"] for k in ("accuracy", "precision", "recall", "f1")},
            }
        )
        previous_epoch = epoch
    return rows


def _write_tables(rows: list[dict], out: Path) -> None:
    columns = list(rows[0])
    with open(out / "epochs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join("" if r[c] is None else f"{r[c]:.4f}" for c in columns) + " |" for r in rows]
    (out / "epochs.md").write_text("\n".join(lines) + "\n")


def _plot_curves(log_history: list[dict], rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [(e["epoch"], e["loss"]) for e in log_history if "loss" in e]
    ax.plot(*zip(*steps, strict=True), label="training loss (logged)", color="tab:blue", alpha=0.7)
    ax.plot([r["epoch"] for r in rows], [r["eval_loss"] for r in rows], "o-", label="validation loss", color="tab:red")
    ax.set(xlabel="epoch", ylabel="cross-entropy", title="Training and validation loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for metric in ("accuracy", "precision", "recall", "f1"):
        ax.plot([r["epoch"] for r in rows], [r[metric] for r in rows], "o-", label=metric)
    ax.set(xlabel="epoch", ylabel="validation score", title="Validation metrics per epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "evaluation_curves.png", dpi=110)
    plt.close(fig)


def _finished_with(out_dir: Path, config: FinetuneConfig) -> bool:
    try:
        return json.loads((out_dir / DONE_FILE).read_text())["config"] == config.model_dump(mode="json")
    except (OSError, ValueError, KeyError):
        return False


def finetune(
    source: str, config: FinetuneConfig, out_dir: Path, data_dir: Path | None = None, device: str = "cpu"
) -> Path:
    """Fine-tune ``source`` and return the folder of the resulting model (LoRA merged), resuming if
    ``out_dir`` holds checkpoints of an interrupted run, and reusing a finished one."""
    models.quiet_transformers()
    from torch.utils.tensorboard import SummaryWriter
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments
    from transformers.integrations import TensorBoardCallback

    model_dir = out_dir / "model"
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"fine-tune output {out_dir} is a file; give a folder")
    if _finished_with(out_dir, config):
        return model_dir
    check_device(device)
    _check_quantized_base(config.lora, device)
    data_dir = resolve_data_dir(data_dir)
    train = _load(config, config.train_dataset, config.train_limit, data_dir)
    evaluation = _load(config, config.eval_dataset, config.eval_limit, data_dir)
    # The head is new: training it is the point.
    resolved = models.resolve(
        source, kind="sequence-classification", num_labels=config.num_labels, allow_untrained_head=True
    )
    model, tokenizer = models.load(resolved, "sequence-classification", config.seed)
    quantized_base = config.lora.quantized_base if config.lora else None
    if quantized_base:
        model = _quantized_base(resolved, config, quantized_base)
    if config.lora:
        model = _with_lora(model, config.lora)
    out_dir.mkdir(parents=True, exist_ok=True)

    def compute_metrics(prediction) -> dict:
        metrics = classification_metrics(prediction.label_ids, prediction.predictions.argmax(-1), config.num_labels)
        return {k: metrics[k] for k in ("accuracy", "precision", "recall", "f1")}

    steps_per_epoch = -(-len(train.labels) // config.batch_size)
    args = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size * 2,
        warmup_steps=int(config.warmup_ratio * steps_per_epoch * config.epochs),
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="steps",
        logging_steps=max(1, steps_per_epoch // 10),
        report_to="none",
        save_total_limit=2,
        seed=config.seed,
        use_cpu=device == "cpu",
        bf16=quantized_base is not None,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Encoded(train, tokenizer, config.max_length),
        eval_dataset=_Encoded(evaluation, tokenizer, config.max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=[TensorBoardCallback(SummaryWriter(str(out_dir / "tensorboard")))],
    )
    has_checkpoint = any((out_dir / "checkpoints").glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=has_checkpoint or None)

    rows = epoch_rows(trainer.state.log_history)
    _write_tables(rows, out_dir)
    _plot_curves(trainer.state.log_history, rows, out_dir)
    if config.lora:
        trainer.model.save_pretrained(out_dir / "adapter")
        if quantized_base:
            merged = _merged_into_full_precision(resolved, config, out_dir / "adapter")
        else:
            merged = trainer.model.merge_and_unload()
    else:
        merged = trainer.model
    merged.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    (out_dir / DONE_FILE).write_text(json.dumps({"config": config.model_dump(mode="json"), "epochs": rows}, indent=1))
    return model_dir
