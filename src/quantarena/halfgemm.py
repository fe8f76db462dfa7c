"""bf16 / fp16 Linear layers on CPUs without native half GEMMs: PyTorch's numbers, about 5x faster.

Where oneDNN has no bf16/fp16 kernels (AVX2 without AVX512 or AVX2-VNNI-2), PyTorch multiplies half tensors one
dot product per output, 7-8x slower than an fp32 GEMM (a 1600x576 @ 576x1536 product: 158 ms against 19 ms
here), so a bf16 variant is the slowest cell of a CPU sweep, and lm-eval's bf16 run the slowest of its runs.
``csrc/half_gemm_avx2.cpp`` computes the same sums in the same order as tiles of fp32 GEMMs, so its outputs equal
PyTorch's bit for bit; faster numbers that were merely as good (an fp32 GEMM of the half values rounded once:
the same contract, another summation order) moved SmolLM2's bf16 log-probabilities 0.06 nats on average from
PyTorch's, as far as bf16 itself moves them from fp32, and so would not agree with lm-eval's.

The kernel is checked against PyTorch's fallback on first use (a future PyTorch may sum in another order); where it
cannot build or does not agree, and for shapes it does not take, PyTorch's own product runs. Where oneDNN has half
kernels (AVX512-BF16, AMX), PyTorch's product is fast already and no layer is taken.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantarena.extensions import build_avx2_extension

SOURCE = Path(__file__).parent / "csrc" / "half_gemm_avx2.cpp"
K_MULTIPLE = 64  # PyTorch's dot product sums blocks of 64; its tails follow other rules
# Below this many rows (decode steps) PyTorch's product is as fast: it reads each weight once either way.
MIN_ROWS = 8
HALF_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether PyTorch multiplies ``dtype`` with oneDNN's kernels on this CPU rather than its dot-product fallback."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a build without oneDNN has the fallback only
        return False


@contextlib.contextmanager
def pytorch_fallback() -> Iterator[None]:
    """PyTorch's dot-product half product even where oneDNN has half kernels: what the kernel reproduces."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the flags' note on TF32 for Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def _disagreement() -> str | None:
    """Where the kernel's outputs differ from PyTorch's fallback on random problems with a bias and ragged tiles."""
    generator = torch.Generator().manual_seed(0)
    for dtype in HALF_DTYPES:
        for rows, columns, depth in ((13, 37, 192), (8, 16, 64)):
            x = torch.randn(rows, depth, generator=generator).to(dtype)
            weight = torch.randn(columns, depth, generator=generator).to(dtype)
            bias = torch.randn(columns, generator=generator).to(dtype)
            for b in (None, bias):
                with pytorch_fallback():
                    expected = F.linear(x, weight, b)
                if not torch.equal(torch.ops.quantarena_half.linear(x, weight, b), expected):
                    return f"its {dtype} outputs differ from PyTorch {torch.__version__}'s"
    return None


@functools.cache
def kernel_unavailable() -> str | None:
    """Why the exact half GEMM cannot run here, or None once it is built, loaded and agrees with PyTorch."""
    unavailable = build_avx2_extension("quantarena_half_gemm_avx2", SOURCE)
    if unavailable:
        return unavailable

    @torch.library.register_fake("quantarena_half::linear")
    def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        return x.new_empty(x.shape[0], weight.shape[0])

    return _disagreement()


class HalfLinear(nn.Linear):
    """A bf16/fp16 nn.Linear whose CPU products run the exact half GEMM (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if rows < MIN_ROWS or not self._takes(x):
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.quantarena_half.linear(x.reshape(rows, self.in_features).contiguous(), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def _takes(self, x: torch.Tensor) -> bool:
        """Whether this call is one the kernel computes as PyTorch would: the layer may have been moved, cast or
        made trainable since it was taken (the op has no backward)."""
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return (
            not wants_grad
            and fits(self, taken=True)
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype
            and kernel_unavailable() is None
        )


def fits(module: nn.Module, taken: bool = False) -> bool:
    """An nn.Linear (``taken``: a HalfLinear) whose product PyTorch runs through its slow half fallback here, of a
    shape the kernel takes."""
    weight = getattr(module, "weight", None)
    return (
        type(module) is (HalfLinear if taken else nn.Linear)
        and weight is not None
        and weight.device.type == "cpu"
        and weight.dtype in HALF_DTYPES
        and weight.is_contiguous()
        and module.in_features % K_MULTIPLE == 0
        and (module.bias is None or module.bias.dtype == weight.dtype)
        and not native_half_gemm(weight.dtype)
    )


def use_half_gemm(model: nn.Module) -> int:
    """Give the model's half-precision Linear layers the exact half GEMM where it runs; how many it took."""
    layers = [m for m in model.modules() if fits(m)]
    if not layers or kernel_unavailable():
        return 0
    for module in layers:
        module.__class__ = HalfLinear
    return len(layers)
