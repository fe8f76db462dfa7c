"""How far a variant's next-token distributions are from the baseline's, as llama.cpp's ``--kl-divergence`` reports.

Per scored token: the KL divergence ``KL(P_base || Q) = sum_v p_base(v) (log p_base(v) - log q(v))`` over the
whole vocabulary, and whether both put their highest probability on the same token ("same top"). Over tokens:
the mean KL with its standard error, the median, 90th and 99th percentiles and the maximum; the top-1
agreement with its standard error; and the change in perplexity. Perplexities come from the same tokens, so
the change is paired: ``ln(PPL_q / PPL_base)`` is the mean of per-token NLL differences (its stderr from their
spread), and ``PPL_q - PPL_base`` gets its uncertainty by the delta method with the two means' covariance.

The baseline's log-probabilities are kept on disk (float32, vocabulary x 4 bytes per token) under a key of
everything that determines them, so each variant is compared without running the baseline again.

``flipped_predictions`` counts, for classification and multiple choice, the examples whose predicted class
changed against the baseline, right or wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantarena.results import CellResult


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


def flipped_predictions(cell: CellResult, baseline: CellResult) -> int | None:
    """Examples whose prediction differs from the baseline's; None when they cannot be paired."""
    mine, theirs = cell.per_example.get("predictions"), baseline.per_example.get("predictions")
    if not mine or not theirs or len(mine) != len(theirs):
        return None
    if cell.per_example.get("labels") != baseline.per_example.get("labels"):
        return None
    return sum(a != b for a, b in zip(mine, theirs, strict=True))


def reference_key(identity: dict[str, Any]) -> str:
    """The store's recipe: a sha256 of everything that determines the reference's outputs."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


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
