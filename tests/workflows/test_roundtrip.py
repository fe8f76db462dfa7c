"""quantize -> disk -> reload -> compare, through the API and the CLI, on tiny random models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from quantarena import models
from quantarena.cli import app
from quantarena.errors import ConfigError, ModelError
from quantarena.methods import METHODS
from quantarena.methods.own import OWN_FORMAT_FILE
from quantarena.workflows.roundtrip import (
    METHOD_FILE,
    compare,
    difference_pct,
    load_quantized,
    quantize_to_disk,
    weights_on_disk,
)

PERPLEXITY = {"name": "perplexity", "max_tokens": 200, "max_length": 64, "stride": 32}


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["a small test sentence", "another one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method", ["own-int8", "own-int4", "fp16"])
def test_quantize_to_disk_reloads_the_same_model(tiny_llama_dir, tmp_path, method):
    out = quantize_to_disk(str(tiny_llama_dir), method, tmp_path / "q")
    assert json.loads((out / METHOD_FILE).read_text())["method"] == method
    reloaded, tokenizer = load_quantized(out)

    model, _ = models.load(models.resolve(str(tiny_llama_dir)), "causal-lm", seed=0)
    spec = METHODS.get(method)
    in_memory = spec.apply(copy.deepcopy(model), spec.config_cls())
    assert torch.equal(logits(reloaded, tokenizer), logits(in_memory, tokenizer))


def test_own_format_files(tiny_llama_dir, tmp_path):
    out = quantize_to_disk(str(tiny_llama_dir), {"name": "own-int4", "group_size": 32}, tmp_path / "q")
    qmap = json.loads((out / OWN_FORMAT_FILE).read_text())["modules"]
    assert len(qmap) == 2 * 7 and {m["group_size"] for m in qmap.values()} == {32}
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_compare_reports_both_sides(tiny_llama_dir, tmp_path):
    out = quantize_to_disk(str(tiny_llama_dir), "own-int8", tmp_path / "q")
    result = compare(str(tiny_llama_dir), out, PERPLEXITY, batch_size=2)
    assert result.quantized.weight_bytes < result.original.weight_bytes
    assert result.quantized.disk_bytes < result.original.disk_bytes
    ppl = result.original.metrics["perplexity"], result.quantized.metrics["perplexity"]
    assert ppl[1] == pytest.approx(ppl[0], rel=0.02)
    rows = {name: (a, b) for name, a, b in result.rows()}
    assert set(rows) >= {"weights on disk (MB)", "weight memory (MB)", "perplexity", "ms_per_token", "inference_s"}
    # The random Llama is mostly its fp32 embedding; own-int8 saves 3 bytes a weight less a 4-byte row scale.
    shapes = 2 * [(64, 64), (64, 64), (32, 64), (32, 64), (160, 64), (160, 64), (64, 160)]
    assert result.original.weight_bytes - result.quantized.weight_bytes == sum(n * k * 3 - n * 4 for n, k in shapes)
    assert difference_pct(*rows["weight memory (MB)"]) < 0


@pytest.mark.slow
def test_classifier_with_calibrated_activations(tiny_bert_dir, tmp_path):
    """A sequence classifier through a backend that calibrates (quanto int8 weights and activations)."""
    if METHODS.get("quanto-int8").requires.unmet("cpu"):
        pytest.skip("optimum-quanto not installed")
    out = quantize_to_disk(str(tiny_bert_dir), {"name": "quanto-int8", "activations": "int8"}, tmp_path / "q")
    result = compare(str(tiny_bert_dir), out, {"name": "classification", "limit": 16, "latency_examples": 2})
    assert 0 <= result.quantized.metrics["accuracy"] <= 1
    assert result.quantized.weight_bytes < result.original.weight_bytes  # the random BERT is mostly embeddings


def test_cli_quantize_then_compare(tiny_llama_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "q"
    done = runner.invoke(
        app, ["quantize", str(tiny_llama_dir), "--method", "own-int4:group_size=32", "--out", str(out)]
    )
    assert done.exit_code == 0, done.output
    shown = runner.invoke(
        app, ["compare", str(tiny_llama_dir), str(out), "--task", "perplexity:max_tokens=200,max_length=64,stride=32"]
    )
    assert shown.exit_code == 0, shown.output
    for text in ("original", "quantized", "difference", "weight memory (MB)", "perplexity", "%"):
        assert text in shown.output


@pytest.mark.parametrize(
    ("method", "message"),
    [("torch-dynamic-int8", "no loader"), ("torchao-int4-wo", "cannot run here")],
)
def test_methods_that_cannot_be_saved_here_are_refused(tiny_llama_dir, tmp_path, method, message):
    with pytest.raises(ConfigError, match=message):
        quantize_to_disk(str(tiny_llama_dir), method, tmp_path / "q")


def test_refuses_a_non_empty_output_dir(tiny_llama_dir, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        quantize_to_disk(str(tiny_llama_dir), "own-int8", tmp_path / "q")


def test_weights_on_disk_counts_the_loaded_weight_files(tmp_path):
    for name, size in {"model.safetensors": 10, "pytorch_model.bin": 20, "tokenizer.json": 5, "config.json": 3}.items():
        (tmp_path / name).write_bytes(b"x" * size)
    assert weights_on_disk(tmp_path) == 10  # the .bin beside safetensors is a copy, not loaded
    (tmp_path / "model.safetensors").unlink()
    assert weights_on_disk(tmp_path) == 20


def test_compare_needs_a_quantarena_folder(tiny_llama_dir, tmp_path):
    with pytest.raises(ModelError, match=METHOD_FILE):
        compare(str(tiny_llama_dir), tmp_path, PERPLEXITY)


def test_cli_errors_are_one_line(tiny_llama_dir, tmp_path):
    result = CliRunner().invoke(
        app, ["quantize", str(tiny_llama_dir), "--method", "torch-dynamic-int8", "--out", str(tmp_path / "q")]
    )
    assert result.exit_code == 2
    assert "no loader" in result.output
