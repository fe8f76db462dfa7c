"""Whether forwards must give the reference path's numbers (its fp32 arithmetic).

Fast kernels may compute differently (the own formats' CPU kernels run decode steps with bf16 activations).
Tasks whose numbers are scores (log-likelihoods, perplexity, accuracy) run inside ``exact()``, so a score is
the same whichever kernel a layer has; tasks that time decoding run outside it, so the kernels are timed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# A process-wide flag, not a ContextVar: torch.compile cannot trace ContextVar.get, and a compiled decode step
# reads this (guarding on a global's value). A process evaluates one task at a time.
_exact = False


@contextlib.contextmanager
def exact(enabled: bool = True) -> Iterator[None]:
    global _exact
    previous, _exact = _exact, enabled
    try:
        yield
    finally:
        _exact = previous


def is_exact() -> bool:
    return _exact
