"""GGUF legacy block types: ggml's reference quantizer (the gguf package), our PyTorch dequantizer against the
package's, the bytes a GGUF file holds, save -> reload, and Q8_0's closeness to fp32 on SmolLM2."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from quantarena import models
from quantarena.measure import weight_bytes
from quantarena.methods import METHODS
from quantarena.ownquant.ggml import LEGACY, TYPES, GgufWeightLinear, dequantize_rows, quantize_blocks
from quantarena.workflows.roundtrip import load_quantized, quantize_to_disk


@pytest.mark.parametrize("name", LEGACY)
def test_dequantization_equals_the_gguf_package_and_bytes_are_the_files(name):
    weight = torch.randn(12, 160, generator=torch.Generator().manual_seed(0)) * 0.02
    block_type = TYPES[name]
    data = quantize_blocks(weight, block_type)
    qtype = GGMLQuantizationType[name.upper()]
    assert GGML_QUANT_SIZES[qtype] == (32, block_type.type_size)
    reference = quants.dequantize(data.numpy(), qtype).astype(np.float32)
    ours = dequantize_rows(data, block_type)
    assert torch.equal(ours, torch.from_numpy(reference))
    layer = GgufWeightLinear(data, 160, block_type, None)
    assert weight_bytes(layer) == 12 * 160 // 32 * block_type.type_size
    assert (ours - weight).abs().max() < weight.abs().max() / (2 ** (block_type.bits - 2))


def test_a_row_that_blocks_do_not_divide_stays_float():
    model = torch.nn.Sequential(torch.nn.Linear(40, 8), torch.nn.Linear(8, 64), torch.nn.Linear(64, 32))
    method = METHODS.get("gguf-q4_0")
    quantized = method.apply(model, method.config_cls(skip_modules=()))
    assert [type(m).__name__ for m in quantized] == ["Linear", "Linear", "GgufWeightLinear"]


@pytest.mark.parametrize("method", ["gguf-q4_0", "gguf-q5_1"])
def test_gguf_variants_reload_the_same(tiny_llama_dir, tmp_path, method):
    spec = METHODS.get(method)
    out = quantize_to_disk(str(tiny_llama_dir), method, tmp_path / "q")
    reloaded, tokenizer = load_quantized(out)
    model, _ = models.load(models.resolve(str(tiny_llama_dir)), "causal-lm", seed=0)
    in_memory = spec.apply(copy.deepcopy(model), spec.config_cls())
    batch = tokenizer(["a small test sentence", "another one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, in_memory(**batch).logits)


@pytest.mark.slow
def test_q8_0_perplexity_is_within_one_percent_of_fp32_on_smollm2(smollm2_wikitext, perplexity):
    model, _, ids = smollm2_wikitext
    spec = METHODS.get("gguf-q8_0")
    fp32 = perplexity(model, ids)
    q8 = perplexity(spec.apply(copy.deepcopy(model), spec.config_cls()), ids)
    q4 = perplexity(METHODS.get("gguf-q4_0").apply(copy.deepcopy(model), spec.config_cls()), ids)
    assert abs(q8 / fp32 - 1) < 0.01 < q4 / fp32 - 1
