"""The FP4 weight formats of the newest GPUs, stored exactly as packed, computed by dequantizing (simulated).

Both store 4-bit E2M1 elements (sign, 2 exponent bits, 1 mantissa bit: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}), two per
byte, in blocks along K with one scale per block:

* MXFP4 (OCP Microscaling Formats v1.0): blocks of 32, the scale a power of two stored as E8M0 (a biased
  exponent byte), ``2 ** (floor(log2(amax)) - 2)`` (2 is E2M1's largest exponent); elements beyond +-6 after
  scaling saturate, as the spec says.
* NVFP4 (NVIDIA Blackwell): blocks of 16, the scale an FP8 E4M3 number, with one FP32 scale per tensor that
  brings the block scales into E4M3's range: ``global = amax(W) / (6 * 448)``, ``block = amax(block) / 6 /
  global`` rounded to E4M3, elements ``w / (block * global)``.

Elements round to nearest, ties to even (the even code), as the hardware converts. No FP4 arithmetic exists
on the machines here, so the matmul runs on the dequantized weights: quality is the format's, the bytes are the
packed format's, the speed is not FP4 hardware's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantarena.ownquant.formats import WeightOnlyLinear, pack_int4, unpack_int4

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E2M1_EMAX = 2
E4M3_MAX = 448.0
_E8M0_BIAS = 127


@dataclass(frozen=True)
class Fp4Format:
    name: str
    block_size: int


MXFP4 = Fp4Format("mxfp4", 32)
NVFP4 = Fp4Format("nvfp4", 16)
FORMATS = {f.name: f for f in (MXFP4, NVFP4)}


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """4-bit codes (sign in bit 3, magnitude index in bits 0-2) of ``x``, nearest value, ties to the even code;
    magnitudes beyond 6 saturate."""
    values = torch.tensor(E2M1_VALUES, device=x.device)
    middles = (values[1:] + values[:-1]) / 2
    magnitude = x.abs().clamp(max=E2M1_MAX)
    index = torch.bucketize(magnitude, middles)  # a tie goes to the lower value here
    tie = (index < len(middles)) & (magnitude == middles[index.clamp(max=len(middles) - 1)])
    index = index + (tie & (index % 2 == 1)).long()  # ...and to the even code
    return index | ((x < 0).long() << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    values = torch.tensor(E2M1_VALUES, device=codes.device)
    magnitude = values[(codes & 7).long()]
    return torch.where(codes & 8 > 0, -magnitude, magnitude)


def _blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """(N, K) -> (N, blocks, block_size), zero-padded (a zero never raises a block's maximum)."""
    pad = -w.shape[1] % block_size
    return F.pad(w, (0, pad)).view(w.shape[0], -1, block_size)


def quantize_fp4(weight: torch.Tensor, fmt: Fp4Format) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes (N, ceil(K/2)) uint8, block scales (N, blocks), tensor scale ()) of ``weight`` (N, K)."""
    w = weight.detach().float()
    blocks = _blocks(w, fmt.block_size)
    amax = blocks.abs().amax(dim=2)
    if fmt is MXFP4:
        exponent = torch.floor(torch.log2(amax.clamp_min(2.0**-127))) - E2M1_EMAX
        exponent = exponent.clamp(-_E8M0_BIAS, _E8M0_BIAS)
        scales = (exponent + _E8M0_BIAS).to(torch.uint8)
        tensor_scale = torch.ones(())
    else:
        tensor_scale = (w.abs().amax() / (E2M1_MAX * E4M3_MAX)).clamp_min(torch.finfo(torch.float32).tiny)
        scales = (amax / E2M1_MAX / tensor_scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    step = block_scales(scales, fmt) * tensor_scale
    # A block of zeros (or one whose E4M3 scale underflowed to 0) stores zeros.
    scaled = torch.where(step[..., None] > 0, blocks / step.clamp_min(torch.finfo(torch.float32).tiny)[..., None], 0)
    codes = e2m1_codes(scaled).view(w.shape[0], -1)[:, : w.shape[1]]
    return pack_int4(codes), scales, tensor_scale


def block_scales(scales: torch.Tensor, fmt: Fp4Format) -> torch.Tensor:
    if fmt is MXFP4:
        return torch.exp2(scales.float() - _E8M0_BIAS)
    return scales.float()


def dequantize_fp4(
    packed: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor, k: int, fmt: Fp4Format
) -> torch.Tensor:
    values = e2m1_values(unpack_int4(packed, k))
    step = (block_scales(scales, fmt) * tensor_scale).repeat_interleave(fmt.block_size, dim=1)[:, :k]
    return values * step


class Fp4WeightLinear(WeightOnlyLinear):
    """A Linear whose weight is MXFP4 or NVFP4, dequantized for each matmul."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        tensor_scale: torch.Tensor,
        in_features: int,
        fmt: Fp4Format,
        bias: torch.Tensor | None = None,
    ):
        super().__init__(in_features, qweight.shape[0], bias)
        self.fmt = fmt
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("tensor_scale", tensor_scale)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, fmt: Fp4Format) -> Fp4WeightLinear:
        return cls(*quantize_fp4(linear.weight, fmt), linear.in_features, fmt, linear.bias)

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp4(self.qweight, self.scales, self.tensor_scale, self.in_features, self.fmt)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt.name} (simulated)"
