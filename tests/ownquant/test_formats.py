import pytest
import torch
from torch import nn

from quantarena.config import sweep_config
from quantarena.measure import weight_bytes
from quantarena.methods import METHODS
from quantarena.ownquant.formats import (
    Int4WeightLinear,
    Int8WeightLinear,
    dequantize_int4_groupwise,
    pack_int4,
    quantize_int4_groupwise,
    unpack_int4,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("k", [1, 2, 7, 64])
def test_int4_pack_roundtrip(k):
    q = torch.randint(0, 16, (5, k))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), q.to(torch.uint8))


def test_int4_low_nibble_holds_even_element():
    assert pack_int4(torch.tensor([[3, 12]])).item() == 3 | (12 << 4)


@pytest.mark.parametrize("k", [64, 100, 577])
def test_int4_grid_error_is_within_half_a_step(k):
    w = torch.randn(8, k)
    packed, scales, mins = quantize_int4_groupwise(w, 32)
    assert scales.dtype == mins.dtype == torch.float16 and scales.shape == (8, -(-k // 32))
    deq = dequantize_int4_groupwise(packed, scales, mins, k, 32)
    step = scales.float().repeat_interleave(32, dim=1)[:, :k]
    # Half a step from rounding, plus the fp16 rounding of the min itself.
    assert ((deq - w).abs() <= step / 2 + 1e-3 * w.abs().amax()).all()


def test_int4_constant_group_is_exact():
    w = torch.full((2, 64), 0.25)
    assert torch.equal(dequantize_int4_groupwise(*quantize_int4_groupwise(w, 32), 64, 32), w)


@pytest.mark.parametrize(
    ("make", "bound"), [(Int8WeightLinear.from_linear, 0.01), (lambda lin: Int4WeightLinear.from_linear(lin, 64), 0.12)]
)
def test_quantized_linear_close_to_float(make, bound):
    torch.manual_seed(0)
    linear = nn.Linear(300, 70)
    x = torch.randn(4, 300)
    q = make(linear)
    assert rel_err(q(x), linear(x)) < bound
    assert torch.equal(q.bias, linear.bias)


def test_int4_bytes_are_under_0_30_of_fp16():
    linear = nn.Linear(576, 1536, bias=False)
    q = Int4WeightLinear.from_linear(linear, 64)
    fp16_bytes = linear.weight.numel() * 2
    assert weight_bytes(q) == 1536 * 288 + 2 * 1536 * 9 * 2
    assert weight_bytes(q) <= 0.30 * fp16_bytes


def _model_with_head():
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))


def _apply(name: str, model: nn.Module, **options):
    choice = sweep_config({"model": "x", "methods": [{"name": name, **options}], "tasks": ["perplexity"]}).methods[0]
    return METHODS.get(name).apply(model, choice.config)


def test_skip_modules_keeps_named_layers_in_float():
    model = _apply("own-int8", _model_with_head(), skip_modules=["2"])
    assert isinstance(model[0], Int8WeightLinear)
    assert type(model[2]) is nn.Linear


def test_own_int4_group_size_option_reaches_the_layers():
    model = _apply("own-int4", _model_with_head(), group_size=16, skip_modules=[])
    assert model[0].group_size == model[2].group_size == 16
