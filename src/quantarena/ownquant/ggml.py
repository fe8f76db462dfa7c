"""llama.cpp's legacy GGUF block types, quantized by the ``gguf`` package and held as the very bytes a GGUF file
stores, dequantized in PyTorch for each matmul.

``gguf.quants.quantize`` is the Python port of ggml's reference quantizers (``quantize_row_*_ref``), so the
codes are the ones ``llama-quantize`` writes for these types. Every block covers 32 consecutive weights of a
row and starts with its fp16 scale ``d`` (and, for the ``_1`` types, an fp16 minimum ``m``); the low nibbles of
the 16 code bytes are elements 0-15 and the high nibbles 16-31; Q5 types keep each element's fifth bit in a
32-bit field (bit j for element j):

* Q8_0: ``d``, 32 int8 codes; ``w = q * d``.
* Q4_0 / Q5_0: ``w = (q - 8) * d`` / ``(q - 16) * d``.
* Q4_1 / Q5_1: ``w = q * d + m``.

The k-quants (Q4_K, Q6_K, ...) and i-quants need llama.cpp's own quantizer and are not here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quantarena.ownquant.formats import WeightOnlyLinear

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    name: str
    bits: int
    has_min: bool

    @property
    def block_bytes(self) -> int:
        codes = BLOCK if self.bits == 8 else BLOCK // 2  # Q5's fifth bits are the 4-byte field's
        return 2 + 2 * self.has_min + 4 * (self.bits == 5) + codes

    @property
    def centre(self) -> int:
        return 0 if self.has_min or self.bits == 8 else 1 << (self.bits - 1)


TYPES = {t.name: t for t in (BlockType("q8_0", 8, False), BlockType("q4_0", 4, False), BlockType("q4_1", 4, True),
                             BlockType("q5_0", 5, False), BlockType("q5_1", 5, True))}  # fmt: skip


def quantize_blocks(weight: torch.Tensor, block_type: BlockType) -> torch.Tensor:
    """(N, K) float -> (N, K / 32 * block bytes) uint8, ggml's reference quantizer."""
    from gguf import GGMLQuantizationType, quants

    if weight.shape[1] % BLOCK:
        raise ValueError(f"GGUF {block_type.name} needs rows of a multiple of {BLOCK} weights, not {weight.shape[1]}")
    qtype = GGMLQuantizationType[block_type.name.upper()]
    data = quants.quantize(weight.detach().float().cpu().numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(data)).to(weight.device)


def dequantize_blocks(data: torch.Tensor, block_type: BlockType, k: int) -> torch.Tensor:
    n = data.shape[0]
    blocks = data.view(n, k // BLOCK, block_type.block_bytes)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    start = 2
    m = None
    if block_type.has_min:
        m, start = blocks[..., 2:4].contiguous().view(torch.float16).float(), 4
    if block_type.bits == 8:
        q = blocks[..., start:].contiguous().view(torch.int8).float()
    else:
        high = None
        if block_type.bits == 5:
            bits = blocks[..., start : start + 4].long()
            field = bits[..., 0] | bits[..., 1] << 8 | bits[..., 2] << 16 | bits[..., 3] << 24
            high = (field[..., None] >> torch.arange(BLOCK, device=data.device)) & 1
            start += 4
        nibbles = blocks[..., start : start + 16]
        q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).long()
        if high is not None:
            q = q | (high << 4)
        q = (q - block_type.centre).float()
    w = q * d if m is None else q * d + m
    return w.view(n, k)


class GgufWeightLinear(WeightOnlyLinear):
    """A Linear whose weight is one GGUF tensor of a legacy block type, bytes as the file stores them."""

    def __init__(self, blocks: torch.Tensor, in_features: int, block_type: BlockType, bias: torch.Tensor | None):
        super().__init__(in_features, blocks.shape[0], bias)
        self.block_type = block_type
        self.register_buffer("qweight", blocks)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, block_type: BlockType) -> GgufWeightLinear:
        return cls(quantize_blocks(linear.weight, block_type), linear.in_features, block_type, linear.bias)

    def dequantize(self) -> torch.Tensor:
        return dequantize_blocks(self.qweight, self.block_type, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, GGUF {self.block_type.name}"
