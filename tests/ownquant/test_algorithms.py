"""Calibrated rounding for the own formats: GPTQ against a float64 transcription of the paper, the clip search,
both against round-to-nearest on the same weights and data, and the block-by-block driver on real layouts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantarena import models
from quantarena.errors import ConfigError, DataError
from quantarena.methods import METHODS, quantize_with_calibration
from quantarena.methods.calibration import Calibration
from quantarena.methods.own import OwnInt4Config
from quantarena.ownquant import Int4WeightLinear, Int8WeightLinear
from quantarena.ownquant.algorithms import (
    CLIP_SHRINKS,
    INT8_CHANNEL,
    Rounded,
    dequantize_rounded,
    gptq,
    int4_grid,
    output_error,
    round_clipped,
)
from quantarena.ownquant.formats import quantize_int4_groupwise, quantize_int8_per_channel, unpack_int4
from quantarena.sweep.plan import Variant
from quantarena.workflows.roundtrip import load_quantized, quantize_to_disk

GRIDS = {"int4-g16": int4_grid(16), "int4-g24": int4_grid(24), "int8": INT8_CHANNEL}


def layer_and_hessian(n: int = 24, k: int = 56, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights with a few outliers and inputs with correlated channels of unequal scale, as in transformers."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g, dtype=torch.float64)
    weight[torch.rand(n, k, generator=g) < 0.02] *= 6
    mixing = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5 + torch.eye(k, dtype=torch.float64)
    x = (torch.randn(400, k, generator=g, dtype=torch.float64) @ mixing) * torch.linspace(0.2, 3, k).double()
    return weight, x.T @ x / x.shape[0]


def reference_gptq(weight, hessian, grid, damp, order) -> torch.Tensor:
    """GPTQ as the paper states it (optimal brain quantization, one column at a time, no lazy blocks, no
    Cholesky), in float64, with every group's range fixed beforehand from the weights as given."""
    w, k = weight.clone(), weight.shape[1]
    width = grid.group_width(k)
    ranges = [grid.ranges(w[:, s : s + width]) for s in range(0, k, width)]
    h = hessian + damp * hessian.diagonal().mean() * torch.eye(k, dtype=hessian.dtype)
    inverse = torch.linalg.inv(h)
    codes = torch.zeros_like(w)
    remaining = list(order)
    for column in order:
        scale, offset = ranges[column // width]
        q = grid.codes(w[:, column], scale, offset)
        codes[:, column] = q
        error = (w[:, column] - grid.dequantize(q, scale, offset)) / inverse[column, column]
        remaining.remove(column)
        # Every column not yet rounded absorbs the error (the OBS update), then column leaves the inverse.
        w[:, remaining] -= error[:, None] * inverse[column, remaining][None, :]
        inverse = inverse - inverse[:, column : column + 1] @ inverse[column : column + 1, :] / inverse[column, column]
    return codes


@pytest.mark.parametrize("grid_name", GRIDS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_the_papers_algorithm_in_float64(grid_name, act_order):
    grid = GRIDS[grid_name]
    weight, hessian = layer_and_hessian()
    # Static ranges in both: without act-order, grouped GPTQ picks a range when it reaches the group, which the
    # reference does not model; per-row grids are static anyway.
    if not act_order and grid.group_size is not None:
        grid = type(grid)(grid.qmax, grid.symmetric, None, grid.range_dtype)
    order = torch.argsort(hessian.diagonal(), descending=True).tolist() if act_order else list(range(56))
    rounded = gptq(weight, hessian, grid, damp=0.01, act_order=act_order, shrinks=(1.0,), block_size=16)
    expected = reference_gptq(weight, hessian, grid, 0.01, order)
    # A code may differ where the two float64 computations straddle a rounding boundary; none does here.
    assert torch.equal(rounded.codes, expected)


@pytest.mark.parametrize("grid_name", GRIDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibrated_errors_are_strictly_below_round_to_nearest(grid_name, seed):
    grid = GRIDS[grid_name]
    weight, hessian = layer_and_hessian(seed=seed)
    rtn = output_error(weight, dequantize_rounded(round_clipped(weight, hessian, grid, (1.0,)), grid), hessian)
    clip = output_error(weight, dequantize_rounded(round_clipped(weight, hessian, grid), grid), hessian)
    errors = {
        (act_order, len(shrinks)): output_error(
            weight,
            dequantize_rounded(gptq(weight, hessian, grid, act_order=act_order, shrinks=shrinks), grid),
            hessian,
        )
        for act_order in (False, True)
        for shrinks in ((1.0,), CLIP_SHRINKS)
    }
    assert clip < rtn
    assert max(errors.values()) < rtn


@pytest.mark.parametrize("k", [64, 70])
def test_the_full_range_is_round_to_nearest_of_the_formats(k):
    weight, hessian = layer_and_hessian(k=k)
    weight = weight.float()
    four = round_clipped(weight, hessian.float(), int4_grid(32), (1.0,))
    packed, scales, mins = quantize_int4_groupwise(weight, 32)
    assert torch.equal(four.codes, unpack_int4(packed, k).float())
    assert torch.equal(four.scales, scales.float()) and torch.equal(four.offsets, mins.float())
    eight = round_clipped(weight, hessian.float(), INT8_CHANNEL, (1.0,))
    codes, row_scales = quantize_int8_per_channel(weight)
    assert torch.equal(eight.codes, codes.float()) and torch.equal(eight.scales[:, 0], row_scales)


def test_ranges_are_rounded_to_what_the_format_stores():
    weight, hessian = layer_and_hessian()
    rounded = gptq(weight.float(), hessian.float(), int4_grid(16))
    assert torch.equal(rounded.scales, rounded.scales.half().float())
    assert torch.equal(rounded.offsets, rounded.offsets.half().float())
    assert isinstance(rounded, Rounded) and rounded.codes.min() >= 0 and rounded.codes.max() <= 15


def test_an_input_calibration_never_activated_keeps_its_weights():
    weight, hessian = layer_and_hessian()
    hessian[5, :] = hessian[:, 5] = 0
    rounded = gptq(weight, hessian, INT8_CHANNEL)
    approx = dequantize_rounded(rounded, INT8_CHANNEL)
    assert torch.isfinite(approx).all()
    assert (approx[:, 5] - weight[:, 5]).abs().max() <= rounded.scales.max() / 2 + 1e-12


def calibration(folder, data_dir) -> Calibration:
    return Calibration(models.load_tokenizer(folder), data_dir, torch.device("cpu"))


SMALL = {"calibration_samples": 4, "calibration_seq_len": 32}


@pytest.mark.parametrize("folder_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("algorithm", ["clip", "gptq"])
def test_calibrated_variants_replace_every_layer_and_stay_close(request, data_dir, folder_fixture, algorithm):
    folder = request.getfixturevalue(folder_fixture)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    method = METHODS.get("own-int4")
    config = method.config_cls(algorithm=algorithm, group_size=16, **SMALL)
    source = calibration(folder, data_dir)
    rtn = method.quantize(copy.deepcopy(model), method.config_cls(group_size=16), source)
    with torch.no_grad():
        calibrated = method.quantize(copy.deepcopy(model), config, source)
    layers = [m for m in calibrated.modules() if isinstance(m, Int4WeightLinear)]
    assert len(layers) == len([m for m in rtn.modules() if isinstance(m, Int4WeightLinear)]) > 0
    ids = source.sequences(method.config_cls(**SMALL, calibration_seed=7))
    with torch.no_grad():
        reference, got, rounded = (m(ids).logits for m in (model, calibrated, rtn))
    # On the text it was calibrated for (another sample of it), the calibrated variant is the closer one.
    assert (got - reference).norm() < (rounded - reference).norm()


def test_own_int8_gptq_on_a_classifier(tiny_bert_dir, data_dir):
    model, tokenizer = models.load(models.resolve(str(tiny_bert_dir), num_labels=2), "sequence-classification", 0)
    method = METHODS.get("own-int8")
    quantized = quantize_with_calibration(
        method, method.config_cls(algorithm="gptq", **SMALL), model, tokenizer, data_dir, torch.device("cpu")
    )
    assert sum(isinstance(m, Int8WeightLinear) for m in quantized.modules()) == 2 * 6 + 1  # pooler too


def test_a_calibrated_variant_reloads_the_same(tiny_llama_dir, data_dir, tmp_path):
    choice = {"name": "own-int4", "algorithm": "gptq", "group_size": 16, **SMALL}
    out = quantize_to_disk(str(tiny_llama_dir), choice, tmp_path / "q", data_dir=data_dir)
    reloaded, tokenizer = load_quantized(out)
    model, _ = models.load(models.resolve(str(tiny_llama_dir)), "causal-lm", seed=0)
    method = METHODS.get("own-int4")
    config = method.config_cls(**{k: v for k, v in choice.items() if k != "name"})
    in_memory = quantize_with_calibration(method, config, model, tokenizer, data_dir, torch.device("cpu"))
    batch = tokenizer(["a small test sentence", "another one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, in_memory(**batch).logits)
    assert json.loads((out / "quantarena_method.json").read_text())["method"] == "own-int4"


def test_calibration_sequences_are_seeded_and_sized(tiny_llama_dir, data_dir):
    source = calibration(tiny_llama_dir, data_dir)
    first = source.sequences(OwnInt4Config(**SMALL))
    assert first.shape == (4, 32) and torch.equal(first, source.sequences(OwnInt4Config(**SMALL)))
    assert not torch.equal(first, source.sequences(OwnInt4Config(**SMALL, calibration_seed=1)))


def test_calibration_input_errors(tiny_llama_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="evaluation split"):
        OwnInt4Config(algorithm="gptq", calibration_dataset="wikitext2")
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "only a few words"}\n')
    source = calibration(tiny_llama_dir, data_dir)
    with pytest.raises(DataError, match="needs 128; lower one of them"):
        source.sequences(OwnInt4Config(calibration_dataset=str(short), **SMALL))
    with pytest.raises(DataError, match="missing column"):
        source.sequences(OwnInt4Config(calibration_dataset=str(short), calibration_text_column="body", **SMALL))
    with pytest.raises(DataError, match="not found"):
        source.sequences(OwnInt4Config(calibration_dataset=str(tmp_path / "gone.jsonl"), **SMALL))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    method = METHODS.get("own-int4")
    with pytest.raises(ConfigError, match="longer than the model's context"):
        method.quantize(model, OwnInt4Config(algorithm="clip", calibration_seq_len=4096), source)


def test_only_calibrating_choices_key_their_variant_by_the_calibration_text(tiny_llama_dir, data_dir, tmp_path):
    from quantarena.config import method_choice

    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "some other calibration text"}\n')
    resolved = models.resolve(str(tiny_llama_dir))

    def identity(**options):
        variant = Variant(resolved, "causal-lm", method_choice({"name": "own-int4", **options}), "cpu", 0, data_dir)
        return variant.identity()["calibration"]

    assert identity() is None and identity(calibration_dataset=str(other)) is None
    assert identity(algorithm="gptq") != identity(algorithm="gptq", calibration_dataset=str(other)) is not None


def test_awq_scales_lower_round_to_nearest_error_and_folding_keeps_the_float_model(tiny_llama_dir):
    from quantarena.ownquant.algorithms import nearest
    from quantarena.ownquant.awq import awq_scale, fold_awq

    weight, hessian = layer_and_hessian(k=64)
    grid = int4_grid(16)
    s = awq_scale([weight], hessian, grid)
    assert output_error(weight, nearest(weight * s, grid) / s, hessian) < output_error(
        weight, nearest(weight, grid), hessian
    )

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    block = "model.layers.0."
    names = [block + n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")]
    names.append(block + "mlp.down_proj")
    hessians = {n: torch.diag(torch.rand(model.get_submodule(n).in_features) + 0.1) for n in names}
    hessians.update(dict.fromkeys(names[:3], hessians[names[0]]))
    scaled = fold_awq(model, hessians, grid)
    with torch.no_grad():
        after = model(ids).logits
    # gate_proj was not among the layers, so only q/k/v (from the norm) and down (from up) were scaled.
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    assert not torch.equal(scaled[names[0]], hessians[names[0]]) and scaled[names[3]] is hessians[names[3]]


def test_awq_runs_on_a_llama_and_is_refused_where_no_mapping_exists(tiny_llama_dir, tiny_gpt2_dir, data_dir):
    method = METHODS.get("own-int4")
    config = method.config_cls(awq=True, algorithm="clip", group_size=16, **SMALL)
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    quantized = method.quantize(llama, config, calibration(tiny_llama_dir, data_dir))
    assert sum(isinstance(m, Int4WeightLinear) for m in quantized.modules()) == 2 * 7
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    with pytest.raises(ConfigError, match="model type 'gpt2' has no mapping"):
        method.quantize(gpt2, config, calibration(tiny_gpt2_dir, data_dir))


def test_a_layer_calibration_never_runs_is_still_quantized(tiny_llama_dir, data_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    model.model.layers[0].mlp.unused = torch.nn.Linear(64, 32)  # as an expert no token is routed to
    method = METHODS.get("own-int4")
    with torch.no_grad():
        quantized = method.quantize(model, method.config_cls(algorithm="gptq", group_size=16, **SMALL),
                                    calibration(tiny_llama_dir, data_dir))  # fmt: skip
    assert isinstance(quantized.model.layers[0].mlp.unused, Int4WeightLinear)
