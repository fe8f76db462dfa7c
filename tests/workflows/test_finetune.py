"""Fine-tuning (full and LoRA) on a tiny BERT, resuming, bad input, and the fine-tune → quantize sweep."""

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import quantarena
from quantarena.cli import app
from quantarena.errors import ConfigError, DataError
from quantarena.workflows.finetune import DONE_FILE, FinetuneConfig, LoraOptions, finetune

ROWS = [{"text": ("good great fine " if i % 2 else "bad awful poor ") + f"item {i}", "label": i % 2} for i in range(64)]


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sentiment.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return str(path)


def tiny_config(sentiment, **options) -> FinetuneConfig:
    defaults = {"train_dataset": sentiment, "eval_dataset": sentiment, "batch_size": 8, "learning_rate": 3e-3}
    return FinetuneConfig(**defaults | options)


def test_full_finetune_learns_and_writes_its_reports(tmp_path, tiny_bert_dir, sentiment):
    model_dir = finetune(str(tiny_bert_dir), tiny_config(sentiment, epochs=3), tmp_path)
    rows = json.loads((tmp_path / DONE_FILE).read_text())["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["accuracy"] == 1.0  # the words give the label away
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert (tmp_path / "epochs.md").read_text().startswith("| epoch | train_loss | eval_loss | accuracy")
    assert len((tmp_path / "epochs.csv").read_text().splitlines()) == 4
    for png in ("training_curves.png", "evaluation_curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]


def test_lora_saves_adapter_and_a_merged_model(tmp_path, tiny_bert_dir, sentiment):
    config = tiny_config(
        sentiment, epochs=4, learning_rate=1e-2, lora=LoraOptions(r=4, alpha=8, targets=("query", "value"))
    )
    model_dir = finetune(str(tiny_bert_dir), config, tmp_path)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert not any("lora" in n for n in names) and "classifier.weight" in names
    assert json.loads((tmp_path / DONE_FILE).read_text())["epochs"][-1]["accuracy"] >= 0.9


def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, tiny_bert_dir, sentiment):
    finetune(str(tiny_bert_dir), tiny_config(sentiment, epochs=1), tmp_path)
    first = json.loads((tmp_path / DONE_FILE).read_text())["epochs"]
    (tmp_path / DONE_FILE).unlink()  # as if the run had died after its first epoch's checkpoint
    finetune(str(tiny_bert_dir), tiny_config(sentiment, epochs=2), tmp_path)
    resumed = json.loads((tmp_path / DONE_FILE).read_text())["epochs"]
    assert [r["epoch"] for r in resumed] == [1, 2]
    assert resumed[0] == first[0]  # epoch 1 was not trained again
    state = json.loads(max((tmp_path / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["global_step"] == 2 * 4


def test_bad_inputs(tmp_path, tiny_bert_dir, sentiment):
    no_label = tmp_path / "no_label.jsonl"
    no_label.write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match="missing column"):
        finetune(str(tiny_bert_dir), tiny_config(sentiment, train_dataset=str(no_label)), tmp_path / "a")
    words = tmp_path / "words.jsonl"
    words.write_text('{"text": "a", "label": "good"}\n')
    with pytest.raises(DataError, match="label 'good' is not an integer class id"):
        finetune(str(tiny_bert_dir), tiny_config(sentiment, train_dataset=str(words)), tmp_path / "b")
    with pytest.raises(DataError, match=r"labels \[1\] out of range for num_labels = 1"):
        finetune(str(tiny_bert_dir), tiny_config(sentiment, num_labels=1), tmp_path / "c")
    with pytest.raises(ConfigError, match="LoRA target 'q_proj' matches no Linear module; they are named: classifier"):
        finetune(str(tiny_bert_dir), tiny_config(sentiment, lora=LoraOptions(targets=("q_proj",))), tmp_path / "d")


def test_cli_bad_lora_target_is_one_line_exit_2(tmp_path, tiny_bert_dir, sentiment):
    result = CliRunner().invoke(
        app,
        ["finetune", str(tiny_bert_dir), "--out", str(tmp_path), "--train-dataset", sentiment,
         "--eval-dataset", sentiment, "--lora", "r=4,targets=q_proj+v_proj"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.startswith("error: LoRA target 'q_proj' matches no Linear module")
    assert len(result.stderr.strip().splitlines()) == 1


def test_qlora_on_cpu_is_refused_before_any_work(tmp_path, tiny_bert_dir, sentiment):
    result = CliRunner().invoke(
        app,
        ["finetune", str(tiny_bert_dir), "--out", str(tmp_path / "q"), "--train-dataset", sentiment,
         "--eval-dataset", sentiment, "--lora", "r=4,quantized_base=nf4"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.startswith("error: LoRA on a nf4 base (QLoRA) trains through bitsandbytes' CUDA kernels")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                    reason="QLoRA needs CUDA and bitsandbytes")  # fmt: skip
def test_qlora_trains_on_a_4bit_base_and_merges_into_full_precision(tmp_path, tiny_bert_dir, sentiment):
    lora = LoraOptions(r=4, alpha=8, targets=("query", "value"), quantized_base="nf4")
    model_dir = finetune(str(tiny_bert_dir), tiny_config(sentiment, epochs=4, learning_rate=1e-2, lora=lora),
                         tmp_path, device="cuda")  # fmt: skip
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert f.get_tensor("bert.encoder.layer.0.attention.self.query.weight").dtype == torch.float32
    assert json.loads((tmp_path / DONE_FILE).read_text())["epochs"][-1]["accuracy"] >= 0.9


def test_sweep_with_a_finetune_step(tmp_path, tiny_bert_dir, sentiment):
    config = quantarena.sweep_config(
        {
            "model": str(tiny_bert_dir),
            "finetune": tiny_config(sentiment, epochs=3).model_dump(),
            "methods": ["fp32", "own-int8", "own-int4"],
            "tasks": [{"name": "classification", "dataset": sentiment, "latency_examples": 2}],
            "output_dir": str(tmp_path),
            "executor": "inline",
        }
    )  # fmt: skip
    cells = quantarena.run(config).cells
    assert [c.model for c in cells] == [f"{tiny_bert_dir.name}-finetuned"] * 3
    assert cells[0].metrics["accuracy"] == 1.0
    assert all(c.status == "ok" and c.metrics["accuracy"] >= 0.9 for c in cells)
