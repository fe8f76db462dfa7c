"""Measurements that reports can trust: true stored bytes, disk size, peak memory per phase, synchronized timers,
memory bandwidth."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


def _tensor_storages(t: torch.Tensor) -> Iterator[tuple[tuple, int]]:
    """(identity, bytes) of every real storage behind ``t``.

    Tensor subclasses (quanto, torchao) are walked through ``__tensor_flatten__``, so what counts
    is the packed data and scales they hold, not the logical dtype they pretend to be.
    """
    if hasattr(t, "__tensor_flatten__") and type(t) is not nn.Parameter and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _tensor_storages(getattr(t, name))
        return
    if t.is_quantized:
        # Affine-quantized tensors (torch.ao): int data plus per-channel or per-tensor params.
        extra = 0
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            extra = sum(p.numel() * p.element_size() for p in (t.q_per_channel_scales(), t.q_per_channel_zero_points()))
        else:
            extra = 16
        yield (id(t), "quantized"), t.numel() * t.element_size() + extra
        return
    storage = t.untyped_storage()
    yield (storage.data_ptr(), storage.device.type, storage.nbytes()), storage.nbytes()


def _state_tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _state_tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _state_tensors(v)


def _quant_state_tensors(state) -> Iterator[torch.Tensor]:
    """bitsandbytes' QuantState: per-block absmax, the codebook, and for double quantization the
    absmax's own offset and (nested) QuantState."""
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            yield value
    if getattr(state, "state2", None) is not None:
        yield from _quant_state_tensors(state.state2)


def _held_tensors(module: nn.Module) -> list[torch.Tensor] | None:
    """Tensors a backend's module keeps outside its parameters and buffers, or None for other modules.

    For these modules the state_dict is not used: it holds serialization-only extras (bnb's packed
    JSON of the quant state, HQQ's encoded metadata) that are not in memory while the model runs.
    """
    if callable(getattr(module, "held_tensors", None)):  # a module that says what it holds (own CPU int4)
        return module.held_tensors()
    weight = getattr(module, "weight", None)
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes 4-bit (Params4bit)
        return list(_quant_state_tensors(weight.quant_state))
    if hasattr(weight, "SCB"):  # bitsandbytes int8: row scales on the weight, or in the matmul state once run
        state = getattr(module, "state", None)
        held = (weight.SCB, getattr(state, "SCB", None), getattr(state, "CB", None))
        return [t for t in held if isinstance(t, torch.Tensor)]
    if hasattr(module, "W_q") and isinstance(getattr(module, "meta", None), dict):
        # HQQ: group scales/zeros in a dict, and the bias as a plain attribute
        return [*_state_tensors(module.meta), *_state_tensors(module.bias)]
    return None


def _owner(key: str, owners: set[str]) -> bool:
    while "." in key:
        key = key.rpartition(".")[0]
        if key in owners:
            return True
    return False


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as actually stored, shared storage counted once.

    Goes through ``state_dict`` so modules that keep weights outside parameters (torch.ao's packed
    dynamic Linear exposes them there as quantized tensors) are counted too. Backend modules that
    hang tensors off their weight or a dict (bitsandbytes quant states and int8 row scales, HQQ's
    scales and zeros) are walked directly instead.
    """
    held = {name: tensors for name, module in model.named_modules() if (tensors := _held_tensors(module)) is not None}
    owners = set(held)
    # Module by module, skipping the walked ones: their state_dict may be made on demand (unpacked for saving).
    state: dict = {}
    for name, module in model.named_modules():
        if not _owner(f"{name}.", owners):
            module._save_to_state_dict(state, f"{name}.", keep_vars=True)
    tensors = [
        *model.parameters(),
        *model.buffers(),
        *(t for tensors in held.values() for t in tensors),
        *(t for v in state.values() for t in _state_tensors(v)),
    ]
    seen: dict[tuple, int] = {}
    for t in tensors:
        for key, nbytes in _tensor_storages(t):
            seen[key] = nbytes
    return sum(seen.values())


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started or since ``reset_peak_memory``.

    Linux's VmHWM first: ru_maxrss survives exec, so a spawned worker would start from the peak of the
    sweep process that started it, and it cannot be reset.
    """
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so the RSS a reset starts from is what is still in use."""
    libc = ctypes.util.find_library("c")
    if libc and sys.platform.startswith("linux"):
        ctypes.CDLL(libc).malloc_trim(0)


def reset_peak_memory(device: torch.device, collect: bool = False) -> bool:
    """Start a new phase: the peaks read after this are this phase's. ``collect`` first frees objects held only
    by reference cycles (a model just replaced: a full collection costs ~0.4 s with torch loaded). False where
    the RSS peak cannot be reset (outside Linux); its peak then still covers earlier phases."""
    if collect:
        gc.collect()
    _release_freed_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_memory(device: torch.device) -> dict[str, int]:
    """The peaks since the last ``reset_peak_memory``: RSS of this process, and on CUDA the allocator's peak."""
    peaks = {}
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        peaks["peak_rss_bytes"] = hwm
    if device.type == "cuda":
        peaks["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return peaks


def device_sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so a timer measures it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    def __init__(self) -> None:
        self.seconds = 0.0


@contextmanager
def timed(device: torch.device | None = None) -> Iterator[Stopwatch]:
    """Wall time of the block, with the device drained before and after so async work is counted."""
    device = device or torch.device("cpu")
    watch = Stopwatch()
    device_sync(device)
    start = time.perf_counter()
    yield watch
    device_sync(device)
    watch.seconds = time.perf_counter() - start


def repeated_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` synchronized calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        with timed(device) as watch:
            fn()
        samples.append(watch.seconds * 1000)
    return samples


BANDWIDTH_COPY_BYTES = 256 << 20  # well above any last-level cache


def measure_bandwidth(device: str = "cpu", nbytes: int = BANDWIDTH_COPY_BYTES, repeats: int = 5) -> float:
    """Copy bandwidth in bytes/s: bytes read + bytes written by the fastest of the repeats after a warm-up
    (the best copy is the attainable bandwidth; slower ones met other load)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times_s = []
    for _ in range(repeats + 1):
        with timed(torch.device(device)) as watch:
            dst.copy_(src)
        times_s.append(watch.seconds)
    return 2 * nbytes / min(times_s[1:])


def record_bandwidth(environment: dict, device: str) -> dict:
    """Add the measured bandwidth of ``device`` to a results environment (once per run: every roofline floor
    divides by it)."""
    environment["memory_bandwidth"] = {
        "device": device,
        "bytes_per_s": measure_bandwidth(device),
        "source": f"measured: fastest copy of a {BANDWIDTH_COPY_BYTES >> 20} MiB tensor, bytes read + written",
    }
    return environment
