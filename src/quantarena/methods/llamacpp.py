"""llama.cpp's GGUF file types that only llama.cpp can write (the k-quants and IQ4_XS), made by llama.cpp itself:
the float model is saved, converted by ``convert_hf_to_gguf.py`` to an f32 GGUF, optionally measured by
``llama-imatrix`` on calibration text, and quantized by ``llama-quantize``, which picks every tensor's type as
it does for local users (Q4_K_M keeps some layers in Q6_K and falls back to 32-weight blocks for rows that 256
does not divide). The file's tensors are then held, byte for byte, in the torch model and dequantized for each
matmul, so the same tasks score them; llama.cpp's own speed on them is ``benchmarks/llamacpp_runtime.py``'s."""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantarena import llamacpp
from quantarena.errors import ModelError
from quantarena.methods.base import (
    Method,
    MethodConfig,
    Requirements,
    deferred_to_calibrate,
    register,
    require_causal_lm,
    save_with_tokenizer,
)
from quantarena.methods.calibration import CalibrationOptions, CalibrationSource
from quantarena.methods.own import load_own, save_own
from quantarena.ownquant.formats import QuantizedEmbedding, TiedEmbedding
from quantarena.ownquant.ggml import TYPES, GgufWeightLinear

SPEED = (
    "llama.cpp's GGUF tensors dequantized in PyTorch for each matmul: quality and bytes are llama.cpp's, speed is "
    "not (benchmarks/llamacpp_runtime.py measures llama.cpp's)"
)
FILE_TYPES = ("q6_k", "q5_k_m", "q4_k_m", "iq4_xs")


class LlamaCppConfig(MethodConfig, CalibrationOptions):
    """``imatrix``: llama-quantize weighs each input column's rounding error by its mean squared activation,
    measured by llama-imatrix on the calibration text (llama.cpp's importance matrix)."""

    imatrix: bool = False

    def calibrates_on(self) -> str | None:
        return self.calibration_dataset if self.imatrix else None


class ImatrixConfig(LlamaCppConfig):
    imatrix: bool = True  # the i-quants are made for an importance matrix


def _gguf_names(model: nn.Module, architecture: str) -> dict[str, str]:
    """GGUF tensor name -> the module of this model that holds it (gguf's own name map, as the converter's)."""
    import gguf

    arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture), None)
    if arch is None:
        raise ModelError(f"llama.cpp wrote architecture {architecture!r}, which the gguf package does not know")
    name_map = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            gguf_name = name_map.get_name(f"{name}.weight", try_suffixes=(".weight",))
            if gguf_name:
                names[gguf_name] = name
    return names


def _row_order(weight: torch.Tensor, converted: np.ndarray, name: str) -> torch.Tensor:
    """``order`` with converted row j == our row ``order[j]``: the converter permutes some rows (llama's q and k
    heads, for its rotary layout) and must change nothing else, or the file's rows cannot be mapped back."""
    ours = weight.detach().float().cpu().numpy()
    if converted.shape != ours.shape:
        raise ModelError(f"llama.cpp's {name} has shape {converted.shape}, the model's weight {ours.shape}")
    if np.array_equal(ours, converted):
        return torch.arange(len(ours))
    rows: dict[bytes, list[int]] = defaultdict(list)
    for i, row in enumerate(ours):
        rows[row.tobytes()].append(i)
    order = []
    for row in converted:
        matches = rows.get(row.tobytes())
        if not matches:
            raise ModelError(
                f"llama.cpp's converter changed {name} beyond reordering its rows; it cannot be mapped back"
            )
        order.append(matches.pop())
    return torch.tensor(order)


def load_gguf_weights(model: nn.Module, quantized: Path, converted: Path) -> nn.Module:
    """Replace every layer whose tensor ``quantized`` holds in a non-f32 type by that tensor's bytes, its rows in
    the model's order (found against ``converted``, the f32 file it was quantized from). f32 tensors (norms) are
    the model's own values already."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(quantized)
    converted_rows = {t.name: t.data for t in GGUFReader(converted).tensors}
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    names = _gguf_names(model, architecture)
    tensor_names = {t.name for t in reader.tensors}
    tied_head = getattr(model.config, "tie_word_embeddings", False) and "output.weight" not in tensor_names
    for tensor in reader.tensors:
        if tensor.tensor_type == GGMLQuantizationType.F32:
            continue
        ggml_type = TYPES.get(tensor.tensor_type.name.lower())
        module_name = names.get(tensor.name)
        if ggml_type is None or module_name is None:
            what = f"type {tensor.tensor_type.name}" if ggml_type is None else "no layer of this model"
            raise ModelError(f"llama.cpp wrote {tensor.name} in {tensor.tensor_type.name}: {what} here reads it")
        module = model.get_submodule(module_name)
        order = _row_order(module.weight, np.asarray(converted_rows[tensor.name]), tensor.name)
        data = torch.from_numpy(np.array(tensor.data, dtype=np.uint8).reshape(len(order), -1))
        blocks = torch.empty_like(data)
        blocks[order] = data
        blocks = blocks.to(module.weight.device)
        k = module.weight.shape[1]
        if isinstance(module, nn.Embedding):
            table = GgufWeightLinear(blocks, k, ggml_type, None)
            if tied_head:  # llama.cpp's token_embd is the head too
                model.set_submodule(_head_name(model), table)
                model.set_submodule(module_name, TiedEmbedding(table, module.weight.dtype))
            else:
                model.set_submodule(module_name, QuantizedEmbedding(table, module.weight.dtype))
            model.config.tie_word_embeddings = False  # the modules share the bytes themselves; nothing to re-tie
        else:
            model.set_submodule(module_name, GgufWeightLinear(blocks, k, ggml_type, module.bias).train(module.training))
    return model


def _head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def importance_matrix(model: Path, text: str, config: LlamaCppConfig, tmp: Path) -> Path:
    """llama-imatrix over ``text`` (the calibration sequences decoded: llama.cpp tokenizes it again), in
    ``calibration_samples`` chunks of ``calibration_seq_len`` tokens."""
    (tmp / "calibration.txt").write_text(text)
    samples, seq_len = config.calibration_samples, config.calibration_seq_len
    return llamacpp.imatrix(model, tmp / "calibration.txt", tmp / "imatrix.gguf", seq_len, samples)


def calibration_text(config: LlamaCppConfig, calibration: CalibrationSource) -> str:
    return calibration.tokenizer.decode(calibration.sequences(config).flatten().tolist())


def _quantizer(file_type: str):
    def quantize(model: nn.Module, config: LlamaCppConfig, calibration: CalibrationSource) -> nn.Module:
        require_causal_lm(f"gguf-{file_type}", model)
        text = calibration_text(config, calibration) if config.imatrix else None  # bad data fails before the work
        with tempfile.TemporaryDirectory(prefix="quantarena-gguf-") as tmp_name:
            tmp = Path(tmp_name)
            hf = save_with_tokenizer(model, calibration.tokenizer, tmp / "hf")
            converted = llamacpp.convert(hf, tmp / "f32.gguf")
            importance = importance_matrix(converted, text, config, tmp) if text is not None else None
            quantized = llamacpp.quantize(converted, tmp / f"{file_type}.gguf", file_type.upper(), importance)
            return load_gguf_weights(model, quantized, converted)

    return quantize


for file_type in FILE_TYPES:
    register(
        Method(
            f"gguf-{file_type}",
            f"llama.cpp GGUF {file_type.upper()} made by llama.cpp's llama-quantize (its per-tensor types"
            + (", importance matrix by llama-imatrix" if file_type.startswith("iq") else "")
            + "), dequantized in PyTorch",
            deferred_to_calibrate,
            ImatrixConfig if file_type.startswith("iq") else LlamaCppConfig,
            requires=Requirements(
                packages=("gguf", "sentencepiece"), install="pip install 'quantarena[llamacpp]'", tool=llamacpp
            ),
            save=save_own,
            load=load_own,
            calibrate=_quantizer(file_type),
            caveat=SPEED,
        )
    )
