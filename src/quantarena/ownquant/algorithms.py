"""Calibrated rounding into the own formats: which codes and ranges a layer gets, given how its inputs move.

A layer's output error for a weight error ``E`` (rows = output channels) over calibration inputs ``X`` is
``sum_n E[n] H E[n]^T`` with ``H = X^T X / tokens``, so everything here minimises errors weighted by ``H``:

* ``clip``: each group's range (the min/max the 16 levels span, or int8's absolute maximum) shrunk by the
  factor of a grid that gives the least ``H``-weighted error of the group's rounded row, row by row.
  Round-to-nearest is the factor 1, so the search can only lower that error (per group, cross terms aside).
* ``gptq``: GPTQ (Frantar et al., 2022): columns rounded one at a time, each rounding error spread onto the
  columns not yet rounded through the inverse Hessian (its upper Cholesky factor, updated lazily in blocks),
  optionally in order of decreasing ``H[k, k]`` (act-order). The format keeps groups contiguous along K,
  so with act-order every group's range is fixed before rounding starts (GPTQ's static groups); without it a
  group's range is chosen from the error-corrected weights when rounding reaches it, as in GPTQ.

The grids are exactly the formats of ``ownquant.formats``: ranges are rounded to the stored dtype before any
code is chosen, so what is searched is what the dequantizer computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from quantarena.ownquant.formats import INT4_LEVELS, INT8_MAX, Int4WeightLinear, Int8WeightLinear, pack_int4

# Shrink factors the clip search tries (1 = the full range, round-to-nearest's).
CLIP_SHRINKS = tuple(1 - 0.02 * i for i in range(21))


@dataclass(frozen=True)
class Grid:
    """An affine integer grid ``w = q * scale + offset``, one (scale, offset) per row and group of columns.

    ``group_size`` None: one range per row (int8 per channel). Symmetric grids have offset 0 and span
    ``[-qmax, qmax]``; asymmetric ones span ``[0, qmax]`` from the group's minimum (own int4)."""

    qmax: int
    symmetric: bool
    group_size: int | None
    range_dtype: torch.dtype

    @property
    def qmin(self) -> int:
        return -self.qmax if self.symmetric else 0

    def group_width(self, k: int) -> int:
        return self.group_size or k

    def ranges(self, w: torch.Tensor, shrink: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) per row of ``w`` (N, m), the range shrunk by ``shrink`` (a float or (N,))."""
        shrink = torch.as_tensor(shrink, dtype=w.dtype, device=w.device)
        if self.symmetric:
            scale = (w.abs().amax(dim=1) * shrink / self.qmax).to(self.range_dtype)
            scale = scale.clamp_min(torch.finfo(self.range_dtype).tiny).to(w.dtype)
            return scale, torch.zeros_like(scale)
        lo, hi = w.amin(dim=1), w.amax(dim=1)
        # Shrunk toward the middle from both ends; the factor 1 keeps lo and hi exactly (round-to-nearest).
        cut = (hi - lo) * (1 - shrink) / 2
        offset = (lo + cut).to(self.range_dtype)
        scale = ((hi - cut - offset.to(w.dtype)) / self.qmax).to(self.range_dtype)
        # A constant group has range 0: any positive scale reproduces it through the offset.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale.to(w.dtype), offset.to(w.dtype)

    def codes(self, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return torch.round((w - offset) / scale).clamp_(self.qmin, self.qmax)

    @staticmethod
    def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return q * scale + offset


INT8_CHANNEL = Grid(INT8_MAX, symmetric=True, group_size=None, range_dtype=torch.float32)


def int4_grid(group_size: int) -> Grid:
    return Grid(INT4_LEVELS, symmetric=False, group_size=group_size, range_dtype=torch.float16)


@dataclass
class Rounded:
    """A layer's codes (N, K) and its ranges (N, groups), as floats in the computing dtype."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor


def clip_ranges(
    w: torch.Tensor, hessian_block: torch.Tensor, grid: Grid, shrinks: Sequence[float] = CLIP_SHRINKS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w`` (N, m), the shrunk range whose rounding error ``e`` has the least ``e H e^T``."""
    if len(shrinks) == 1:  # nothing to choose between
        return grid.ranges(w, shrinks[0])
    best_err = best_scale = best_offset = None
    for shrink in shrinks:
        scale, offset = grid.ranges(w, shrink)
        e = w - grid.dequantize(grid.codes(w, scale[:, None], offset[:, None]), scale[:, None], offset[:, None])
        err = ((e @ hessian_block) * e).sum(dim=1)
        if best_err is None:
            best_err, best_scale, best_offset = err, scale, offset
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
    return best_scale, best_offset


def _group_slices(k: int, width: int) -> list[slice]:
    return [slice(s, min(s + width, k)) for s in range(0, k, width)]


def nearest(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """What round-to-nearest of ``weight`` (N, K) dequantizes to."""
    parts = []
    for g in _group_slices(weight.shape[1], grid.group_width(weight.shape[1])):
        scale, offset = (r[:, None] for r in grid.ranges(weight[:, g]))
        parts.append(grid.dequantize(grid.codes(weight[:, g], scale, offset), scale, offset))
    return torch.cat(parts, dim=1)


def round_clipped(
    weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, shrinks: Sequence[float] = CLIP_SHRINKS
) -> Rounded:
    """Round to nearest within each group's searched range (no error compensation)."""
    groups = _group_slices(weight.shape[1], grid.group_width(weight.shape[1]))
    ranges = [clip_ranges(weight[:, g], hessian[g, g], grid, shrinks) for g in groups]
    scales = torch.stack([s for s, _ in ranges], dim=1)
    offsets = torch.stack([o for _, o in ranges], dim=1)
    codes = torch.cat(
        [grid.codes(weight[:, g], scales[:, i : i + 1], offsets[:, i : i + 1]) for i, g in enumerate(groups)], dim=1
    )
    return Rounded(codes, scales, offsets)


def _dead_inputs_fixed(hessian: torch.Tensor) -> torch.Tensor:
    """Inputs calibration never activated get a unit diagonal, so the factorisation exists; their columns are
    then rounded to nearest (unlike GPTQ, their weights are kept: other text may activate them)."""
    hessian = hessian.clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    return hessian


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    shrinks: Sequence[float] = CLIP_SHRINKS,
    block_size: int = 128,
) -> Rounded:
    """GPTQ rounding of ``weight`` (N, K) given ``hessian`` (K, K), computed in ``weight``'s dtype.

    Each group's range comes from ``clip_ranges`` over ``shrinks`` (``(1.0,)`` gives GPTQ's min/max ranges)."""
    n, k = weight.shape
    width = grid.group_width(k)
    hessian = _dead_inputs_fixed(hessian.to(weight.dtype))
    w = weight.clone()
    groups = _group_slices(k, width)
    scales = torch.zeros(n, len(groups), dtype=w.dtype, device=w.device)
    offsets = torch.zeros_like(scales)
    static = act_order or grid.group_size is None
    if static:
        for i, g in enumerate(groups):
            scales[:, i], offsets[:, i] = clip_ranges(w[:, g], hessian[g, g], grid, shrinks)
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(k, device=w.device)
    w = w[:, order]
    h = hessian[order][:, order]
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    # Each column's range, in rounding order (static ranges known now; the others filled as groups start).
    column_group = order // width
    column_scale, column_offset = scales[:, column_group], offsets[:, column_group]
    # Blocks hold whole groups, so a group's range (without act-order) is chosen from fully updated columns.
    block_size = width * max(1, block_size // width) if not static else block_size
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        w_block, u_block = w[:, start:end].clone(), upper[start:end, start:end]
        errors = torch.zeros_like(w_block)
        for i in range(end - start):
            column = start + i
            if not static and column % width == 0:
                g = groups[column // width]
                span = slice(i, i + g.stop - g.start)
                scale, offset = clip_ranges(w_block[:, span], hessian[g, g], grid, shrinks)
                scales[:, column // width], offsets[:, column // width] = scale, offset
                column_scale[:, g], column_offset[:, g] = scale[:, None], offset[:, None]
            scale, offset = column_scale[:, column], column_offset[:, column]
            q = grid.codes(w_block[:, i], scale, offset)
            codes[:, column] = q
            error = (w_block[:, i] - grid.dequantize(q, scale, offset)).div_(u_block[i, i])
            w_block[:, i:].addr_(error, u_block[i, i:], alpha=-1)
            errors[:, i] = error
        w[:, end:].addmm_(errors, upper[start:end, end:], alpha=-1)
    inverse = torch.argsort(order)
    return Rounded(codes[:, inverse], scales, offsets)


def dequantize_rounded(rounded: Rounded, grid: Grid) -> torch.Tensor:
    """The weights a rounding stands for (N, K), for error measurements."""
    k = rounded.codes.shape[1]
    width = grid.group_width(k)
    repeat = torch.arange(k, device=rounded.codes.device) // width
    return grid.dequantize(rounded.codes, rounded.scales[:, repeat], rounded.offsets[:, repeat])


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sum_n E[n] H E[n]^T``: the squared output error per calibration token."""
    e = weight - approx
    return float(((e @ hessian) * e).sum())


Algorithm = Literal["rtn", "clip", "gptq"]


def calibrated_linear(
    linear: nn.Linear,
    hessian: torch.Tensor,
    grid: Grid,
    algorithm: Algorithm,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    gptq_clip: bool = True,
) -> Int4WeightLinear | Int8WeightLinear:
    """``linear`` in the own format of ``grid``, rounded by ``algorithm`` for inputs whose Hessian is given."""
    weight = linear.weight.detach().float()
    hessian = hessian.to(weight)
    if algorithm == "gptq":
        shrinks = CLIP_SHRINKS if gptq_clip else (1.0,)
        rounded = gptq(weight, hessian, grid, damp=damp, act_order=act_order, shrinks=shrinks)
    else:
        rounded = round_clipped(weight, hessian, grid, CLIP_SHRINKS if algorithm == "clip" else (1.0,))
    if grid.symmetric:
        return Int8WeightLinear(rounded.codes.to(torch.int8), rounded.scales[:, 0].float(), linear.bias)
    return Int4WeightLinear(
        pack_int4(rounded.codes),
        rounded.scales.half(),
        rounded.offsets.half(),
        linear.in_features,
        grid.group_size,
        linear.bias,
    )
