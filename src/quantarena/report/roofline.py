"""The memory-bandwidth floor under every latency figure, and how far each method sits above it.

A forward pass reads every weight at least once, so no forward can be faster than
``weight_bytes / bandwidth``. A latency near that floor is memory-bound (smaller weights pay off
directly); one far above it spends its time elsewhere: dequantizing weights before each matmul,
launching many small kernels, converting a dtype the hardware has no fast kernel for, or computing
many tokens per weight read (then the figure is compute-bound and the floor is not what binds).
"""

from __future__ import annotations

from dataclasses import dataclass

from quantarena.results import CellResult

# Above this many tokens per weight read, matmul throughput, not memory traffic, sets the pace.
COMPUTE_BOUND_TOKENS = 64
FAR_ABOVE_FLOOR = 0.25  # efficiency under which the report explains where the time goes


def bandwidth_of(environment: dict, device: str) -> float | None:
    recorded = environment.get("memory_bandwidth") or {}
    return recorded.get("bytes_per_s") if recorded.get("device", device) == device else None


@dataclass(frozen=True)
class Roofline:
    latency_metric: str
    measured_ms: float
    floor_ms: float  # weight reads per latency unit x weight_bytes / bandwidth
    tokens_per_weight_read: float | None  # tokens computed for each full read of the weights, where known

    @property
    def efficiency(self) -> float:
        return self.floor_ms / self.measured_ms

    @property
    def compute_bound(self) -> bool:
        return (self.tokens_per_weight_read or 0) > COMPUTE_BOUND_TOKENS


def _weight_reads_per_unit(cell: CellResult) -> tuple[float, float | None] | None:
    """(full weight reads per latency unit, tokens per read) for the latency metrics known here."""
    m = cell.metrics
    if cell.latency_metric == "latency_ms_median":  # one batch-1 forward per example, of a sentence's tokens
        return 1.0, None
    if cell.latency_metric == "ms_per_token" and m.get("n_forwards"):  # windows scored in batches
        reads_per_token = m["n_forwards"] / m["n_tokens"]
        return reads_per_token, 1 / reads_per_token
    if cell.latency_metric and cell.latency_metric.startswith("decode_ms"):  # batch-1 decode: a read per token
        return 1.0, 1.0
    if cell.latency_metric == "ms_per_example" and m.get("n_forwards") and m.get("n_examples"):  # scored in batches
        tokens = m.get("n_tokens_forwarded")
        return m["n_forwards"] / m["n_examples"], tokens / m["n_forwards"] if tokens else None
    return None


def roofline(cell: CellResult, bandwidth_bytes_per_s: float | None) -> Roofline | None:
    """None when the bandwidth, the weight bytes or the forward count behind the figure is unknown."""
    if cell.status != "ok" or not bandwidth_bytes_per_s or not cell.latency_metric:
        return None
    reads = _weight_reads_per_unit(cell)
    measured_ms, weight_bytes = cell.metrics.get(cell.latency_metric), cell.measurements.get("weight_bytes")
    if reads is None or not measured_ms or not weight_bytes:
        return None
    reads_per_unit, tokens_per_read = reads
    floor_ms = reads_per_unit * weight_bytes / bandwidth_bytes_per_s * 1000
    return Roofline(cell.latency_metric, measured_ms, floor_ms, tokens_per_read)


def fewer_bytes_yet_slower(cell: CellResult, line: Roofline, baseline: CellResult | None) -> str:
    """'It reads 2.4× fewer bytes than fp32 yet takes 1.3× as long', or '' when it does not."""
    if baseline is None or baseline is cell:
        return ""
    byte_ratio = baseline.measurements["weight_bytes"] / cell.measurements["weight_bytes"]
    time_ratio = line.measured_ms / baseline.metrics[cell.latency_metric]
    if byte_ratio > 1.05 and time_ratio > 1.05:
        return f"it reads {byte_ratio:.1f}× fewer bytes than {baseline.method} yet takes {time_ratio:.1f}× as long"
    return ""


WHY_FEWER_BYTES_CAN_BE_SLOWER = (
    "Why can a method that reads fewer bytes be slower (why is INT8 slower than FP16)? Reading the weights is "
    "not where its time goes: weights are unpacked or dequantized to floats before each matmul, the extra steps "
    "launch more kernels, and some dtypes have no fast kernel on this hardware (bf16 on a CPU without "
    "AVX512-BF16 or AMX is converted in software). Fewer bytes pay off only when the kernel consumes them "
    "without unpacking and the work is memory-bound (batch-1 decoding)."
)


def explain(cell: CellResult, line: Roofline, baseline: CellResult | None) -> str:
    """Where the time goes, in the terms of the roofline: a category word, then why."""
    slower = fewer_bytes_yet_slower(cell, line, baseline)
    if line.compute_bound:
        text = (
            f"Compute-bound: about {line.tokens_per_weight_read:,.0f} tokens per read of the weights, so weight "
            "traffic is not what limits this figure"
        )
        return f"{text}; {slower} (slower matmul kernels)." if slower else f"{text}."
    if slower:
        return f"Overhead-bound: {slower}."
    if line.efficiency > 1:
        weight_mb = cell.measurements["weight_bytes"] / 1e6
        return f"Cache-resident: faster than the DRAM floor; the weights ({weight_mb:.3g} MB) fit in cache."
    if line.efficiency < FAR_ABOVE_FLOOR:
        return (
            f"Overhead-bound: {1 / line.efficiency:.0f}× its floor; per-layer launches, Python and small matmuls "
            "cost more than reading the weights."
        )
    return "Memory-bound: near the floor, so smaller weights translate into speed."
