"""Generation latency as a task: prefill ms for a prompt of ``prompt_tokens`` real tokens, decode ms/token."""

from __future__ import annotations

from pydantic import NonNegativeInt, PositiveInt

from quantarena.data import corpus
from quantarena.errors import DataError
from quantarena.generation import generation_latency
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


@register
class Generation(Task):
    name = "generation"
    description = "greedy generation latency: prefill ms, decode ms/token (eos off), tokens/s, peak memory"
    model_kind = "causal-lm"
    Config = GenerationConfig
    quality_metric = "decode_tokens_per_s"
    higher_is_better = True
    latency_metric = "decode_ms_per_token"

    def load(self) -> str:
        cfg = self.config
        return corpus(cfg.dataset, self.data_dir, cfg.split, cfg.text_column, cfg.select)

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
