"""The own formats on the CPU, through the project's own kernels and those PyTorch ships.

Weight-only (own-int8 and own-int4 on the CPU, unless their config says ``kernel="pytorch"``): decode steps (one
new position per sequence, where every weight byte is read for one token) run packed-weight kernels: the
project's own, or PyTorch's (what gpt-fast and torchao's Int4CPULayout run, with bf16 activations: their fp32
paths are scalar references).
Every other forward, and every forward of a scoring task (``quantarena.numerics.exact``), dequantizes the same
codes and multiplies in fp32 as the portable path does, so every scored number is the portable path's (to MKL's
last-bit rounding, which can depend on where a freshly dequantized weight lies in memory); with the own kernels
the weights are written by their C++ dequantize (bit for bit the portable path's) into one reused buffer, which
spares a prompt the portable path's allocation of every layer's float weight.

* first choice, both formats: the project's AVX2 kernels (``csrc/gemv_avx2.cpp``, built by PyTorch's extension
  builder on first use and cached), which read the own tensors in place (no other bytes) and multiply in
  integers, each group of fp32 activations rounded to int16 on its own scale; own int4 reads ~2.5x the int4
  bytes per second of PyTorch's int4 kernel on this AVX2 CPU (``benchmarks/cpu_decode.py``). Where they cannot
  run (no AVX2, no C++ compiler or ninja; an int4 group size not a multiple of 32, an input width not a multiple
  of 16), or with ``kernel="torch-packed"``, PyTorch's:
* own int8: ``aten._weight_int8pack_mm`` reads the own int8 tensors as they are (per output channel, symmetric).
* own int4: ``aten._weight_int4pack_mm_for_cpu`` takes the codes in its own packed layout (same bytes as the own
  ``qweight``, which ``state_dict`` gives back, so the checkpoint is an own-int4 one) and a bf16 scale and zero
  point per group (4 bytes a group beyond the own fp16 scale and min, counted in the weight bytes). The layout
  depends on the CPU's vector width; a layer is converted only when its codes read back exactly, and otherwise
  keeps the portable path.

int8 x int8 through PyTorch's quantized engine (FBGEMM / oneDNN), the own-int8-cpu method:

The weights are exactly the own int8 ones (per output channel, symmetric, fp32 scales) handed to
``quantized::linear_prepack``; each call quantizes the activations per tensor (dynamic, asymmetric
uint8) and multiplies in integers with fp32 accumulation and rescale (``quantized::linear_dynamic``).
The activation range is reduced to 7 bits, as torch.ao does on x86: AVX2's u8 x s8 pair-add
saturates at int16 with full-range activations and 127-valued weights.

The packed weight is the only copy held; ``state_dict`` unpacks it to the own int8 tensors
(``qweight``, ``scales``, ``bias``), so the checkpoint and the measured bytes are those of own-int8.
"""

from __future__ import annotations

import functools
import threading
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantarena import numerics
from quantarena.extensions import build_avx2_extension
from quantarena.ownquant.formats import (
    Int4WeightLinear,
    Int8WeightLinear,
    WeightOnlyLinear,
    dequantize_int4_codes,
    pack_int4,
    quantize_int8_per_channel,
    unpack_int4,
)

REDUCE_RANGE = True
INT4PACK_GROUP_SIZES = (32, 64, 128, 256)
# The kernel's packed rows come in blocks of 4 vectors of floats: 64 rows with AVX512, 32 with AVX2.
INT4PACK_BLOCK_ROWS = (64, 32)
INT4PACK_OFFSET = 8


def cpu_int8_available() -> bool:
    return bool({"fbgemm", "x86", "onednn"} & set(torch.backends.quantized.supported_engines))


class KernelFormLinear(WeightOnlyLinear):
    """An own layer held in a kernel's own form; ``state_dict`` gives the own tensors (``own_tensors``), so its
    checkpoint is the own format's."""

    def own_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for name, tensor in self.own_tensors().items():
            destination[prefix + name] = tensor


class Int8CpuLinear(KernelFormLinear):
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

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel (FBGEMM)"


def decode_step(x: torch.Tensor) -> bool:
    """One new position per sequence (batch, 1, features), outside scoring: a decode step, which reads every
    weight for one token."""
    return x.dim() == 3 and x.shape[1] == 1 and not numerics.is_exact()


# The kernels as opaque custom ops: Inductor's own lowerings of them assert a realized bf16 input, which the cast
# before them is not, so a compiled decode step would fail; as custom ops they run as they do eagerly.
@torch.library.custom_op("quantarena::int8pack_mm_cpu", mutates_args=())
def int8pack_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (qweight * scales).T with bf16 activations (the kernel's fp32 path is a scalar reference, 8-60x
    slower than an fp32 GEMM here); the output in x's dtype."""
    a = x.to(torch.bfloat16).contiguous()
    return torch._weight_int8pack_mm(a, qweight, scales.to(torch.bfloat16)).to(x.dtype)


@torch.library.custom_op("quantarena::int4pack_mm_cpu", mutates_args=())
def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ W.T for int4 codes in the kernel's packed layout, bf16 activations; the output in x's dtype."""
    a = x.to(torch.bfloat16).contiguous()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(a, packed, group_size, scales_and_zeros).to(x.dtype)


@int8pack_mm.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


@int4pack_mm.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0])


def _as_linear(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """A kernel's (M, N) output for x (..., K): bias added, leading dims back."""
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*x.shape[:-1], out_features)


def _int8pack_forward(self: Int8WeightLinear, x: torch.Tensor) -> torch.Tensor:
    if not decode_step(x):
        return WeightOnlyLinear.forward(self, x)
    y = int8pack_mm(x.reshape(-1, x.shape[-1]), self.qweight, self.scales)
    return _as_linear(x, y, self.bias, self.out_features)


AVX2_SOURCE = Path(__file__).parent / "csrc" / "gemv_avx2.cpp"
AVX2_INT4_GROUP_MULTIPLE = 32  # the int4 kernel reads 16 bytes (32 codes) of a group at a time
AVX2_INT8_K_MULTIPLE = 16  # the int8 kernel reads 16 codes at a time


@functools.cache
def avx2_kernels_unavailable() -> str | None:
    """Why the own AVX2 kernels cannot run here, or None once they are built and loaded (torch caches the build
    under ``TORCH_EXTENSIONS_DIR``; it is rebuilt only when the source changes)."""
    unavailable = build_avx2_extension("quantarena_gemv_avx2", AVX2_SOURCE)
    if unavailable:
        return unavailable

    @torch.library.register_fake("quantarena_cpu::int4_gemv")
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int):
        return x.new_empty(*x.shape[:-1], qweight.shape[0])

    @torch.library.register_fake("quantarena_cpu::int8_gemv")
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor):
        return x.new_empty(*x.shape[:-1], qweight.shape[0])

    @torch.library.register_fake("quantarena_cpu::fp32_gemv")
    def _(x: torch.Tensor, weight: torch.Tensor):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("quantarena_cpu::int4_dequantize")
    def _(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int, out: torch.Tensor):
        return None

    @torch.library.register_fake("quantarena_cpu::int8_dequantize")
    def _(qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor):
        return None

    return None


def avx2_fits(module: WeightOnlyLinear) -> bool:
    """Whether an own layer's shape and dtypes are the own AVX2 kernels' (and those run here)."""
    if isinstance(module, Int4WeightLinear):
        fits = (
            module.group_size % AVX2_INT4_GROUP_MULTIPLE == 0
            and module.in_features % module.group_size == 0
            and module.qweight.dtype == torch.uint8
            and module.scales.dtype == module.mins.dtype == torch.float16
        )
    else:
        fits = (
            module.in_features % AVX2_INT8_K_MULTIPLE == 0
            and module.qweight.dtype == torch.int8
            and module.scales.dtype == torch.float32
        )
    return fits and avx2_kernels_unavailable() is None


_SCRATCH = threading.local()


def _weight_buffer(rows: int, columns: int) -> torch.Tensor:
    """One reused fp32 buffer (per thread) for the layer being multiplied: a fresh buffer for every layer of every
    forward is SmolLM2's 430 MB of page faults per prompt."""
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.numel() < rows * columns:
        buffer = _SCRATCH.buffer = torch.empty(rows * columns)
    return buffer[: rows * columns].view(rows, columns)


def _dequantized_forward(self: WeightOnlyLinear, x: torch.Tensor) -> torch.Tensor:
    """Prompts and scoring: the portable path's fp32 weights, bit for bit, written by the own kernel into a reused
    buffer, then fp32 ``F.linear`` as on the portable path."""
    if torch.is_grad_enabled() and x.requires_grad:  # autograd keeps the weight: it must not be overwritten
        return WeightOnlyLinear.forward(self, x)
    weight = _weight_buffer(self.out_features, self.in_features)
    if isinstance(self, Int4WeightLinear):
        torch.ops.quantarena_cpu.int4_dequantize(self.qweight, self.scales, self.mins, self.group_size, weight)
    else:
        torch.ops.quantarena_cpu.int8_dequantize(self.qweight, self.scales, weight)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, weight.to(x.dtype), bias)


def _avx2_forward(self: WeightOnlyLinear, x: torch.Tensor) -> torch.Tensor:
    if not decode_step(x):
        return _dequantized_forward(self, x)
    # The tensors straight from the module's dicts: nn.Module.__getattr__ costs ~2 us a tensor on a slow core,
    # a millisecond a token over SmolLM2's 210 layers.
    tensors = self._buffers
    if self.kernel == "int4_avx2":
        y = torch.ops.quantarena_cpu.int4_gemv(
            x, tensors["qweight"], tensors["scales"], tensors["mins"], self.group_size
        )
    else:
        y = torch.ops.quantarena_cpu.int8_gemv(x, tensors["qweight"], tensors["scales"])
    return _plus_bias(y, self._parameters.get("bias"))


def _plus_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


FLOAT_GEMV_KERNEL = "fp32_avx2"


def _float_gemv_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    one_token = decode_step(x) and x.shape[0] == 1 and x.dtype == torch.float32 and x.device.type == "cpu"
    if not one_token or torch.is_grad_enabled():
        return nn.Linear.forward(self, x)
    y = torch.ops.quantarena_cpu.fp32_gemv(x, self._parameters["weight"])
    return _plus_bias(y, self._parameters.get("bias"))


def use_float_gemv(model: nn.Module) -> int:
    """Run the fp32 ``nn.Linear`` layers of a CPU model (in a quantized one, what it keeps in float: a language
    model's tied output head) through the own threaded GEMV in one-token decode steps of a single sequence.

    PyTorch hands a one-row product to MKL's sgemv, which runs on one thread: SmolLM2's 113 MB head reads at
    ~9 GB/s on the 2-core EPYC, the own kernel at ~16-20. Outside those steps (prompts, batches, scoring,
    autograd) the layer is ``nn.Linear`` as before. The layers are marked ``kernel = "fp32_avx2"``
    (``float_kernel_summary``). Returns how many layers now run it (0 where the own kernels cannot run).
    """
    if avx2_kernels_unavailable() is not None:
        return 0
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module) is not nn.Linear or weight.dtype != torch.float32 or weight.device.type != "cpu":
            continue
        if not weight.is_contiguous():
            continue
        module.forward = types.MethodType(_float_gemv_forward, module)
        module.kernel = FLOAT_GEMV_KERNEL
        count += 1
    return count


def float_kernel_summary(model: nn.Module) -> dict[str, int]:
    """How many float linears run each CPU kernel of ``use_float_gemv``, e.g. ``{"fp32_avx2": 1}``."""
    count = sum(type(m) is nn.Linear and m.__dict__.get("kernel") == FLOAT_GEMV_KERNEL for m in model.modules())
    return {FLOAT_GEMV_KERNEL: count} if count else {}


def _int4pack_layout(packed: torch.Tensor, block_rows: int) -> torch.Tensor:
    """The (N, K) values of the kernel's packed weights, if they are laid out in blocks of ``block_rows`` rows:
    for each block and each k, byte j holds row j in its low nibble and row j + block_rows / 2 in its high one."""
    n, k = packed.shape[0], packed.shape[1] * 2
    blocks = packed.view(n // block_rows, k, block_rows // 2)
    q = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1)
    return q.permute(0, 2, 1).reshape(n, k).contiguous()  # one block: reshape gives a transposed view


class Int4PackedCpuLinear(KernelFormLinear):
    """An own int4 layer whose codes are held in the layout of PyTorch's CPU int4 kernel.

    Decode steps run the kernel (bf16 activations, bf16 scale and zero point per group); everything else (prompts,
    scoring) dequantizes the same codes with the own fp16 scales and mins and multiplies in fp32, as the
    portable path does.
    """

    kernel = "int4pack_mm"
    saved_format = Int4WeightLinear.__name__  # the checkpoint is an own-int4 one

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor,
        block_rows: int,
        group_size: int,
        in_features: int,
        bias: torch.Tensor | None = None,
    ):
        super().__init__(in_features, packed.shape[0], bias)
        self.group_size = group_size
        self.block_rows = block_rows
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        # The kernel's w = (q - 8) * scale + zero is the own q * scale + min with zero = min + 8 * scale.
        zeros = mins.float() + INT4PACK_OFFSET * scales.float()
        self.register_buffer(
            "scales_and_zeros",
            torch.stack([scales.float(), zeros], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous(),
        )

    @classmethod
    def from_own(cls, module: Int4WeightLinear) -> Int4PackedCpuLinear | None:
        """The kernel's form of an own int4 layer, or None where the kernel cannot hold it."""
        n, k = module.out_features, module.in_features
        if module.group_size not in INT4PACK_GROUP_SIZES or k % module.group_size or n % 16:
            return None
        q = unpack_int4(module.qweight, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        layout = next(
            (b for b in INT4PACK_BLOCK_ROWS if n % b == 0 and torch.equal(_int4pack_layout(packed, b), q)), None
        )
        if layout is None:  # a layout this module cannot read back (a partial row block, a scalar build)
            return None
        return cls(packed, module.scales, module.mins, layout, module.group_size, k, module.bias)

    def codes(self) -> torch.Tensor:
        return _int4pack_layout(self.packed, self.block_rows)

    def own_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"qweight": pack_int4(self.codes()), "scales": self.scales, "mins": self.mins}
        return tensors if self.bias is None else {**tensors, "bias": self.bias}

    def held_tensors(self) -> list[torch.Tensor]:
        """What this layer keeps in memory (the own ``qweight`` of ``state_dict`` is made when saving)."""
        return [*self.buffers(), *self.parameters()]

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4_codes(self.codes(), self.scales, self.mins, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not decode_step(x):
            return super().forward(x)
        y = int4pack_mm(x.reshape(-1, x.shape[-1]), self.packed, self.group_size, self.scales_and_zeros)
        return _as_linear(x, y, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size={self.group_size}"
            " (int4pack_mm)"
        )


def use_cpu_kernels(model: nn.Module, own_kernels: bool = True) -> int:
    """Run the own int8/int4 linears of a CPU model through CPU kernels.

    Where they run (and ``own_kernels``), the own AVX2 kernels become the layers' forward, reading their tensors
    in place; otherwise int8 layers get PyTorch's int8 kernel as forward and int4 layers are replaced by PyTorch's
    int4 kernel form where it holds them exactly. Returns how many layers now run a CPU kernel.
    """
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) not in (Int8WeightLinear, Int4WeightLinear) or module.qweight.device.type != "cpu":
            continue
        if module.kernel != WeightOnlyLinear.kernel:  # already on another path
            continue
        if own_kernels and avx2_fits(module):
            module.forward = types.MethodType(_avx2_forward, module)
            module.kernel = "int4_avx2" if isinstance(module, Int4WeightLinear) else "int8_avx2"
            count += 1
            continue
        if isinstance(module, Int8WeightLinear):
            module.forward = types.MethodType(_int8pack_forward, module)
            module.kernel = "int8pack_mm"
            count += 1
            continue
        converted = Int4PackedCpuLinear.from_own(module)
        if converted is not None:
            model.set_submodule(name, converted)
            count += 1
    return count
