"""Layers replaced one block at a time, each from the Hessian of its inputs on calibration text.

As GPTQ's reference and llmcompressor's sequential pipeline: the inputs of the first repeated block (a decoder
or encoder layer) are captured once from the model's own forward, with every argument the model passes it
(masks, rotary embeddings); each block then runs on them twice: once to collect its layers' input Hessians,
once, after its layers are replaced, to produce the next block's inputs. Later blocks so see the errors of the
earlier ones, as they will at inference. Layers outside the blocks (a pooler, an unskipped head) get their
Hessians from one more full forward at the end. A model without repeated blocks gets all its Hessians from
that one forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

# Replaces one layer, given it and the Hessian ``X^T X / tokens`` of its inputs.
QuantizeLayer = Callable[[nn.Module, torch.Tensor], nn.Module]
Call = tuple[tuple[Any, ...], dict[str, Any]]
# Runs before a block's layers are replaced: may change the model (fold scales) and returns their Hessians.
Prepare = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class _Captured(Exception):
    """Stops the model's forward once the first block's inputs are captured."""


def _block_list(model: nn.Module, targets: Iterable[str]) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of repeated blocks holding the most target layers."""
    targets = list(targets)
    best, most = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            inside = sum(t.startswith(f"{name}.") for t in targets)
            if inside > most:
                best, most = (name, module), inside
    return best


def _forward(model: nn.Module, batch: torch.Tensor) -> None:
    # No key/value cache: nothing reads it, and it would hold every block's keys for the whole batch.
    options = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
    model(input_ids=batch, **options)


def _first_block_calls(model: nn.Module, block: nn.Module, batches: list[torch.Tensor]) -> list[Call]:
    calls: list[Call] = []

    def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args, kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Captured):
                _forward(model, batch)
    finally:
        handle.remove()
    return calls


def _with_hidden(call: Call, hidden: torch.Tensor) -> Call:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _identity_for(layer: nn.Module) -> torch.Tensor:
    width = layer.in_features if isinstance(layer, nn.Linear) else layer.weight.shape[0]  # Conv1D: (in, out)
    return torch.eye(width, device=layer.weight.device)


def _replace_from_hessians(
    model: nn.Module, names: list[str], quantize: QuantizeLayer, run: Callable[[], None], prepare: Prepare | None
) -> None:
    """Collect the inputs' Hessians of the named layers while ``run`` runs, then replace each layer."""
    hessians: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    # Layers fed the very same tensor (q, k and v projections) share one Hessian: X^T X is the costly part.
    shares: dict[str, str] = {}
    last: list[tuple[torch.Tensor, str]] = []

    def collector(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if last and last[0][0] is args[0] and last[0][1] != name:
                shares[name] = last[0][1]
                return
            last[:] = [(args[0], name)]
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if name not in hessians:
                hessians[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                tokens[name] = 0
            hessians[name].addmm_(x.T, x)
            tokens[name] += x.shape[0]

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(collector(n)) for n in names]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    averaged = {name: hessians[name] / tokens[name] for name in hessians}
    by_name = {}
    for name in names:
        owner = shares.get(name, name)
        if owner not in averaged:
            # Calibration never ran it (an expert no token was routed to): the identity, so its error is
            # measured on the weights themselves.
            averaged[owner] = _identity_for(model.get_submodule(name))
        by_name[name] = averaged[owner]
    if prepare is not None:
        by_name = prepare(model, by_name)
    for name in names:
        model.set_submodule(name, quantize(model.get_submodule(name), by_name[name]))


def replace_calibrated(
    model: nn.Module,
    targets: list[str],
    sequences: torch.Tensor,
    quantize: QuantizeLayer,
    prepare: Prepare | None = None,
    batch_size: int = 8,
) -> None:
    """Replace each named layer by ``quantize(layer, hessian)``, block by block (see the module's doc)."""
    batches = list(sequences.split(batch_size))
    remaining = list(targets)
    found = _block_list(model, targets)
    if found is not None:
        prefix, blocks = found
        calls = _first_block_calls(model, blocks[0], batches)
        for index, block in enumerate(blocks):
            inside = [t for t in remaining if t.startswith(f"{prefix}.{index}.")]
            remaining = [t for t in remaining if t not in inside]

            def run_block(block: nn.Module = block, calls: list[Call] = calls) -> None:
                for args, kwargs in calls:
                    block(*args, **kwargs)

            _replace_from_hessians(model, inside, quantize, run_block, prepare)
            calls = [_with_hidden(call, _hidden(block(*call[0], **call[1]))) for call in calls]
    if remaining:

        def run_model() -> None:
            for batch in batches:
                _forward(model, batch)

        _replace_from_hessians(model, remaining, quantize, run_model, prepare)
