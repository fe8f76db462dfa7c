"""GGUF tensors held as the very bytes a GGUF file stores, dequantized in PyTorch for each matmul.

Two sources of bytes: the legacy block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) are quantized here by the ``gguf``
package, whose ``quants.quantize`` is the Python port of ggml's reference quantizers (``quantize_row_*_ref``),
so the codes are the ones ``llama-quantize`` writes for these types; every other type (the k-quants, IQ4) comes
from llama.cpp's own ``llama-quantize`` (``quantarena.llamacpp``) and is read back from its file.

Every type splits a row into blocks of ``block_size`` weights stored in ``type_size`` bytes; the dequantizers
below are the ``gguf`` package's (``gguf.quants``) written in torch, tested equal to them:

* Q8_0: fp16 ``d``, 32 int8 codes; ``w = q * d``. Q4_0 / Q5_0: ``w = (q - 8) * d`` / ``(q - 16) * d``.
  Q4_1 / Q5_1: ``w = q * d + m``. Low nibbles are elements 0-15, high nibbles 16-31; Q5's fifth bits are a
  32-bit field (bit j for element j).
* Q4_K / Q5_K (256 weights): fp16 ``d`` and ``dmin``, eight 6-bit scales and mins packed in 12 bytes;
  ``w = d * sc * q - dmin * m`` per 32 weights.
* Q6_K (256): 16 int8 scales of 16 weights each, ``w = d * scale * (q - 32)``.
* IQ4_NL (32) / IQ4_XS (256, 6-bit scale per 32): 4-bit indices into a fixed non-uniform table of 16 values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from quantarena.ownquant.formats import WeightOnlyLinear

BLOCK = 32
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _shifts(*amounts: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(amounts, dtype=torch.int32, device=device)


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """(..., n) bytes -> (..., 2n): the n low nibbles, then the n high ones."""
    b = b.int()
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


def _legacy(bits: int, has_min: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    centre = 0 if has_min or bits == 8 else 1 << (bits - 1)

    def dequantize(b: torch.Tensor) -> torch.Tensor:
        d, start = _f16(b[..., 0:2]), 2
        m = None
        if has_min:
            m, start = _f16(b[..., 2:4]), 4
        if bits == 8:
            return b[..., start:].contiguous().view(torch.int8).float() * d
        q = None
        if bits == 5:
            field = b[..., start : start + 4].contiguous().view(torch.int32)
            q = ((field >> _shifts(*range(BLOCK), device=b.device)) & 1) << 4
            start += 4
        q = _nibbles(b[..., start : start + 16]) | (0 if q is None else q)
        w = (q - centre).float() * d
        return w if m is None else w + m

    return dequantize


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins."""
    s = s.int()
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    scales = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales.float(), mins.float()


def _q45_k(b: torch.Tensor) -> torch.Tensor:
    high_bits = b.shape[-1] == 176  # Q5_K: 32 bytes of fifth bits before the nibbles
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    scales, mins = _k_scales(b[..., 4:16])
    qs = b[..., 48:] if high_bits else b[..., 16:]
    q = _nibbles(qs.reshape(*qs.shape[:-1], 4, 32)).reshape(*qs.shape[:-1], 8, 32)
    if high_bits:
        qh = b[..., 16:48].int().unsqueeze(-2) >> _shifts(*range(8), device=b.device)[:, None]
        q = q | ((qh & 1) << 4)
    w = (d * scales)[..., None] * q.float() - (dmin * mins)[..., None]
    return w.flatten(-2)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    lead = b.shape[:-1]
    ql = _nibbles(b[..., 0:128].reshape(*lead, 2, 64)).reshape(*lead, 8, 32)
    qh = b[..., 128:192].int().reshape(*lead, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device)[:, None]
    q = (ql | ((qh & 3).reshape(*lead, 8, 32) << 4)) - 32
    scales = b[..., 192:208].contiguous().view(torch.int8).float()
    return ((_f16(b[..., 208:210]) * scales)[..., None] * q.reshape(*lead, 16, 16).float()).flatten(-2)


def _iq4_table(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.tensor(IQ4_VALUES, dtype=torch.float32, device=b.device)[q.long()]


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    return _iq4_table(b, _nibbles(b[..., 2:18])) * _f16(b[..., 0:2])


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    lead = b.shape[:-1]
    high = b[..., 2:4].contiguous().view(torch.int16).int() & 0xFFFF
    high = (high >> _shifts(*range(0, 16, 2), device=b.device)) & 3
    low = b[..., 4:8].int()
    low = torch.stack([low & 0x0F, low >> 4], dim=-1).reshape(*lead, 8)
    scales = ((low | (high << 4)) - 32).float() * _f16(b[..., 0:2])
    q = _nibbles(b[..., 8:136].reshape(*lead, 8, 16))
    return (_iq4_table(b, q) * scales[..., None]).flatten(-2)


@dataclass(frozen=True)
class GgmlType:
    """A GGML tensor type: how many weights a block holds, in how many bytes, and how to read them back."""

    name: str
    block_size: int
    type_size: int
    dequantize_blocks: Callable[[torch.Tensor], torch.Tensor]
    bits: int = 0  # of the legacy types' codes, which ``quantize_blocks`` writes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


def _type(name: str, dequantize: Callable[[torch.Tensor], torch.Tensor], bits: int = 0) -> GgmlType:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]]
    return GgmlType(name, block_size, type_size, dequantize, bits)


# The types ``quantize_blocks`` writes (the gguf-* methods of ``quantarena.methods.gguf``).
LEGACY = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
TYPES = {
    t.name: t
    for t in (
        _type("q8_0", _legacy(8, False), 8),
        _type("q4_0", _legacy(4, False), 4),
        _type("q4_1", _legacy(4, True), 4),
        _type("q5_0", _legacy(5, False), 5),
        _type("q5_1", _legacy(5, True), 5),
        _type("q4_k", _q45_k),
        _type("q5_k", _q45_k),
        _type("q6_k", _q6_k),
        _type("iq4_nl", _iq4_nl),
        _type("iq4_xs", _iq4_xs),
        _type("f16", _f16),
        _type("bf16", lambda b: b.contiguous().view(torch.bfloat16).float()),
    )
}


def quantize_blocks(weight: torch.Tensor, ggml_type: GgmlType) -> torch.Tensor:
    """(N, K) float -> (N, K / 32 * block bytes) uint8, ggml's reference quantizer (legacy types)."""
    from gguf import GGMLQuantizationType, quants

    if ggml_type.name not in LEGACY:
        raise ValueError(f"GGUF {ggml_type.name} is quantized by llama.cpp's llama-quantize, not here")
    if weight.shape[1] % BLOCK:
        raise ValueError(f"GGUF {ggml_type.name} needs rows of a multiple of {BLOCK} weights, not {weight.shape[1]}")
    data = quants.quantize(weight.detach().float().cpu().numpy(), GGMLQuantizationType[ggml_type.name.upper()])
    return torch.from_numpy(np.ascontiguousarray(data)).to(weight.device)


def dequantize_rows(data: torch.Tensor, ggml_type: GgmlType) -> torch.Tensor:
    """(..., row bytes) uint8 -> (..., K) float32."""
    blocks = data.reshape(*data.shape[:-1], -1, ggml_type.type_size)
    return ggml_type.dequantize_blocks(blocks).flatten(-2)


class GgufWeightLinear(WeightOnlyLinear):
    """A Linear whose weight is one GGUF tensor, its rows' bytes as the file stores them."""

    def __init__(self, blocks: torch.Tensor, in_features: int, ggml_type: GgmlType, bias: torch.Tensor | None):
        super().__init__(in_features, blocks.shape[0], bias)
        if blocks.shape[1] * ggml_type.block_size != in_features * ggml_type.type_size:
            raise ValueError(f"{blocks.shape[1]} bytes per row are not {in_features} weights of GGUF {ggml_type.name}")
        self.ggml_type = ggml_type
        self.register_buffer("qweight", blocks)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, ggml_type: GgmlType) -> GgufWeightLinear:
        return cls(quantize_blocks(linear.weight, ggml_type), linear.in_features, ggml_type, linear.bias)

    def dequantize(self) -> torch.Tensor:
        return dequantize_rows(self.qweight, self.ggml_type)

    def dequantize_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_rows(self.qweight[ids], self.ggml_type).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, GGUF {self.ggml_type.name}"


def ggml_summary(model: torch.nn.Module) -> dict[str, float]:
    """How many GGUF tensors of each type the model holds, and their bits per weight overall (``bits_per_weight``),
    e.g. ``{"q5_0": 166, "q4_k": 16, "q6_k": 14, "q8_0": 15, "bits_per_weight": 5.6}``; empty without any."""
    layers = [m for m in model.modules() if isinstance(m, GgufWeightLinear)]
    if not layers:
        return {}
    counts: dict[str, float] = {}
    for layer in layers:
        counts[layer.ggml_type.name] = counts.get(layer.ggml_type.name, 0) + 1
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    return counts | {"bits_per_weight": 8 * sum(layer.qweight.nbytes for layer in layers) / weights}
