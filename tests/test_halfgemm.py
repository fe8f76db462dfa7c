"""The exact half GEMM: on CPUs where PyTorch multiplies bf16/fp16 with its dot-product fallback, bf16 and fp16
Linear layers run the project's kernel, and every output is PyTorch's, bit for bit."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from quantarena import halfgemm
from quantarena.environment import cxx_compiler
from quantarena.halfgemm import HalfLinear, kernel_unavailable, native_half_gemm, pytorch_fallback, use_half_gemm

needs_kernel = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))
DTYPES = [torch.bfloat16, torch.float16]


def pytorchs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's half product where it has no oneDNN kernels: its fallback (forced where oneDNN has them)."""
    with pytorch_fallback():
        return F.linear(x, weight, bias)


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN where NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_the_kernel_builds_wherever_it_can():
    """AVX2 and a compiler (CI): a failed build, or outputs that differ from PyTorch's fallback, fail here."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and cxx_compiler():
        assert kernel_unavailable() is None


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows, columns, depth",
    # one tile; rows and outputs past whole tiles (6 x 16); the SmolLM2 shapes; a wide head-like layer
    [(6, 16, 64), (13, 37, 128), (64, 1536, 576), (9, 576, 1536), (8, 3000, 64)],
)
def test_outputs_are_pytorchs_bit_for_bit(dtype, rows, columns, depth):
    torch.manual_seed(rows + columns)
    x = (torch.randn(rows, depth) * 3).to(dtype)
    weight = torch.randn(columns, depth).to(dtype)
    bias = torch.randn(columns).to(dtype)
    for b in (None, bias):
        assert identical(torch.ops.quantarena_half.linear(x, weight, b), pytorchs(x, weight, b))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_and_overflow_come_out_as_pytorchs(dtype):
    torch.manual_seed(0)
    x = torch.randn(8, 128).to(dtype)
    weight = torch.randn(24, 128).to(dtype)
    x[1, 5], x[2, 70], weight[3, 9] = float("nan"), float("inf"), float("-inf")
    x[4] = 6e4 if dtype == torch.float16 else 3e38  # sums that overflow the dtype
    assert identical(torch.ops.quantarena_half.linear(x, weight, None), pytorchs(x, weight))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_model_scores_as_with_pytorchs_product(tiny_llama_dir, dtype, monkeypatch):
    """Where oneDNN has half kernels no layer is taken; the kernel is still checked against PyTorch's fallback, as
    if it had none."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).eval()
    assert use_half_gemm(copy.deepcopy(model)) == (0 if native_half_gemm(dtype) else 13)
    monkeypatch.setattr(halfgemm, "native_half_gemm", lambda dtype: False)
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    with torch.inference_mode():
        with pytorch_fallback():
            before, before_short = model(ids).logits, model(ids[:1, :3]).logits
        assert use_half_gemm(model) == 13  # q, k, v, o, gate, up of 2 layers, the head: width 64
        # down_proj reads 160 features (not a multiple of 64): PyTorch's product, untouched.
        assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
        with pytorch_fallback():  # the layers the kernel does not take
            assert identical(model(ids).logits, before)
            assert identical(model(ids[:1, :3]).logits, before_short)  # under 8 rows: PyTorch's product
    state = model.state_dict()
    assert all(t.dtype == dtype for n, t in state.items() if n.endswith("weight"))


def test_only_slow_half_products_are_taken(monkeypatch):
    model = nn.Sequential(
        nn.Linear(64, 8).bfloat16(),  # taken where PyTorch has no native bf16 GEMM
        nn.Linear(64, 8),  # fp32: MKL's already
        nn.Linear(96, 8).bfloat16(),  # 96 features: PyTorch's tails, not the kernel's
    )
    monkeypatch.setattr(halfgemm, "kernel_unavailable", lambda: None)
    monkeypatch.setattr(halfgemm, "native_half_gemm", lambda dtype: False)
    assert [halfgemm.fits(m) for m in model] == [True, False, False]
    monkeypatch.setattr(halfgemm, "native_half_gemm", lambda dtype: True)  # oneDNN's kernels: nothing to gain
    assert use_half_gemm(model) == 0


def test_without_the_kernel_pytorchs_product_runs(monkeypatch):
    monkeypatch.setattr(halfgemm, "kernel_unavailable", lambda: "needs a C++ compiler to build it (none on PATH)")
    monkeypatch.setattr(halfgemm, "native_half_gemm", lambda dtype: False)
    model = nn.Sequential(nn.Linear(64, 8).bfloat16())
    assert use_half_gemm(model) == 0 and type(model[0]) is nn.Linear
    layer = nn.Linear(64, 8).bfloat16()
    layer.__class__ = HalfLinear  # a layer taken before: it falls back rather than calling a missing op
    x = torch.randn(16, 64).bfloat16()
    assert identical(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_kernel
def test_a_taken_layer_moved_cast_or_trained_runs_pytorchs_product():
    layer = nn.Linear(64, 8).bfloat16()
    layer.__class__ = HalfLinear
    x = torch.randn(16, 64)
    with torch.no_grad():
        assert torch.equal(layer.float()(x), F.linear(x, layer.weight, layer.bias))  # fp32 now: MKL's, no error
    layer = layer.bfloat16()
    xb = x.bfloat16().requires_grad_()
    y = layer(xb)  # grad mode, trainable weights: the op has no backward, so PyTorch's product
    y.sum().backward()
    assert xb.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        assert identical(layer(xb), y)
