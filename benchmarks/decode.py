"""Decode ms/token at batch 1 on Llama-shaped random models: bf16, the own int8/int4 formats, and peers.

Every quantized variant is made by the arena's own method (``quantarena.methods.METHODS``) with its
defaults (own-int4 and torchao int4: groups of 64; bnb NF4: blocks of 64, bf16 compute; quanto int4:
groups of 128; heads stay bf16), so the own rows take exactly the dispatch a sweep takes: Triton
kernels on CUDA. Two ways to decode:

* ``hf-eager``: plain ``model.generate`` (eager, dynamic cache), as a user runs it;
* ``fast``: ``benchmarks/decode_loop.py`` (static KV cache, one compiled CUDA-graph step per token).

Next to each: the bandwidth floor, i.e. the bytes one decode step must read (every stored weight
except the input embedding table, of which one row is read) over the measured device copy bandwidth,
and floor / measured. Each row runs in its own try/except (a failing peer records its error, the
others go on) and the JSON is rewritten after every row, so a timeout keeps the rows done so far.

    PYTHONPATH=src python benchmarks/decode.py --shapes 1b 8b --out benchmarks/results/decode_h100.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import traceback
from pathlib import Path

import torch
from decode_loop import decode_ms_per_token, hf_generate_ms_per_token
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantarena.measure import measure_bandwidth, weight_bytes
from quantarena.methods import METHODS
from quantarena.ownquant import kernel_summary

SHAPES = {
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192},
    "8b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336},
    "tiny": {"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512},  # a smoke test on CPU
}
# variant -> (arena method or None for bf16, config overrides, decode loop)
VARIANTS: dict[str, tuple[str | None, dict, str]] = {
    "bf16-fast": (None, {}, "fast"),
    "own-int4-fast": ("own-int4", {}, "fast"),
    "own-int8-fast": ("own-int8", {}, "fast"),
    "bf16-hf-eager": (None, {}, "hf-eager"),
    "own-int4-hf-eager": ("own-int4", {}, "hf-eager"),
    "torchao-int4-wo-hf-eager": ("torchao-int4-wo", {}, "hf-eager"),
    "torchao-int8-wo-hf-eager": ("torchao-int8-wo", {}, "hf-eager"),
    "quanto-int4-hf-eager": ("quanto-int4", {}, "hf-eager"),
    "bnb-nf4-hf-eager": ("bnb-nf4", {"compute_dtype": "bf16"}, "hf-eager"),
    "bnb-int8-hf-eager": ("bnb-int8", {}, "hf-eager"),
    "torchao-int4-wo-fast": ("torchao-int4-wo", {}, "fast"),
    "torchao-int8-wo-fast": ("torchao-int8-wo", {}, "fast"),
}
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "own-int4-hf-eager"]
# bitsandbytes' Int8Params quantizes only on a move from the CPU: a weight already on the GPU stays float.
QUANTIZE_FROM_CPU = {"bnb-int8"}


def build(shape: str, device: str, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        **SHAPES[shape],
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=4096,
        rope_theta=500000.0,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # created in bf16 on the device: no fp32 copy, no CPU init
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def quantize(model: LlamaForCausalLM, method_name: str | None, overrides: dict) -> LlamaForCausalLM:
    if method_name is None:
        return model
    method = METHODS.get(method_name)
    layers, device = model.model.layers, model.device
    if method_name in QUANTIZE_FROM_CPU:
        layers.to("cpu")
    with torch.no_grad():
        model = method.apply(model, method.config_cls(**overrides))
    layers.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def read_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads: all stored weights but the input embedding table (one row of it is read)."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is getattr(model.get_output_embeddings(), "weight", None)
    return weight_bytes(model) - (0 if tied else embedding.numel() * embedding.element_size())


def run_variant(shape: str, variant: str, args: argparse.Namespace, bandwidth: float) -> dict:
    method_name, overrides, loop = VARIANTS[variant]
    t0 = time.perf_counter()
    model = quantize(build(shape, args.device), method_name, overrides)
    setup_s = time.perf_counter() - t0
    if loop == "hf-eager":
        timing = hf_generate_ms_per_token(model, args.prompt_len, args.hf_new_tokens, repeats=args.hf_repeats)
    else:
        timing = decode_ms_per_token(
            model, args.prompt_len, args.new_tokens, repeats=args.repeats, profile_steps=args.profile_steps
        )
    nbytes = read_bytes(model)
    floor_ms = nbytes / bandwidth * 1e3
    return {
        "shape": shape,
        "variant": variant,
        "method": method_name or "bf16",
        "loop": loop,
        "decode_ms_per_token": timing.ms_per_token,
        "read_GB": nbytes / 1e9,
        "floor_ms": floor_ms,
        "floor_over_measured": floor_ms / timing.ms_per_token,
        "linear_kernels": kernel_summary(model),
        "setup_s": setup_s,
        **{f"timing_{k}": v for k, v in timing.to_dict().items() if k != "ms_per_token"},
    }


def release() -> None:
    torch._dynamo.reset()  # drops the compiled step and its CUDA-graph pool with the model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | variant | ms/token | read GB | floor ms | floor/measured | own linears on |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | failed: {r['error'][:80]} | | | | |")
            continue
        kernels = ", ".join(f"{k} {n}" for k, n in r["linear_kernels"].items()) or "-"
        lines.append(
            f"| {r['shape']} | {r['variant']} | {r['decode_ms_per_token']:.2f} | {r['read_GB']:.2f} | "
            f"{r['floor_ms']:.2f} | {r['floor_over_measured']:.0%} | {kernels} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hf-new-tokens", type=int, default=32)
    p.add_argument("--hf-repeats", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=0, help="also record each fast variant's top kernels")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_h100.json"))
    args = p.parse_args()

    outs = [args.out] + ([Path(os.environ["OUT"]) / args.out.name] if os.environ.get("OUT") else [])
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "copy_GBps": measure_bandwidth(args.device, nbytes=2 << 30 if args.device == "cuda" else 256 << 20) / 1e9,
        "rows": [],
    }
    print(f"device {result['device']}, copy bandwidth {result['copy_GBps']:.0f} GB/s", flush=True)
    for shape in args.shapes:
        for variant in args.variants:
            try:
                row = run_variant(shape, variant, args, result["copy_GBps"] * 1e9)
                print(
                    f"{shape} {variant}: {row['decode_ms_per_token']:.3f} ms/token (floor {row['floor_ms']:.3f}, "
                    f"setup {row['setup_s']:.0f} s, warmup {row['timing_warmup_s']:.0f} s)",
                    flush=True,
                )
            except Exception as e:
                traceback.print_exc()
                row = {"shape": shape, "variant": variant, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
            release()
            result["rows"].append(row)
            for path in outs:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=1))
    print()
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
