"""What the log-likelihood tasks (multiple choice, LAMBADA, WikiText documents) share: config, timed scoring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import PositiveInt

from quantarena.measure import timed
from quantarena.tasks import loglik
from quantarena.tasks.base import EvalContext, TaskConfig


class LogLikelihoodConfig(TaskConfig):
    dataset: str
    split: str = "test"
    # Positions the model sees per request; default as lm-eval: the model config's context length.
    max_length: PositiveInt | None = None


@dataclass
class Timed:
    scored: loglik.Scored
    seconds: float

    def metrics(self, n_examples: int) -> dict[str, Any]:
        return {
            "n_examples": n_examples,
            "inference_s": self.seconds,
            "examples_per_s": n_examples / self.seconds,
            "ms_per_example": self.seconds / n_examples * 1000,
            "n_forwards": self.scored.n_forwards,
            "n_tokens_forwarded": self.scored.n_tokens_forwarded,
            "n_padding_tokens": self.scored.n_padding_tokens,
            "n_scored_tokens": self.scored.n_scored_tokens,
        }


def max_length(ctx: EvalContext, config: LogLikelihoodConfig) -> int:
    return config.max_length or loglik.model_max_length(ctx.model.config, ctx.tokenizer)


def encode(ctx: EvalContext, pairs: list[tuple[str, str]]) -> list[loglik.Request]:
    prefix = loglik.prefix_token_id(ctx.tokenizer)
    return [loglik.encode_pair(ctx.tokenizer, context, continuation, prefix) for context, continuation in pairs]


def score(ctx: EvalContext, requests: list[loglik.Request], config: LogLikelihoodConfig) -> Timed:
    """Scoring time only: tokenization happens before, as lm-eval's does."""
    with timed(ctx.device) as watch:
        scored = loglik.score(
            ctx.model,
            requests,
            batch_size=ctx.batch_size,
            max_length=max_length(ctx, config),
            device=ctx.device,
            progress=ctx.progress,
        )
    return Timed(scored, watch.seconds)
