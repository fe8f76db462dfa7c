"""Decode timing for Hugging Face causal LMs: HF ``generate`` as is, and a gpt-fast style loop.

The fast loop prefills once into a ``StaticCache`` and then runs one compiled decode step per token
(``torch.compile(mode="reduce-overhead")``: inductor fuses the small ops and a CUDA graph replays
the whole step), greedy, with no end-of-sequence check, so nothing syncs the host per token. The
same loop times the bf16 model and the quantized ones, so the comparison is only about the weights.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from quantarena.measure import device_sync


@dataclass
class DecodeTiming:
    ms_per_token: float  # median over repeats
    samples_ms: list[float] = field(default_factory=list)
    warmup_s: float = 0.0  # first runs, compilation and graph capture included
    prompt_len: int = 0
    new_tokens: int = 0
    batch_size: int = 1
    kernels: list[dict] = field(default_factory=list)  # with profile_steps: device time per token

    def to_dict(self) -> dict:
        return asdict(self)


def _prompt(model: nn.Module, batch_size: int, prompt_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=gen)
    return ids.to(model.device)


@torch.inference_mode()
def hf_generate_ms_per_token(
    model: nn.Module,
    prompt_len: int = 128,
    new_tokens: int = 64,
    *,
    batch_size: int = 1,
    repeats: int = 3,
    seed: int = 0,
    **generate_kwargs,
) -> DecodeTiming:
    """Decode ms/token of plain ``model.generate`` (eager, its default cache), eos disabled.

    Prefill is removed by difference: (t(prompt + n tokens) - t(prompt + 1 token)) / (n - 1).
    """
    ids = _prompt(model, batch_size, prompt_len, seed)
    kwargs = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, **generate_kwargs}

    def run(n: int) -> float:
        device_sync(model.device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        device_sync(model.device)
        assert out.shape[1] == prompt_len + n, "generation stopped early"
        return time.perf_counter() - start

    t0 = time.perf_counter()
    run(2)
    warmup_s = time.perf_counter() - t0
    samples = [(run(new_tokens) - run(1)) * 1e3 / (new_tokens - 1) for _ in range(repeats)]
    return DecodeTiming(statistics.median(samples), samples, warmup_s, prompt_len, new_tokens, batch_size)


def _static_cache(model: nn.Module, max_len: int, batch_size: int):
    from transformers import StaticCache

    # transformers >= 5 infers batch, device and dtype lazily and ignores the older keywords.
    return StaticCache(
        config=model.config,
        max_cache_len=max_len,
        max_batch_size=batch_size,
        device=model.device,
        dtype=model.dtype,
    )


class FastDecoder:
    """Greedy decoding with a static KV cache and a compiled (CUDA-graphed) one-token step."""

    def __init__(self, model: nn.Module, max_len: int, batch_size: int = 1, compile: bool = True):
        self.model = model
        self.max_len = max_len
        self.cache = _static_cache(model, max_len, batch_size)
        # transformers < 5 needs cache_position to know where to write; >= 5 tracks it in the cache.
        self._cache_position = "cache_position" in inspect.signature(model.forward).parameters
        step = self._step
        if compile:
            step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        self._compiled_step = step

    def _kwargs(self, positions: torch.Tensor) -> dict:
        kwargs = {"position_ids": positions, "past_key_values": self.cache, "use_cache": True}
        if self._cache_position:
            kwargs["cache_position"] = positions[0]
        return kwargs

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tokens, **self._kwargs(positions)).logits
        return logits[:, -1].argmax(dim=-1, keepdim=True)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return self._step(ids, positions)  # eager: prefill shapes vary, the decode step does not

    @torch.inference_mode()
    def warm_eager(self, ids: torch.Tensor) -> None:
        """One eager prefill and decode step: kernels tune their launch configs here, outside any
        CUDA-graph capture."""
        first = self.prefill(ids)
        self._step(first, torch.full_like(first, ids.shape[1]))

    @torch.inference_mode()
    def decode(self, token: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """``n`` greedy tokens after ``token``, which sits at position ``start``."""
        out = []
        positions = torch.full_like(token, start)
        for _ in range(n):
            # Cloned: a CUDA-graph output is overwritten by the next replay.
            token = self._compiled_step(token, positions).clone()
            positions = positions + 1
            out.append(token)
        return torch.cat(out, dim=1)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        if ids.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"prompt {ids.shape[1]} + {new_tokens} tokens exceed the cache of {self.max_len}")
        first = self.prefill(ids)
        rest = self.decode(first, ids.shape[1], new_tokens - 1)
        return torch.cat([ids, first, rest], dim=1)


def decode_ms_per_token(
    model: nn.Module,
    prompt_len: int = 128,
    new_tokens: int = 128,
    *,
    batch_size: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    compile: bool = True,
    seed: int = 0,
    profile_steps: int = 0,
) -> DecodeTiming:
    """Median decode ms/token of the fast loop: ``new_tokens`` steps after an untimed prefill.

    With ``profile_steps``, also the device time per token of each kernel over that many steps.
    """
    decoder = FastDecoder(model, prompt_len + new_tokens + 1, batch_size, compile=compile)
    ids = _prompt(model, batch_size, prompt_len, seed)
    device = ids.device
    use_events = device.type == "cuda"

    def run() -> float:
        first = decoder.prefill(ids)
        device_sync(device)
        if use_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            decoder.decode(first, prompt_len, new_tokens)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / new_tokens
        t0 = time.perf_counter()
        decoder.decode(first, prompt_len, new_tokens)
        return (time.perf_counter() - t0) * 1e3 / new_tokens

    t0 = time.perf_counter()
    decoder.warm_eager(ids)
    for _ in range(warmup):
        run()
    warmup_s = time.perf_counter() - t0
    samples = [run() for _ in range(repeats)]
    timing = DecodeTiming(statistics.median(samples), samples, warmup_s, prompt_len, new_tokens, batch_size)
    if profile_steps:
        timing.kernels = _profile(decoder, ids, prompt_len, profile_steps)
    return timing


def _profile(decoder: FastDecoder, ids: torch.Tensor, start: int, steps: int) -> list[dict]:
    first = decoder.prefill(ids)
    device_sync(ids.device)
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        decoder.decode(first, start, steps)
        device_sync(ids.device)
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if us > 0:
            rows.append({"kernel": event.key[:100], "us_per_token": us / steps, "calls_per_token": event.count / steps})
    return sorted(rows, key=lambda r: -r["us_per_token"])
