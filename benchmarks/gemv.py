"""GEMV / small-M GEMM microbenchmark of the own int8/int4 Triton kernels against bf16 cuBLAS.

Reports achieved GB/s (weight bytes / median time; the activations are negligible at M = 1)
next to the device's copy bandwidth. Every kernel is first checked against a float64 reference
with a NaN-poisoned output. ``--sweep`` also times a grid of launch configs per shape, ``--m-sweep``
compares the ``dot`` and ``dequant`` paths over M to place the thresholds in ``triton_gemv``.

    PYTHONPATH=src python benchmarks/gemv.py --sweep --m-sweep --out benchmarks/results/gemv_h100.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from quantarena.measure import measure_bandwidth
from quantarena.ownquant import triton_kernels as triton_gemv
from quantarena.ownquant.formats import (
    dequantize_int4_groupwise,
    dequantize_int8_per_channel,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)
from quantarena.ownquant.triton_kernels import INT4_GEMV_CONFIGS, INT8_GEMV_CONFIGS, int4_linear, int8_linear

# (N, K) of the Llama 8B and 1B projections: q/o, k/v, gate/up, down.
SHAPES = {
    "8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "1b": [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)],
}
GROUP = 64  # own-int4's default


def timed(fn) -> float:
    # do_bench clears the L2 between repetitions, so each call streams its weight from HBM.
    return do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3  # us


class Weights:
    def __init__(self, n: int, k: int, seed: int = 0):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        self.n, self.k = n, k
        self.bf16 = w.to(torch.bfloat16)
        self.q8, self.s8 = quantize_int8_per_channel(w)
        self.q4, self.s4, self.m4 = quantize_int4_groupwise(w, GROUP)
        self.ref8 = dequantize_int8_per_channel(self.q8, self.s8).double()
        self.ref4 = dequantize_int4_groupwise(self.q4, self.s4, self.m4, k, GROUP).double()

    def nbytes(self, fmt: str) -> int:
        tensors = {"bf16": [self.bf16], "int8": [self.q8, self.s8], "int4": [self.q4, self.s4, self.m4]}[fmt]
        return sum(t.numel() * t.element_size() for t in tensors)

    def fn(self, fmt: str, x: torch.Tensor, out: torch.Tensor | None = None, **kw):
        if fmt == "int8":
            return lambda: int8_linear(x, self.q8, self.s8, out=out, **kw)
        if fmt == "int4":
            return lambda: int4_linear(x, self.q4, self.s4, self.m4, GROUP, out=out, **kw)
        return lambda: F.linear(x, self.bf16)


def check(w: Weights, fmt: str, m: int, **kw) -> float:
    x = torch.randn(m, w.k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ (w.ref8 if fmt == "int8" else w.ref4).T
    out = torch.full((m, w.n), float("nan"), device="cuda", dtype=torch.bfloat16)
    w.fn(fmt, x, out, **kw)()
    assert not out.isnan().any(), f"{fmt} m={m} {kw}: unwritten outputs"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"{fmt} m={m} {kw}: relative error {err:.2e}"
    return err


GEMV_SWEEP = {"int8": INT8_GEMV_CONFIGS, "int4": INT4_GEMV_CONFIGS}
# Skinny tiles for memory-bound small M, square-ish ones for prefill.
DOT_SWEEP_SMALL = [
    {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4, "num_stages": ns}
    for bn, bk, ns in itertools.product([16, 32, 64], [128, 256], [3, 4])
]
DOT_SWEEP_LARGE = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": 3}
    for bm, bn, bk, nw in itertools.product([64, 128], [64, 128], [64, 128], [4, 8])
]


def gemv_table(shapes, sweep: bool, n_sweep: int) -> list[dict]:
    rows = []
    for i, (n, k) in enumerate(shapes):
        sweep_this = sweep and i < n_sweep
        w = Weights(n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        row = {"N": n, "K": k}
        for fmt in ("bf16", "int8", "int4"):
            if fmt != "bf16":
                check(w, fmt, 1)
            us = timed(w.fn(fmt, x))
            row[fmt] = {"us": us, "GBps": w.nbytes(fmt) / us / 1e3, "bytes": w.nbytes(fmt)}
            tuned = [cfg for key, cfg in triton_gemv._tuned.items() if key[:3] == (fmt, n, k)]
            if tuned:
                row[fmt]["config"] = tuned[0]
            if sweep_this and fmt != "bf16":
                results = []
                for cfg in GEMV_SWEEP[fmt]:
                    check(w, fmt, 1, config=cfg, path="gemv")
                    results.append((timed(w.fn(fmt, x, config=cfg, path="gemv")), cfg))
                results.sort(key=lambda r: r[0])
                row[fmt]["best"] = [{"us": us, "GBps": w.nbytes(fmt) / us / 1e3, **c} for us, c in results[:5]]
                # M = 1 through the tensor-core kernel padded to 16 rows, for comparison.
                dot_us = timed(w.fn(fmt, x, path="dot"))
                row[fmt]["dot_us"] = dot_us
        rows.append(row)
        print(_gemv_line(row), flush=True)
    return rows


def _gemv_line(row: dict) -> str:
    cells = [f"{row['N']}x{row['K']}"]
    for fmt in ("bf16", "int8", "int4"):
        r = row[fmt]
        cell = f"{r['us']:.1f} us, {r['GBps']:.0f} GB/s"
        if "config" in r:
            cell += " " + "/".join(str(v) for k, v in r["config"].items() if k != "PREFETCH")
        if "best" in r:
            b = r["best"][0]
            cfg = {k: v for k, v in b.items() if k not in ("us", "GBps")}
            cell += f" (best {b['us']:.1f} us {b['GBps']:.0f} GB/s {cfg}; dot {r['dot_us']:.1f} us)"
        cells.append(cell)
    return "| " + " | ".join(cells) + " |"


def m_sweep(shapes, ms, sweep_dot: bool) -> list[dict]:
    rows = []
    for n, k in shapes:
        w = Weights(n, k)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"N": n, "K": k, "M": m, "bf16_us": timed(w.fn("bf16", x))}
            for fmt in ("int8", "int4"):
                for path in ("dot", "dequant"):
                    check(w, fmt, m, path=path)
                    row[f"{fmt}_{path}_us"] = timed(w.fn(fmt, x, path=path))
                if sweep_dot:
                    best = None
                    for cfg in DOT_SWEEP_SMALL if m <= 16 else DOT_SWEEP_LARGE:
                        try:
                            check(w, fmt, m, path="dot", config=cfg)
                            us = timed(w.fn(fmt, x, path="dot", config=cfg))
                        except Exception as e:  # out of shared memory for the largest tiles
                            print(f"skip {cfg}: {type(e).__name__}")
                            continue
                        if best is None or us < best[0]:
                            best = (us, cfg)
                    row[f"{fmt}_dot_best"] = {"us": best[0], **best[1]}
            rows.append(row)
            print(_m_line(row), flush=True)
    return rows


def _m_line(r: dict) -> str:
    cells = [f"{r['N']}x{r['K']}", str(r["M"]), f"{r['bf16_us']:.1f}"]
    for fmt in ("int8", "int4"):
        cells += [f"{r[f'{fmt}_dot_us']:.1f}", f"{r[f'{fmt}_dequant_us']:.1f}"]
        if f"{fmt}_dot_best" in r:
            b = r[f"{fmt}_dot_best"]
            cells[-2] += f" (best {b['us']:.1f}: {b['BLOCK_M']}/{b['BLOCK_N']}/{b['BLOCK_K']}"
            cells[-2] += f" w{b['num_warps']} s{b['num_stages']})"
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["8b", "1b"], choices=sorted(SHAPES))
    p.add_argument("--sweep", action="store_true", help="sweep the M = 1 launch configs")
    p.add_argument("--m-sweep", action="store_true", help="dot vs dequant+cuBLAS over M")
    p.add_argument("--sweep-dot", action="store_true", help="with --m-sweep, also sweep dot configs")
    p.add_argument("--ms", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gemv_h100.json"))
    args = p.parse_args()

    torch.manual_seed(0)
    shapes = [s for name in args.shapes for s in SHAPES[name]]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    result["copy_GBps"] = measure_bandwidth("cuda", nbytes=2 << 30) / 1e9
    print(f"device {result['device']}, copy bandwidth {result['copy_GBps']:.0f} GB/s (read + write)\n")
    print("| N x K | bf16 cuBLAS | own int8 | own int4 g64 |\n| --- | --- | --- | --- |")
    # The sweep runs on the 8B shapes only (the 1B ones are the same kernels on smaller grids).
    result["gemv_m1"] = gemv_table(shapes, args.sweep and "8b" in args.shapes, len(SHAPES["8b"]))
    if args.m_sweep:
        print("\nmicroseconds per call, by M")
        print("| N x K | M | bf16 cuBLAS | int8 dot | int8 dequant | int4 dot | int4 dequant |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        result["m_sweep"] = m_sweep(shapes[:1] + shapes[2:3], args.ms, args.sweep_dot)
    for path in [args.out] + ([Path(os.environ["OUT"]) / args.out.name] if os.environ.get("OUT") else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
