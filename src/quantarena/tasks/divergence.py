"""KL divergence of next-token distributions against the baseline variant, on a text set (see divergence.py).

Tokens are scored with the perplexity task's sliding windows (``max_length`` every ``stride``, up to
``max_tokens``). The reference is a method applied to the same weights: by default the sweep's baseline
(config.py fills ``reference_method`` and ``reference_config`` from it). Its log-probabilities are cached on
disk; the cell that finds them missing computes them: from its own model when it is the reference, else
from a fresh copy of the weights with the reference method applied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, ValidationError, model_validator

from quantarena.data import corpus
from quantarena.divergence import ReferenceCache, reference_key, summarize, token_divergence
from quantarena.environment import package_version
from quantarena.errors import QuantarenaError
from quantarena.measure import timed
from quantarena.methods import METHODS
from quantarena.methods.base import calibration_batches
from quantarena.tasks.base import EvalContext, Origin, Task, TaskConfig, TaskOutput, register
from quantarena.tasks.perplexity import Window, sliding_windows


class DivergenceConfig(TaskConfig):
    dataset: str = "wikitext2"
    split: str = "test"
    text_column: str = "text"
    max_length: PositiveInt = 512
    stride: PositiveInt = 256
    # The cache holds vocab x 4 bytes per token (about 200 MB for 1024 tokens of a 49k vocabulary).
    max_tokens: PositiveInt = 1024
    reference_method: str = "fp32"
    reference_config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self):
        if self.stride > self.max_length:
            raise ValueError(f"stride ({self.stride}) must be <= max_length ({self.max_length})")
        if self.reference_method not in METHODS:
            valid = ", ".join(METHODS.names())
            raise ValueError(f"reference_method {self.reference_method!r} is not a method; valid: {valid}")
        try:
            METHODS.get(self.reference_method).config_cls(**self.reference_config)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ValueError(f"reference_config of {self.reference_method}: {where}: {first['msg']}") from None
        return self


def window_logprobs(
    model: torch.nn.Module, ids: torch.Tensor, windows: list[Window], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 log-probabilities, target ids) of each window's scored tokens, in token order."""
    with torch.inference_mode():
        for w in windows:
            window = ids[w.begin : w.end].to(device)
            n = min(w.target_len, len(window) - 1)
            logits = model(input_ids=window[None]).logits[0, -n - 1 : -1]
            yield F.log_softmax(logits.float(), dim=-1).cpu(), window[-n:].cpu()


@register
class Divergence(Task):
    name = "divergence"
    description = "KL divergence vs the baseline per token (mean/median/p99), top-1 agreement, Δ perplexity"
    model_kind = "causal-lm"
    Config = DivergenceConfig
    quality_metric = "top1_agreement"
    higher_is_better = True
    latency_metric = "ms_per_token"

    def load(self) -> str:
        cfg = self.config
        return corpus(cfg.dataset, self.data_dir, cfg.split, cfg.text_column, cfg.select)

    def _reference_config(self):
        method = METHODS.get(self.config.reference_method)
        return method, method.config_cls(**self.config.reference_config)

    def _is_reference(self, origin: Origin) -> bool:
        method, config = self._reference_config()
        return origin.method == method.name and origin.method_config == config.model_dump(mode="json")

    def _reference_model(self, ctx: EvalContext) -> torch.nn.Module:
        method, config = self._reference_config()
        model, tokenizer = ctx.origin.load()
        calibration = partial(calibration_batches, tokenizer, self.data_dir, ctx.device)
        with torch.no_grad():
            return method.quantize(model.to(ctx.device), config, calibration)

    def evaluate(self, ctx: EvalContext, data: str) -> TaskOutput:
        cfg = self.config
        if ctx.origin is None:
            raise QuantarenaError("the divergence task runs inside a sweep cell: it needs the model's origin")
        ids = ctx.tokenizer(data, return_tensors="pt").input_ids[0][: cfg.max_tokens]
        windows = sliding_windows(len(ids), cfg.max_length, cfg.stride)
        method, config = self._reference_config()
        identity = {
            "model": ctx.origin.model_digest,
            "reference": [method.name, config.model_dump(mode="json")],
            "tokens": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
            "windows": [cfg.max_length, cfg.stride],
            "device": ctx.device.type,
            "versions": {p: package_version(p) for p in ("quantarena", "torch", "transformers")},
        }
        from quantarena.models import cache_dir  # here: models imports the tasks package

        cache = ReferenceCache(cache_dir() / "divergence")
        key = reference_key(identity)
        reference = cache.get(key)
        if reference is None:
            model = ctx.model if self._is_reference(ctx.origin) else self._reference_model(ctx)
            reference = np.concatenate([lp.numpy() for lp, _ in window_logprobs(model, ids, windows, ctx.device)])
            cache.put(key, reference, identity)
            del model

        kl, same, nll, nll_ref = [], [], [], []
        start = 0
        with timed(ctx.device) as total:
            for done, (logprobs, targets) in enumerate(window_logprobs(ctx.model, ids, windows, ctx.device), 1):
                ref = torch.from_numpy(np.asarray(reference[start : start + len(targets)]))
                start += len(targets)
                token_kl, token_same = token_divergence(ref, logprobs)
                kl.append(token_kl)
                same.append(token_same)
                nll.append(-logprobs.gather(-1, targets[:, None])[:, 0])
                nll_ref.append(-ref.gather(-1, targets[:, None])[:, 0])
                ctx.progress(done, len(windows))
        if start != len(reference):
            raise QuantarenaError(f"divergence cache {cache.path(key)} holds {len(reference)} tokens, not {start}")
        kl_all = torch.cat(kl).double().numpy()
        metrics = summarize(
            kl_all, torch.cat(same).numpy(), torch.cat(nll_ref).double().numpy(), torch.cat(nll).double().numpy()
        )
        metrics |= {
            "n_forwards": len(windows),
            "inference_s": total.seconds,
            "ms_per_token": total.seconds / start * 1000,
        }
        return TaskOutput(metrics, {"token_kl": kl_all.tolist()})
