"""own-int8-cpu: the own int8 weights run by PyTorch's quantized CPU engine (FBGEMM)."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from quantarena.measure import weight_bytes
from quantarena.methods import METHODS
from quantarena.ownquant import kernel_summary
from quantarena.ownquant.cpu import Int8CpuLinear, avx2_kernels_unavailable, cpu_int8_available
from quantarena.ownquant.formats import dequantize_int8_per_channel, quantize_int8_per_channel

pytestmark = pytest.mark.skipif(not cpu_int8_available(), reason="no quantized CPU engine in this torch build")
OWN_INT8_KERNEL = "int8pack_mm" if avx2_kernels_unavailable() else "int8_avx2"  # what own-int8 runs here


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bias", [True, False])
def test_weights_are_own_int8_and_output_matches_float64(bias):
    torch.manual_seed(0)
    linear = nn.Linear(200, 45, bias=bias)
    module = Int8CpuLinear.from_linear(linear)
    q, s = quantize_int8_per_channel(linear.weight)
    held = module.own_tensors()
    assert torch.equal(held["qweight"], q) and torch.equal(held["scales"], s)
    assert ("bias" in held) == bias
    x = torch.randn(3, 7, 200)
    ref = x.double() @ dequantize_int8_per_channel(q, s).double().T
    if bias:
        ref = ref + linear.bias.double()
    y = module(x)
    assert y.shape == (3, 7, 45) and y.dtype == torch.float32
    # Activations quantized per tensor to 7 bits: about 1% relative error on Gaussian inputs.
    assert rel_err(y, ref) < 3e-2


def test_method_saves_own_int8_and_reloads(tiny_bert_dir, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    method = METHODS.get("own-int8-cpu")
    own = METHODS.get("own-int8")
    reference = own.apply(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval(), own.config_cls())
    model = method.apply(model, method.config_cls())
    assert kernel_summary(model) == {"fbgemm": 13}  # 2 layers x 6 and the pooler; the head stays float
    assert kernel_summary(reference) == {OWN_INT8_KERNEL: 13}
    assert weight_bytes(model) == weight_bytes(reference)

    ids = torch.randint(0, 30522, (2, 9))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        assert rel_err(logits, reference(input_ids=ids).logits.double()) < 5e-2

    method.save(model, tmp_path / "cpu")
    reloaded = method.reloader(tmp_path / "cpu", "cpu")
    assert kernel_summary(reloaded) == {"fbgemm": 13}
    as_own = own.reloader(tmp_path / "cpu", "cpu")  # the checkpoint is an own-int8 one
    assert kernel_summary(as_own) == {OWN_INT8_KERNEL: 13}
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)
        assert torch.allclose(as_own(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_method_is_cpu_only():
    assert "cuda" in METHODS.get("own-int8-cpu").requires.unmet("cuda")
