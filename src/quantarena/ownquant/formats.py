"""The project's own weight-only formats, in plain PyTorch.

Layouts (shared with the Triton kernels in ``quantarena.ownquant.triton_kernels``):

* int8, per output channel, symmetric: ``qweight`` int8 ``(N, K)``, ``scales`` float32 ``(N,)``;
  ``w[n, k] = qweight[n, k] * scales[n]``.
* int4, group-wise along K, asymmetric: ``qweight`` uint8 ``(N, ceil(K / 2))`` with element ``2j``
  in the low nibble and ``2j + 1`` in the high nibble of byte ``j``; ``scales`` and ``mins`` float16
  ``(N, ceil(K / group_size))``; ``w[n, k] = q[n, k] * scales[n, k // g] + mins[n, k // g]``.
  A last partial group is allowed, so K need not be a multiple of the group size.

Scales are computed from the values that are actually stored (fp16-rounded), so rounding to the
grid uses the same scale the dequantizer will use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127
INT4_LEVELS = 15


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    qweight = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return qweight, scales


def dequantize_int8_per_channel(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales[:, None]


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, G, group_size), the last group padded by repeating its last column.

    Repeating a real value (rather than zero-padding) keeps the padding from widening the
    partial group's min/max range.
    """
    n, k = w.shape
    pad = -k % group_size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.view(n, -1, group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in [0, 15] -> (N, ceil(K/2)) uint8, even k in the low nibble."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).view(packed.shape[0], -1)[:, :k]


def quantize_int4_groupwise(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = _grouped(weight.detach().float(), group_size)
    mins = groups.amin(dim=2).to(torch.float16)
    scales = ((groups.amax(dim=2) - mins.float()) / INT4_LEVELS).to(torch.float16)
    # A constant group has range 0: any positive scale reproduces it exactly through the min.
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round((groups - mins.float()[..., None]) / scales.float()[..., None]).clamp_(0, INT4_LEVELS)
    q = q.view(weight.shape[0], -1)[:, : weight.shape[1]]
    return pack_int4(q), scales, mins


def dequantize_int4_codes(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) codes -> float32 weights, ``q * scale + min`` per group."""
    n, k = q.shape
    pad = -k % group_size
    w = (F.pad(q, (0, pad)) if pad else q).float()
    # One group per row: a scale broadcast along the last dim is ~10x faster than repeated or along a middle dim.
    w = w.view(-1, group_size).mul_(scales.float().view(-1, 1)).add_(mins.float().view(-1, 1))
    return w.view(n, -1)[:, :k]


def dequantize_int4_groupwise(
    packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, k: int, group_size: int
) -> torch.Tensor:
    return dequantize_int4_codes(unpack_int4(packed, k), scales, mins, group_size)


class WeightOnlyLinear(nn.Module):
    """A Linear whose weight is stored quantized and dequantized on the fly.

    ``kernel`` names the path the forward takes ("pytorch" here; the Triton kernels replace it
    on CUDA), so results can report which path actually ran.
    """

    kernel = "pytorch"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of the weight (a tied embedding's lookup); formats that can, read only those rows."""
        return F.embedding(ids, self.dequantize()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)


class Int8WeightLinear(WeightOnlyLinear):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightLinear:
        return cls(*quantize_int8_per_channel(linear.weight), linear.bias)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8_per_channel(self.qweight, self.scales)

    def dequantize_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, self.qweight).to(dtype) * self.scales[ids].to(dtype)[..., None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4WeightLinear(WeightOnlyLinear):
    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor,
        in_features: int,
        group_size: int,
        bias: torch.Tensor | None = None,
    ):
        super().__init__(in_features, qweight.shape[0], bias)
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4WeightLinear:
        packed, scales, mins = quantize_int4_groupwise(linear.weight, group_size)
        return cls(packed, scales, mins, linear.in_features, group_size, linear.bias)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4_groupwise(self.qweight, self.scales, self.mins, self.in_features, self.group_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size={self.group_size}"


class TiedEmbedding(nn.Module):
    """An input embedding tied to a quantized output head: the head's rows, dequantized, are its vectors.

    It holds no tensor of its own: the head's are the only copy. It keeps the head outside its submodules (so the
    head is saved and counted once, under its own name) and reads the head's tensors at each call (so they stay
    one copy after ``.to()``, which would give two modules' shared buffers a copy each).
    """

    def __init__(self, head: WeightOnlyLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self._head = (head,)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._head[0].dequantize_rows(ids, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the tied {type(self._head[0]).__name__} head"


class QuantizedEmbedding(nn.Module):
    """An input embedding of its own (not tied to a head) whose table is a quantized Linear's weight, held as its
    submodule ``rows`` (saved and counted under ``<name>.rows``)."""

    def __init__(self, rows: WeightOnlyLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.rows = rows
        self.num_embeddings, self.embedding_dim = rows.out_features, rows.in_features
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows.dequantize_rows(ids, self.dtype)
