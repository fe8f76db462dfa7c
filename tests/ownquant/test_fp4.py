"""MXFP4 and NVFP4, simulated: the element rounding, MXFP4 against gguf's numpy implementation (llama.cpp's
reference), NVFP4 against a float64 transcription of its recipe, the packed bytes, and save -> reload."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import quants

from quantarena import models
from quantarena.measure import weight_bytes
from quantarena.methods import METHODS
from quantarena.ownquant.fp4 import (
    E2M1_VALUES,
    MXFP4,
    NVFP4,
    Fp4WeightLinear,
    dequantize_fp4,
    e2m1_codes,
    e2m1_values,
    quantize_fp4,
)
from quantarena.workflows.roundtrip import load_quantized, quantize_to_disk


def test_elements_round_to_nearest_ties_to_even_and_saturate():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.75, -5.0, 0.3, 2.9])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -1.0, -4.0, 0.5, 3.0]
    assert e2m1_values(e2m1_codes(x)).tolist() == expected
    grid = torch.tensor([*E2M1_VALUES, *(-v for v in E2M1_VALUES[1:])])
    assert torch.equal(e2m1_values(e2m1_codes(grid)), grid)


def test_mxfp4_equals_llama_cpps_reference():
    weight = torch.randn(24, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, scales, tensor_scale = quantize_fp4(weight, MXFP4)
    ours = dequantize_fp4(packed, scales, tensor_scale, 256, MXFP4)
    blocks = weight.numpy().reshape(-1, 32)
    reference = quants.MXFP4.dequantize_blocks(quants.MXFP4.quantize_blocks(blocks)).reshape(24, 256)
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(reference)))


def test_nvfp4_follows_its_recipe_in_float64():
    weight = torch.randn(8, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weight[0, :16] *= 1e-3  # a block whose scale is small next to the tensor's
    packed, scales, tensor_scale = quantize_fp4(weight, NVFP4)
    ours = dequantize_fp4(packed, scales, tensor_scale, 48, NVFP4)
    global_scale = float(weight.abs().max()) / (6 * 448)
    values = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    expected = torch.zeros_like(weight)
    for n in range(8):
        for start in range(0, 48, 16):
            block = weight[n, start : start + 16]
            scale = float(torch.tensor(float(block.abs().max()) / 6 / global_scale).to(torch.float8_e4m3fn).float())
            step = scale * float(torch.tensor(global_scale, dtype=torch.float32))
            magnitude = (block.abs() / step).clamp(max=6)
            nearest = values[(magnitude[:, None] - values[None, :]).abs().argmin(dim=1)]
            expected[n, start : start + 16] = torch.sign(block) * nearest * step
    assert torch.allclose(ours.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("fmt", "scale_bytes"), [(MXFP4, 1 / 32), (NVFP4, 1 / 16)])
def test_true_bytes_are_the_packed_formats(fmt, scale_bytes):
    linear = torch.nn.Linear(256, 96, bias=False)
    quantized = Fp4WeightLinear.from_linear(linear, fmt)
    # 4 bits per weight, one scale byte per block, one fp32 tensor scale.
    assert weight_bytes(quantized) == 96 * 256 // 2 + int(96 * 256 * scale_bytes) + 4


@pytest.mark.parametrize("method", ["mxfp4-sim", "nvfp4-sim"])
def test_fp4_variants_reload_the_same_and_say_they_are_simulated(tiny_llama_dir, tmp_path, method):
    spec = METHODS.get(method)
    assert "simulated" in spec.caveat
    out = quantize_to_disk(str(tiny_llama_dir), method, tmp_path / "q")
    reloaded, tokenizer = load_quantized(out)
    model, _ = models.load(models.resolve(str(tiny_llama_dir)), "causal-lm", seed=0)
    in_memory = spec.apply(copy.deepcopy(model), spec.config_cls())
    assert sum(isinstance(m, Fp4WeightLinear) for m in in_memory.modules()) == 2 * 7
    batch = tokenizer(["a small test sentence", "another one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        got, expected, reference = (m(**batch).logits for m in (reloaded, in_memory, model))
    assert torch.equal(got, expected)
    assert not torch.equal(got, reference)
