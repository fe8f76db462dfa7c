"""Token perplexity with the transformers sliding-window recipe.

Windows of ``max_length`` tokens start every ``stride`` tokens; each window scores only the tokens
not scored by the previous one, conditioning on up to ``max_length - 1`` tokens before them
(https://huggingface.co/docs/transformers/perplexity). Unlike the recipe's loop, which weights each
window's mean loss by ``trg_len - 1``, the NLL here is summed per token, so the result is the exact
mean over the ``n_tokens`` scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator

from quantarena.data import corpus
from quantarena.measure import timed
from quantarena.models import accepts_logits_to_keep, context_length
from quantarena.tasks.base import EvalContext, Task, TaskConfig, TaskOutput, register


class WindowConfig(TaskConfig):
    """A text scored in sliding windows of ``max_length`` tokens every ``stride``, up to ``max_tokens``."""

    dataset: str = "wikitext2"
    split: str = "test"
    text_column: str = "text"
    max_length: PositiveInt = 1024
    stride: PositiveInt = 512
    # Two at least: the first token of a window has no context and is never scored.
    max_tokens: Annotated[int, Field(ge=2)] | None = None

    @model_validator(mode="after")
    def _stride_within_window(self):
        if self.stride > self.max_length:
            raise ValueError(f"stride ({self.stride}) must be <= max_length ({self.max_length})")
        return self


class PerplexityConfig(WindowConfig):
    pass


def window_length(config: WindowConfig, model: torch.nn.Module) -> tuple[int, dict[str, int]]:
    """The window used on ``model`` (the default cut to its context) and the metrics that record it."""
    context = context_length(model.config) or config.max_length
    length = min(config.max_length, context)
    recorded = {"max_length": length}
    if length < config.max_length:
        recorded["max_length_clamped_from"] = config.max_length
    return length, recorded


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    target_len: int  # the last target_len tokens of the window are scored


def sliding_windows(seq_len: int, max_length: int, stride: int) -> list[Window]:
    windows, prev_end = [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        windows.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == seq_len:
            break
    return windows


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor, target_len: int) -> tuple[float, int]:
    """Summed NLL and count of the scored tokens of one window.

    ``logits`` holds the last ``target_len + 1`` positions (or all of them); position ``i`` predicts
    token ``i + 1``, so the window's first token, having no context, is never a target.
    """
    n_targets = min(target_len, input_ids.shape[-1] - 1)
    predicting = logits[-n_targets - 1 : -1].float()
    targets = input_ids[-n_targets:]
    return F.cross_entropy(predicting, targets, reduction="sum").item(), n_targets


@register
class Perplexity(Task):
    name = "perplexity"
    description = "sliding-window token perplexity (WikiText-2 by default)"
    model_kind = "causal-lm"
    Config = PerplexityConfig
    quality_metric = "perplexity"
    higher_is_better = False
    latency_metric = "ms_per_token"

    def load(self) -> str:
        cfg = self.config
        return corpus(cfg.dataset, self.data_dir, cfg.split, cfg.text_column, cfg.select)

    def evaluate(self, ctx: EvalContext, data: str) -> TaskOutput:
        return sliding_window_perplexity(ctx, data, self.config)


def sliding_window_perplexity(ctx: EvalContext, text: str, cfg: PerplexityConfig) -> TaskOutput:
    """The recipe over ``text`` with ``cfg``'s max_length, stride and max_tokens; per-window sums kept."""
    ids = ctx.tokenizer(text, return_tensors="pt").input_ids[0][: cfg.max_tokens]
    max_length, recorded = window_length(cfg, ctx.model)
    windows = sliding_windows(len(ids), max_length, min(cfg.stride, max_length))
    keeps_logits = accepts_logits_to_keep(ctx.model)
    # Windows of equal shape batch together: all full windows after the first share one.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, w in enumerate(windows):
        groups.setdefault((w.end - w.begin, w.target_len), []).append(i)

    # Per-window sums, in window order, so variants can be compared window by window (paired bootstrap).
    window_nll_sum, window_tokens = [0.0] * len(windows), [0] * len(windows)
    done, n_forwards = 0, 0
    with torch.inference_mode(), timed(ctx.device) as total:
        for (length, target_len), group in groups.items():
            keep = {"logits_to_keep": target_len + 1} if keeps_logits and target_len < length else {}
            for start in range(0, len(group), ctx.batch_size):
                batch = group[start : start + ctx.batch_size]
                input_ids = torch.stack([ids[windows[i].begin : windows[i].end] for i in batch]).to(ctx.device)
                logits = ctx.model(input_ids=input_ids, **keep).logits
                for i, row_logits, row_ids in zip(batch, logits, input_ids, strict=True):
                    window_nll_sum[i], window_tokens[i] = window_nll(row_logits, row_ids, target_len)
                done, n_forwards = done + len(batch), n_forwards + 1
                ctx.progress(done, len(windows))

    nll_sum, n_tokens = sum(window_nll_sum), sum(window_tokens)
    nll_mean = nll_sum / n_tokens
    return TaskOutput(
        {
            "perplexity": math.exp(nll_mean),
            "nll_mean": nll_mean,
            "n_tokens": n_tokens,
            "n_windows": len(windows),
            # Each forward reads every weight once: the roofline's memory floor is per forward.
            "n_forwards": n_forwards,
            "inference_s": total.seconds,
            "tokens_per_s": n_tokens / total.seconds,
            "ms_per_token": total.seconds / n_tokens * 1000,
            **recorded,
        },
        {"window_nll_sum": window_nll_sum, "window_tokens": window_tokens},
    )
