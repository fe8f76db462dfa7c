"""bitsandbytes: LLM.int8 and 4-bit NF4/FP4, run through the library's own Linear modules.

The cell already holds the float model, so nn.Linear layers are swapped for ``bnb.nn.Linear8bitLt`` /
``Linear4bit`` directly (quantization happens when the new weight is moved to its device) instead
of reloading the checkpoint through ``BitsAndBytesConfig``. Saving writes the same checkpoint as
transformers' bnb integration (``save_pretrained`` plus a ``quantization_config``), so the result
reloads with plain ``from_pretrained`` anywhere.

bitsandbytes (0.50, the tested version) has a CPU backend of its own, so all three methods run on CPU and CUDA.

Why 4-bit reloads drifted, and why the AVX512-BF16 CPU path is switched off: on CPUs with AVX512-BF16
(not this 2-core AMD), ``Linear4bit.forward`` repacks its weight the first time it runs in eval mode
and stores ``absmax`` transposed, rounded to bf16 (``functional._convert_weight_packed_for_cpu``).
Saving calls the inverse, which (bitsandbytes 0.50.2) restores the blocks' layout and dtype only for
double-quantized weights: without double quantization the checkpoint keeps the transposed bf16
``absmax`` and the reloaded weights are off by ~2% (relative); with it, the absmax is re-quantized
from the rounded values, ~0.15%. Keeping every Linear4bit on the portable path
(``support_avx512bf16_for_cpu = False``, on quantize and on reload) makes the model that was measured
the model that is saved, bit for bit (tests/test_backends.py reproduces the drift and checks this).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import NonNegativeFloat
from torch import nn

from quantarena.methods.base import (
    BACKENDS_EXTRA,
    DTYPES,
    ComputeDtype,
    Method,
    Requirements,
    WeightQuantConfig,
    load_pretrained,
    register,
    replace_linears,
)

REQUIRES = Requirements(packages=("bitsandbytes",), install=BACKENDS_EXTRA)


class BnbInt8Config(WeightQuantConfig):
    # LLM.int8's outlier threshold: activation columns above it are multiplied in fp16. 0 disables it.
    threshold: NonNegativeFloat = 6.0


class Bnb4bitConfig(WeightQuantConfig):
    compute_dtype: ComputeDtype = "fp32"
    # Quantize the per-block absmax again (8-bit, blocks of 256): ~0.4 bits/weight less.
    double_quant: bool = False


def _int8_linear(linear: nn.Linear, config: BnbInt8Config) -> nn.Module:
    import bitsandbytes as bnb

    out = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=config.threshold,
        device="meta",
    )
    # Int8Params.to quantizes only a weight that is on the CPU, so one already on the GPU starts from there.
    out.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return out.to(linear.weight.device)  # quantizes the weight


def _4bit_linear(linear: nn.Linear, config: Bnb4bitConfig, quant_type: str) -> nn.Module:
    import bitsandbytes as bnb

    out = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=DTYPES[config.compute_dtype],
        compress_statistics=config.double_quant,
        quant_type=quant_type,
        device="meta",
    )
    out.weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, compress_statistics=config.double_quant, quant_type=quant_type
    )
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    out = out.to(linear.weight.device)  # quantizes the weight
    out.support_avx512bf16_for_cpu = False  # see the module docstring
    return out


def _hf_config(config: WeightQuantConfig, quant_type: str | None):
    """The transformers config that makes ``from_pretrained`` rebuild these modules from the checkpoint."""
    from transformers import BitsAndBytesConfig

    if quant_type is None:
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=config.threshold, llm_int8_skip_modules=list(config.skip_modules)
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=DTYPES[config.compute_dtype],
        bnb_4bit_use_double_quant=config.double_quant,
        llm_int8_skip_modules=list(config.skip_modules),
    )


def quantize_int8(model: nn.Module, config: BnbInt8Config) -> nn.Module:
    replace_linears(model, lambda lin: _int8_linear(lin, config), config.skip_modules)
    model.config.quantization_config = _hf_config(config, None)
    return model


def _quantize_4bit(quant_type: str):
    def apply(model: nn.Module, config: Bnb4bitConfig) -> nn.Module:
        replace_linears(model, lambda lin: _4bit_linear(lin, config, quant_type), config.skip_modules)
        model.config.quantization_config = _hf_config(config, quant_type)
        return model

    return apply


def load_bnb(model_dir: Path, device: str = "cpu") -> nn.Module:
    """``from_pretrained`` reads the quantization_config; 4-bit layers are kept off the AVX512-BF16 path."""
    import bitsandbytes as bnb

    model = load_pretrained(model_dir, device)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


# Measured on SmolLM2-135M, CPU, bitsandbytes 0.50: the same MMLU questions scored in forwards of 8 rows or of 1
# differ by up to 2.5 nats per answer (threshold 6.0) and 0.44 (threshold 0), which flips some answers; lm-eval's
# own runs at batch sizes 8 and 1 differ as much. The 4-bit methods dequantize their weights and are not affected.
INT8_CAVEAT = (
    "LLM.int8 quantizes activations over each forward's whole batch (outlier columns too), so its scores depend on "
    "which sequences share a forward: up to 2.5 nats per answer between batch sizes 8 and 1 on SmolLM2 (CPU); "
    "compare it with other harnesses at the same batching only"
)


def _register(name: str, description: str, apply, config_cls, caveat: str | None = None) -> None:
    register(Method(name, description, apply, config_cls, requires=REQUIRES, load=load_bnb, caveat=caveat))


_register(
    "bnb-int8",
    "bitsandbytes LLM.int8 (int8 weights, fp16 outlier columns above threshold)",
    quantize_int8,
    BnbInt8Config,
    INT8_CAVEAT,
)
_register("bnb-nf4", "bitsandbytes 4-bit NormalFloat, blocks of 64", _quantize_4bit("nf4"), Bnb4bitConfig)
_register("bnb-fp4", "bitsandbytes 4-bit float (e2m1), blocks of 64", _quantize_4bit("fp4"), Bnb4bitConfig)
