"""Run one llmcompressor ``oneshot`` in llmcompressor's own environment (``quantarena.llmc``): this file is executed
by that environment's Python, imports nothing from quantarena, and reads one JSON job from its argument.

Job: ``model_dir`` (a Hugging Face folder with its tokenizer), ``calibration`` (an int64 ``.npy`` of token rows,
never pickled), ``recipe`` (``gptq``, ``awq`` or ``smoothquant-gptq``), ``weights`` (a compressed-tensors weight
quantization args dict), ``activations`` (the same for input activations, or null), ``ignore``,
``smoothing_strength``, ``out_dir``. Writes the compressed checkpoint (compressed-tensors format) to ``out_dir``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def recipe(job: dict) -> list:
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    scheme = {"targets": ["Linear"], "weights": job["weights"], "input_activations": job["activations"]}
    groups = {"config_groups": {"group_0": scheme}, "ignore": job["ignore"]}
    if job["recipe"] == "gptq":
        return [GPTQModifier(**groups)]
    if job["recipe"] == "awq":
        return [AWQModifier(**groups)]
    if job["recipe"] == "smoothquant-gptq":
        return [SmoothQuantModifier(smoothing_strength=job["smoothing_strength"]), GPTQModifier(**groups)]
    raise ValueError(f"unknown recipe {job['recipe']!r}")


def without_accelerator_pinning() -> None:
    """llmcompressor 0.14's AWQ pins its cached activations for faster host-to-GPU copies, which raises "Cannot
    access accelerator device" on a machine without one; with no device to copy to, pinning is skipped."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def main(job_file: str) -> None:
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = json.loads(Path(job_file).read_text())
    without_accelerator_pinning()
    torch.manual_seed(0)
    ids = np.load(job["calibration"], allow_pickle=False)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe(job),
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
    )
    model.save_pretrained(job["out_dir"], save_compressed=True)
    tokenizer.save_pretrained(job["out_dir"])


if __name__ == "__main__":
    main(sys.argv[1])
