"""A sweep plugin for benchmarks/sweep_cost.py: appends a line to $QUANTARENA_COUNT_FILE each time a method is
applied to a model, in whichever process applies it, so quantizations are counted the same way in any design.

Written against the ``METHODS`` registry and ``Method.apply``, which both the old and the new layout have.
"""

import dataclasses
import os

from quantarena.methods import METHODS


def _counting(name, apply):
    def counted(model, config):
        with open(os.environ["QUANTARENA_COUNT_FILE"], "a") as f:
            f.write(name + "\n")
        return apply(model, config)

    return counted


for _method in list(METHODS):
    METHODS._entries[_method.name] = dataclasses.replace(_method, apply=_counting(_method.name, _method.apply))
