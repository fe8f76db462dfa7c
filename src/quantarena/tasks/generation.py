"""Generation latency of a causal LM as a task: prefill ms for a prompt of ``prompt_tokens`` real tokens, then
decode ms/token, measured apart.

Greedy decoding with the model's own KV cache (``DynamicCache``), as ``generate`` runs it eagerly; no
end-of-sequence check, so every requested token is generated. Each repeat times the prefill of the prompt
(one synchronized forward that fills the cache) and then ``new_tokens`` single-token decode steps; the
figures are medians over repeats, after untimed warm-up runs. This is the plain path a user gets;
benchmarks/decode_loop.py has a compiled static-cache loop for peak decode speed.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch
from pydantic import NonNegativeInt, PositiveInt

from quantarena.data import corpus
from quantarena.errors import ConfigError, DataError
from quantarena.measure import peak_rss_bytes, timed
from quantarena.models import ResolvedModel, accepts_logits_to_keep
from quantarena.tasks.base import EvalContext, Task, TaskConfig, TaskOutput, register


class GenerationConfig(TaskConfig):
    dataset: str = "wikitext2"
    split: str = "test"
    text_column: str = "text"
    prompt_tokens: PositiveInt = 128
    new_tokens: PositiveInt = 32
    # Latency is per sequence: batch 1 unless asked, whatever the sweep's batch size.
    batch_size: PositiveInt = 1
    repeats: PositiveInt = 5
    warmup: NonNegativeInt = 1


@dataclass
class GenerationTiming:
    prompt_tokens: int
    new_tokens: int
    batch_size: int
    prefill_ms: float  # median
    decode_ms_per_token: float  # median
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int  # CUDA: peak allocated during generation; CPU: the process's peak RSS
    prefill_ms_samples: list[float] = field(default_factory=list)
    decode_ms_per_token_samples: list[float] = field(default_factory=list)

    def metrics(self) -> dict:
        return asdict(self)


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].argmax(-1, keepdim=True)


def generation_latency(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    new_tokens: int,
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device,
) -> GenerationTiming:
    """Median prefill ms for ``prompt_ids`` (batch, prompt tokens) and decode ms per generated token."""
    if new_tokens < 1 or repeats < 1:
        raise ValueError("new_tokens and repeats must be at least 1")
    ids = prompt_ids.to(device)
    last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}

    def run() -> tuple[float, float]:
        with timed(device) as prefill:
            out = model(input_ids=ids, use_cache=True, **last_only)
            token = _greedy(out.logits)
        cache = out.past_key_values
        with timed(device) as decode:
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                token, cache = _greedy(out.logits), out.past_key_values
        return prefill.seconds * 1000, decode.seconds * 1000 / new_tokens

    with torch.inference_mode():
        for _ in range(warmup):
            run()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        samples = [run() for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    prefill_ms = statistics.median(s[0] for s in samples)
    decode_ms = statistics.median(s[1] for s in samples)
    batch, prompt_tokens = ids.shape
    return GenerationTiming(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        batch_size=batch,
        prefill_ms=prefill_ms,
        decode_ms_per_token=decode_ms,
        prefill_tokens_per_s=batch * prompt_tokens / prefill_ms * 1000,
        decode_tokens_per_s=batch / decode_ms * 1000,
        peak_memory_bytes=peak,
        prefill_ms_samples=[s[0] for s in samples],
        decode_ms_per_token_samples=[s[1] for s in samples],
    )


@register
class Generation(Task):
    name = "generation"
    description = "greedy generation latency: prefill ms, decode ms/token (eos off), tokens/s, peak memory"
    model_kind = "causal-lm"
    Config = GenerationConfig
    quality_metric = "decode_tokens_per_s"
    higher_is_better = True
    latency_metric = "decode_ms_per_token"
    exact_numerics = False  # it times decoding: the fast kernels are what it must time

    def load(self) -> str:
        cfg = self.config
        return corpus(cfg.dataset, self.data_dir, cfg.split, cfg.text_column, cfg.select)

    def check(self, data: str, model: ResolvedModel) -> None:
        total, context = self.config.prompt_tokens + self.config.new_tokens, model.context_length
        if context and total > context:
            raise ConfigError(
                f"task {self.name}: prompt_tokens + new_tokens = {total} exceed the {context} positions "
                f"{model.name} can represent"
            )

    def evaluate(self, ctx: EvalContext, data: str) -> TaskOutput:
        cfg = self.config
        # A prompt of real text: the corpus' first prompt_tokens tokens, repeated over the batch.
        ids = ctx.tokenizer(data[: cfg.prompt_tokens * 32], return_tensors="pt").input_ids[:, : cfg.prompt_tokens]
        if ids.shape[1] < cfg.prompt_tokens:
            have = ids.shape[1]
            raise DataError(f"dataset {cfg.dataset}: {have} tokens, fewer than prompt_tokens={cfg.prompt_tokens}")
        timing = generation_latency(
            ctx.model,
            ids.expand(cfg.batch_size, -1),
            cfg.new_tokens,
            repeats=cfg.repeats,
            warmup=cfg.warmup,
            device=ctx.device,
        )
        return TaskOutput(timing.metrics())
