"""Whether forwards must give the reference path's numbers (its fp32 arithmetic).

Fast kernels may compute differently (the own formats' CPU kernels run decode steps with bf16 activations).
Tasks whose numbers are scores (log-likelihoods, perplexity, accuracy) run inside ``exact()``, so a score is
the same whichever kernel a layer has; tasks that time decoding run outside it, so the kernels are timed.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_exact = contextvars.ContextVar("quantarena_exact_numerics", default=False)


@contextlib.contextmanager
def exact(enabled: bool = True) -> Iterator[None]:
    token = _exact.set(enabled)
    try:
        yield
    finally:
        _exact.reset(token)


def is_exact() -> bool:
    return _exact.get()
