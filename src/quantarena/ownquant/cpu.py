"""The own int8 format on the CPU through PyTorch's quantized engine (FBGEMM / oneDNN): int8 x int8.

The weights are exactly the own int8 ones (per output channel, symmetric, fp32 scales) handed to
``quantized::linear_prepack``; each call quantizes the activations per tensor (dynamic, asymmetric
uint8) and multiplies in integers with fp32 accumulation and rescale (``quantized::linear_dynamic``).
The activation range is reduced to 7 bits, as torch.ao does on x86: AVX2's u8 x s8 pair-add
saturates at int16 with full-range activations and 127-valued weights.

The packed weight is the only copy held; ``state_dict`` unpacks it to the own int8 tensors
(``qweight``, ``scales``, ``bias``), so the checkpoint and the measured bytes are those of own-int8.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from quantarena.ownquant.formats import Int8WeightLinear, WeightOnlyLinear, quantize_int8_per_channel

REDUCE_RANGE = True


def cpu_int8_available() -> bool:
    return bool({"fbgemm", "x86", "onednn"} & set(torch.backends.quantized.supported_engines))


class Int8CpuLinear(WeightOnlyLinear):
    kernel = "fbgemm"
    saved_format = Int8WeightLinear.__name__  # the checkpoint is an own-int8 one

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(qweight.shape[1], qweight.shape[0], None)
        zero_points = torch.zeros(qweight.shape[0], dtype=torch.long)
        # torch announces the deprecation of quantized tensors on every creation; FBGEMM still takes them.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            w = torch._make_per_channel_quantized_tensor(qweight.cpu(), scales.cpu().double(), zero_points, 0)
        b = None if bias is None else bias.detach().float().cpu()
        self._packed = torch.ops.quantized.linear_prepack(w, b)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8CpuLinear:
        return cls(*quantize_int8_per_channel(linear.weight), linear.bias)

    @classmethod
    def from_own(cls, module: Int8WeightLinear) -> Int8CpuLinear:
        return cls(module.qweight, module.scales, module.bias)

    def own_tensors(self) -> dict[str, torch.Tensor]:
        w, b = torch.ops.quantized.linear_unpack(self._packed)
        tensors = {"qweight": w.int_repr(), "scales": w.q_per_channel_scales().float()}
        return tensors if b is None else {**tensors, "bias": b}

    def dequantize(self) -> torch.Tensor:
        t = self.own_tensors()
        return t["qweight"].float() * t["scales"][:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, REDUCE_RANGE)
        return y.to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for name, tensor in self.own_tensors().items():
            destination[prefix + name] = tensor

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel (FBGEMM)"
