"""Every method proves what it did: how many layers and what share of the weights it quantized. A method that
quantized nothing is skipped with the reason, never reported as if it had worked; the own formats handle GPT-2's
Conv1D projections."""

import pytest
import torch

import quantarena
from quantarena.methods import METHODS
from quantarena.methods.base import as_linear, coverage, linear_layers
from quantarena.workflows.roundtrip import load_quantized, quantize_to_disk

PPL = {"name": "perplexity", "max_tokens": 96, "max_length": 48, "stride": 24}


def sweep(model_dir, out, methods):
    config = quantarena.sweep_config(
        {"model": str(model_dir), "methods": methods, "tasks": [PPL], "output_dir": str(out), "executor": "inline"}
    )
    return {c.method: c for c in quantarena.run(config).cells}


def test_the_own_formats_quantize_gpt2s_conv1d_projections(tmp_path, tiny_gpt2_dir):
    cells = sweep(tiny_gpt2_dir, tmp_path, ["fp32", "own-int8", "own-int4"])
    fp32 = cells["fp32"].measurements
    for method in ("own-int8", "own-int4"):
        cell = cells[method]
        assert cell.status == "ok", cell.reason
        m = cell.measurements
        # 2 blocks x (c_attn, c_proj, c_fc, mlp c_proj); the tied lm_head is skipped by default.
        assert (m["quantized_layers"], m["linear_layers"]) == (8, 9)
        # The projections' float bytes; the tied 30522 x 64 embedding (and lm_head) is most of the rest.
        projections = 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64) * 4
        assert m["quantized_weight_share"] == pytest.approx(projections / fp32["weight_bytes"])
        assert m["weight_bytes"] < fp32["weight_bytes"]
        assert cell.metrics["perplexity"] == pytest.approx(cells["fp32"].metrics["perplexity"], rel=0.05)
        assert cell.metrics["perplexity"] != cells["fp32"].metrics["perplexity"]  # the weights did change
    # Saved: int8 is 1 byte a weight plus a 4-byte scale per output row, instead of 4 bytes a weight.
    shapes = 2 * [(64, 192), (64, 64), (64, 256), (256, 64)]  # Conv1D weights are (in, out)
    saved = sum(k * n * 3 - n * 4 for k, n in shapes)
    assert fp32["weight_bytes"] - cells["own-int8"].measurements["weight_bytes"] == saved


@pytest.mark.parametrize("method", ["quanto-int8", "torchao-int8-wo", "torch-dynamic-int8", "bnb-int8", "hqq-int4"])
def test_a_peer_that_cannot_quantize_conv1d_is_skipped_with_the_reason(tmp_path, tiny_gpt2_dir, method):
    unmet = METHODS.get(method).requires.unmet("cpu")
    if unmet:
        pytest.skip(unmet)
    cell = sweep(tiny_gpt2_dir, tmp_path, [method])[method]
    assert cell.status == "skipped"
    assert cell.reason.startswith(f"{method} quantized no layer of this model (8 Conv1D, 1 Linear")


def test_every_method_records_its_coverage(tmp_path, tiny_llama_dir):
    cells = sweep(tiny_llama_dir, tmp_path, ["fp32", "own-int8", "torch-dynamic-int8"])
    assert "quantized_layers" not in cells["fp32"].measurements  # a cast replaces no layer
    for method in ("own-int8", "torch-dynamic-int8"):
        m = cells[method].measurements
        # 2 blocks x 7 projections; lm_head (tied to the embedding) is kept in float by default.
        assert (m["quantized_layers"], m["linear_layers"]) == (14, 15)
        assert 0 < m["quantized_weight_share"] < 1


def test_coverage_sees_replaced_layers_and_subclass_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    before = linear_layers(model)
    assert [nbytes for _, nbytes in before.values()] == [64, 64, 32]
    model[0] = torch.nn.Identity()
    model[1].weight = torch.nn.Parameter(model[1].weight.data.to(torch.int8), requires_grad=False)
    got = coverage(before, model, float_bytes=160)
    assert got == {"quantized_layers": 2, "linear_layers": 3, "quantized_weight_share": 128 / 160}


def test_as_linear_computes_what_conv1d_does():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=6, nx=4)
    x = torch.randn(3, 4)
    assert torch.allclose(as_linear(conv)(x), conv(x), atol=1e-6)


@pytest.mark.parametrize("method", ["own-int8", "own-int4"])
def test_gpt2_own_checkpoint_reloads_bit_exactly(tmp_path, tiny_gpt2_dir, data_dir, method):
    from quantarena import models
    from quantarena.methods import quantize_with_calibration

    out = quantize_to_disk(str(tiny_gpt2_dir), method, tmp_path / "q")
    reloaded, _ = load_quantized(out)
    original, tokenizer = models.load(models.resolve(str(tiny_gpt2_dir)), "causal-lm", 0)
    spec = METHODS.get(method)
    quantized = quantize_with_calibration(spec, spec.config_cls(), original, tokenizer, data_dir, torch.device("cpu"))
    ids = torch.randint(0, 30522, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, quantized(input_ids=ids).logits)
