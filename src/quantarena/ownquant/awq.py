"""Activation-aware scaling (AWQ, Lin et al., 2024) folded into the model before its layers are rounded.

Input channels that carry large activations matter most to a layer's output, so their weight columns are
scaled up by ``s`` before rounding (relatively finer steps) and their inputs scaled down by ``1/s``, which is
folded into the operation that produces them: an RMSNorm's weight or a previous Linear's output rows. The
product is unchanged in exact arithmetic; only the rounding differs. ``s = a ** alpha`` with ``a`` each
channel's root-mean-square activation (the square root of the Hessian's diagonal; AWQ's reference uses the
mean absolute value) and ``alpha`` from a grid, chosen per producer for the least output error of
round-to-nearest summed over the layers it feeds, that error measured exactly through the Hessian.

Where the inputs may be scaled is architecture knowledge (a post-norm model's norm output also feeds the
residual stream, which must not change), so mappings are listed per model type, as llmcompressor's are.
"""

from __future__ import annotations

import torch
from torch import nn

from quantarena.errors import ConfigError
from quantarena.ownquant.algorithms import Grid, nearest

_PRE_NORM_DECODER = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
# Producer (relative to a block) and the layers reading its output, per transformers model type.
MAPPINGS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "llama": _PRE_NORM_DECODER,
    "mistral": _PRE_NORM_DECODER,
    "qwen2": _PRE_NORM_DECODER,
    "qwen3": _PRE_NORM_DECODER,
}
ALPHAS = tuple(i / 20 for i in range(20))


def check_awq(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MAPPINGS:
        raise ConfigError(
            f"awq needs to know where this architecture's inputs can be scaled; model type {model_type!r} has no "
            f"mapping (known: {', '.join(MAPPINGS)})"
        )


def awq_scale(weights: list[torch.Tensor], hessian: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The per-input-channel scale (K,) of the alpha grid with the least summed output error."""
    rms = hessian.diagonal().clamp_min(0).sqrt().clamp_min(1e-8)
    best, best_err = torch.ones_like(rms), None
    for alpha in ALPHAS:
        s = rms**alpha
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w in weights:
            e = w - nearest(w * s, grid) / s
            err += float(((e @ hessian) * e).sum())
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best


def _scale_producer(producer: nn.Module, s: torch.Tensor) -> None:
    if type(producer) is nn.Linear:
        producer.weight.data /= s[:, None]
        if producer.bias is not None:
            producer.bias.data /= s
    elif isinstance(getattr(producer, "weight", None), torch.Tensor) and producer.weight.shape == s.shape:
        producer.weight.data /= s
    else:
        raise ConfigError(f"awq cannot fold a scale into {type(producer).__name__}")


def fold_awq(model: nn.Module, hessians: dict[str, torch.Tensor], grid: Grid) -> dict[str, torch.Tensor]:
    """Scale every mapped producer/consumers set among ``hessians``' layers; the consumers' new Hessians."""
    hessians = dict(hessians)
    for producer_name, consumer_names in MAPPINGS[model.config.model_type]:
        for name in [n for n in hessians if n.endswith("." + consumer_names[0])]:
            prefix = name[: -len(consumer_names[0])]
            consumers = [prefix + c for c in consumer_names]
            if not all(c in hessians and type(model.get_submodule(c)) is nn.Linear for c in consumers):
                continue
            layers = [model.get_submodule(c) for c in consumers]
            hessian = hessians[consumers[0]]
            s = awq_scale([layer.weight.detach().float() for layer in layers], hessian, grid)
            _scale_producer(model.get_submodule(prefix + producer_name), s.to(layers[0].weight.dtype))
            for layer in layers:
                layer.weight.data *= s.to(layer.weight.dtype)
            scaled = hessian / s[:, None] / s[None, :]
            hessians.update(dict.fromkeys(consumers, scaled))
    return hessians
