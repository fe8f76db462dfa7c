"""What the worker fork server imports once, so that every worker starts with it: the libraries quieted first
(their import-time warnings would bury the sweep's own lines), then torch, transformers' model loading and the
code that runs a variant. Everything imported is then frozen out of the garbage collector's reach: a worker's
full collection (before each phase's memory peak is reset) walks only what the worker made, not the hundreds
of thousands of objects imported here (0.4 s a collection otherwise)."""

import gc

from quantarena import models

models.quiet_transformers()

import transformers.modeling_utils  # noqa: E402
import transformers.models.auto.modeling_auto  # noqa: E402, F401

import quantarena.sweep.variant  # noqa: E402, F401

gc.freeze()
