"""KL divergence of next-token distributions against a reference variant (by default the sweep's baseline), as
llama.cpp's ``--kl-divergence`` reports it.

Per scored token: the KL divergence ``KL(P_ref || Q) = sum_v p_ref(v) (log p_ref(v) - log q(v))`` over the
whole vocabulary, and whether both put their highest probability on the same token ("same top"). Over tokens:
the mean KL with its standard error, the median, 90th and 99th percentiles and the maximum; the top-1
agreement with its standard error; and the change in perplexity. Perplexities come from the same tokens, so
the change is paired: ``ln(PPL_q / PPL_ref)`` is the mean of per-token NLL differences (its stderr from their
spread), and ``PPL_q - PPL_ref`` gets its uncertainty by the delta method with the two means' covariance.

Tokens are scored with the perplexity task's sliding windows (``max_length`` every ``stride``, up to
``max_tokens``). The reference's log-probabilities are kept on disk (float32, vocabulary x 4 bytes per token)
under a key of everything that determines them; the first variant that finds them missing computes them, from
its own model when it is the reference, else from the reference variant the sweep hands over
(``EvalContext.reference``), so each later variant is compared without running the reference again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from quantarena.data import corpus, json_digest
from quantarena.environment import package_version
from quantarena.errors import QuantarenaError
from quantarena.measure import timed
from quantarena.models import cache_dir
from quantarena.tasks.base import EvalContext, ReferenceConfig, Task, TaskOutput, register
from quantarena.tasks.perplexity import Window, WindowConfig, sliding_windows, window_length


def token_divergence(reference: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(reference || logprobs) and same-argmax flags, from two (n, vocab) log-probability tensors."""
    reference, logprobs = reference.float(), logprobs.float()
    kl = (reference.exp() * (reference - logprobs)).sum(-1)
    return kl.clamp_min(0.0), reference.argmax(-1) == logprobs.argmax(-1)


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def summarize(kl: np.ndarray, same_top: np.ndarray, nll_reference: np.ndarray, nll: np.ndarray) -> dict[str, float]:
    """The divergence metrics of a variant from its per-token KL, top-1 flags and the two per-token NLLs."""
    n = len(kl)
    ppl, ppl_ref = math.exp(nll.mean()), math.exp(nll_reference.mean())
    # Var(PPL_q - PPL_b) by the delta method: both are exp of a mean over the same tokens.
    cov = np.cov(nll, nll_reference, ddof=1) / n if n > 1 else np.full((2, 2), math.nan)
    delta_var = ppl**2 * cov[0, 0] + ppl_ref**2 * cov[1, 1] - 2 * ppl * ppl_ref * cov[0, 1]
    agreement = float(same_top.mean())
    return {
        "kl_mean": float(kl.mean()),
        "kl_mean_stderr": _stderr(kl),
        "kl_median": float(np.median(kl)),
        "kl_p90": float(np.percentile(kl, 90)),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "top1_agreement": agreement,
        "top1_agreement_stderr": math.sqrt(agreement * (1 - agreement) / (n - 1)) if n > 1 else math.nan,
        "perplexity": ppl,
        "reference_perplexity": ppl_ref,
        "delta_perplexity": ppl - ppl_ref,
        "delta_perplexity_stderr": math.sqrt(max(delta_var, 0.0)),
        "ln_ppl_ratio": float((nll - nll_reference).mean()),
        "ln_ppl_ratio_stderr": _stderr(nll - nll_reference),
        "n_tokens": n,
    }


class ReferenceCache:
    """Baseline log-probabilities on disk: ``<key>.npy`` (tokens x vocab float32) and ``<key>.json`` (identity)."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        path = self.path(key)
        return np.load(path, mmap_mode="r") if path.is_file() else None

    def put(self, key: str, logprobs: np.ndarray, identity: dict[str, Any]) -> None:
        """Written through a temporary file and renamed: concurrent cells never read half a file."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(logprobs, dtype=np.float32))
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        (self.root / f"{key}.json").write_text(json.dumps(identity, indent=1, sort_keys=True))


class DivergenceConfig(ReferenceConfig, WindowConfig):
    max_length: PositiveInt = 512
    stride: PositiveInt = 256
    # The cache holds vocab x 4 bytes per token (about 200 MB for 1024 tokens of a 49k vocabulary).
    max_tokens: Annotated[int, Field(ge=2)] = 1024


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

    def evaluate(self, ctx: EvalContext, data: str) -> TaskOutput:
        cfg = self.config
        if ctx.reference is None:
            raise QuantarenaError("the divergence task needs a reference variant: run it in a sweep")
        ids = ctx.tokenizer(data, return_tensors="pt").input_ids[0][: cfg.max_tokens]
        max_length, recorded = window_length(cfg, ctx.model)
        windows = sliding_windows(len(ids), max_length, min(cfg.stride, max_length))
        identity = {
            "reference": ctx.reference.identity,
            "tokens": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
            "windows": [max_length, min(cfg.stride, max_length)],
            "device": ctx.device.type,
            "versions": {p: package_version(p) for p in ("quantarena", "torch", "transformers")},
        }
        cache = ReferenceCache(cache_dir() / "divergence")
        key = json_digest(identity)
        reference = cache.get(key)
        if reference is None:
            model = ctx.model if ctx.reference.is_self else ctx.reference.load()
            reference = np.concatenate([lp.numpy() for lp, _ in window_logprobs(model, ids, windows, ctx.device)])
            cache.put(key, reference, identity)
            del model

        kl, same, nll, nll_ref = [], [], [], []
        start = 0
        with timed(ctx.device) as total:
            for done, (logprobs, targets) in enumerate(window_logprobs(ctx.model, ids, windows, ctx.device), 1):
                ref = torch.from_numpy(np.array(reference[start : start + len(targets)]))
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
            **recorded,
        }
        return TaskOutput(metrics, {"token_kl": kl_all.tolist()})
