"""llmcompressor's calibrated methods, what vLLM and TGI serve: GPTQ and AWQ W4A16, and SmoothQuant + GPTQ W8A8
int8 (dynamic per-token int8 activations). llmcompressor runs in its own environment (``quantarena.llmc``: it pins
an older transformers) on the float model, saved, and calibration token rows; it writes a compressed-tensors
checkpoint, loaded here by transformers' own compressed-tensors support.

Bytes and speed on a CPU: the loaded model holds the packed tensors (int4 codes packed in int32, scales, zero
points, ``g_idx``) and those are its measured bytes; transformers has no packed-int4 CPU matmul, so
compressed-tensors decompresses every layer to float at the first forward, and the tasks run the float weights it
decompressed (the quantized values, exactly). vLLM's GPU kernels read the packed weights."""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt
from torch import nn

from quantarena import llmc
from quantarena.methods.base import (
    Method,
    Requirements,
    WeightQuantConfig,
    deferred_to_calibrate,
    load_pretrained,
    module_matches,
    register,
    require_causal_lm,
    save_pretrained,
    save_with_tokenizer,
)
from quantarena.methods.calibration import CalibrationOptions, CalibrationSource

CAVEAT = (
    "compressed-tensors on a CPU: bytes are the packed checkpoint's as loaded; transformers decompresses it to float "
    "at the first forward (the quantized values), so speed and run-time memory are float's"
)


class LlmCompressorConfig(WeightQuantConfig, CalibrationOptions):
    def calibrates_on(self) -> str | None:
        return self.calibration_dataset

    def job(self) -> dict[str, Any]:
        raise NotImplementedError


class W4A16Config(LlmCompressorConfig):
    """int4 weights in groups along the input (llmcompressor's W4A16 preset: 128; rows it does not divide are
    refused by llmcompressor, e.g. SmolLM2's 576 by 128: use 64 there)."""

    group_size: PositiveInt = 128
    symmetric: bool = True

    def weights(self) -> dict[str, Any]:
        return {"num_bits": 4, "type": "int", "symmetric": self.symmetric, "strategy": "group",
                "group_size": self.group_size}  # fmt: skip


class GptqConfig(W4A16Config):
    # static: GPTQ rounds columns by decreasing Hessian diagonal with group ranges fixed first (act-order that
    # keeps groups contiguous); none: in order.
    act_order: Literal["static", "none"] = "static"

    def job(self) -> dict[str, Any]:
        actorder = None if self.act_order == "none" else self.act_order
        return {"recipe": "gptq", "weights": self.weights() | {"actorder": actorder}, "activations": None}


class AwqConfig(W4A16Config):
    symmetric: bool = False  # llmcompressor's AWQ examples use W4A16_ASYM

    def job(self) -> dict[str, Any]:
        return {"recipe": "awq", "weights": self.weights(), "activations": None}


class SmoothQuantConfig(LlmCompressorConfig):
    """llmcompressor's W8A8 preset (int8 weights per output channel, int8 activations per token, dynamic) after
    SmoothQuant moves activation outliers into the weights."""

    smoothing_strength: float = Field(0.8, gt=0, lt=1)

    def job(self) -> dict[str, Any]:
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
        return {"recipe": "smoothquant-gptq", "weights": weights, "activations": activations,
                "smoothing_strength": self.smoothing_strength}  # fmt: skip


def _ignored(model: nn.Module, skip_modules: tuple[str, ...]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and module_matches(n, skip_modules)]


@contextlib.contextmanager
def _packed_zero_points_on_meta() -> Iterator[None]:
    """compressed-tensors (0.20) lays out an asymmetric packed layer on the meta device with its zero points
    unpacked, (rows, groups), while the checkpoint holds them as its own compress writes them: packed along the
    rows into int32; transformers then refuses the size mismatch (llm-compressor issue 1618). Inside this, the
    meta layout has the packed shape, so the checkpoint loads as written (and decompress unpacks it)."""
    from compressed_tensors.compressors.pack_quantized.base import PACK_ZP_STRATS, PackedQuantizationCompressor

    compress = PackedQuantizationCompressor.__dict__["compress"]

    def packed_on_meta(cls, state_dict, scheme):
        out = compress.__func__(cls, state_dict, scheme)
        zero_point, weights = out.get("weight_zero_point"), scheme.weights
        if (
            zero_point is not None
            and zero_point.device.type == "meta"
            and not weights.symmetric
            and weights.strategy in PACK_ZP_STRATS
        ):
            rows = math.ceil(zero_point.shape[0] * weights.num_bits / 32)
            out["weight_zero_point"] = torch.empty(rows, *zero_point.shape[1:], dtype=torch.int32, device="meta")
        return out

    PackedQuantizationCompressor.compress = classmethod(packed_on_meta)
    try:
        yield
    finally:
        PackedQuantizationCompressor.compress = compress


def load_compressed(model_dir: Path, device: str) -> nn.Module:
    with _packed_zero_points_on_meta():
        return load_pretrained(model_dir, device)


def _compress(name: str):
    def compress(model: nn.Module, config: LlmCompressorConfig, calibration: CalibrationSource) -> nn.Module:
        require_causal_lm(name, model)
        ids = calibration.sequences(config).cpu().numpy().astype(np.int64)  # bad data fails before the work
        device = next(model.parameters()).device
        with tempfile.TemporaryDirectory(prefix="quantarena-llmc-") as tmp_name:
            tmp = Path(tmp_name)
            np.save(tmp / "calibration.npy", ids)
            job = config.job() | {
                "model_dir": str(save_with_tokenizer(model, calibration.tokenizer, tmp / "model")),
                "calibration": str(tmp / "calibration.npy"),
                "ignore": _ignored(model, config.skip_modules),
                "out_dir": str(tmp / "compressed"),
            }
            llmc.oneshot(job, tmp / "job.json")
            return load_compressed(tmp / "compressed", device.type)

    return compress


for name, description, config_cls in [
    ("llmc-gptq-w4a16", "llmcompressor GPTQ, int4 weights in groups (act-order), compressed-tensors", GptqConfig),
    ("llmc-awq-w4a16", "llmcompressor AWQ, asymmetric int4 weights in groups, compressed-tensors", AwqConfig),
    (
        "llmc-smoothquant-w8a8",
        "llmcompressor SmoothQuant + GPTQ, int8 weights per channel and dynamic int8 activations per token",
        SmoothQuantConfig,
    ),
]:
    register(
        Method(
            name,
            description,
            deferred_to_calibrate,
            config_cls,
            requires=Requirements(
                devices=("cpu", "cuda"),
                packages=("compressed_tensors",),
                install="pip install 'quantarena[llmcompressor]'",
                tool=llmc,
            ),
            save=save_pretrained,
            load=load_compressed,
            calibrate=_compress(name),
            caveat=CAVEAT,
        )
    )
