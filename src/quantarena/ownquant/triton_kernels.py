"""Triton kernels for ``y = x @ W^T (+ bias)`` with W in the own int8 / int4 formats.

The layouts are the ones of :mod:`quantarena.ownquant`. Three paths, picked by M (rows of x):

* ``gemv`` (M == 1, decode at batch 1): one program per ``BLOCK_N`` output rows walks all of K,
  so each weight byte is read once and dequantized in registers.
* ``dot`` (small and medium M): a tiled ``tl.dot`` kernel that dequantizes each weight tile in
  registers before the matrix instruction; padded to 16 rows it is the GEMV for M = 2..16.
* ``dequant`` (large M, prefill): one pass writes the weight in the activation dtype, then cuBLAS,
  which beats a Triton tile loop once the product is compute bound.

A GEMV streams weights at a few bytes per SM per clock, so it is bound by instructions per weight
byte as much as by memory. Hence the gemv kernels read 32-bit words of weights and 64-bit words of
bf16 activations (four at a time, bf16 -> f32 being a shift), never convert through I2F for int4
(a quarter-rate unit: two per byte would cap the kernel near 60% of the bandwidth) and take each
nibble to a float with one PRMT into the mantissa of 128.0; the 128 * sum(x) this adds is removed
once per group together with the min term. Integer to float elsewhere uses ``2^23 + q`` (an OR and
an FADD), which is exact.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from quantarena.ownquant.formats import dequantize_int4_groupwise

# M thresholds between the paths, measured on an H100 (benchmarks/gemv.py).
GEMV_MAX_M = 1
INT8_DOT_MAX_M = 256
INT4_DOT_MAX_M = 16

# The 8 nibbles of a word (little endian: byte j holds k = 2j low, 2j + 1 high) as floats 128 + q:
# PRMT moves each nibble into byte 2 of 128.0f, mantissa bits 16..19, where one unit is 1.0.
_NIBBLES_ASM = tl.constexpr("""
{
.reg .b32 t, u, m;
mov.b32 m, 0x43000000;
and.b32 t, $8, 0x0F0F0F0F;
shr.u32 u, $8, 4;
and.b32 u, u, 0x0F0F0F0F;
prmt.b32 $0, t, m, 0x7044;
prmt.b32 $1, u, m, 0x7044;
prmt.b32 $2, t, m, 0x7144;
prmt.b32 $3, u, m, 0x7144;
prmt.b32 $4, t, m, 0x7244;
prmt.b32 $5, u, m, 0x7244;
prmt.b32 $6, t, m, 0x7344;
prmt.b32 $7, u, m, 0x7344;
}
""")


@triton.jit
def _u32_to_f32(v):
    # v holds integers in [0, 2^23); float(0x4B000000 | v) == 2^23 + v exactly.
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _i8_to_f32(q):
    # q + 128 lies in [1, 255]; subtracting 2^23 + 128 undoes both offsets at once.
    return ((q.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _bf16x4(xd):
    # Four bf16 in an int64, in k order, as floats: bf16 -> f32 is a 16-bit shift.
    lo = xd.to(tl.int32)
    hi = (xd >> 32).to(tl.int32)
    return (
        (lo << 16).to(tl.float32, bitcast=True),
        (lo & -65536).to(tl.float32, bitcast=True),
        (hi << 16).to(tl.float32, bitcast=True),
        (hi & -65536).to(tl.float32, bitcast=True),
    )


@triton.jit
def _f32(v):
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _nibbles(w, USE_ASM: tl.constexpr):
    """The 8 nibbles of int32 words ``w``, in k order, as floats 128 + q."""
    if USE_ASM:
        n0, n1, n2, n3, n4, n5, n6, n7 = tl.inline_asm_elementwise(
            _NIBBLES_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], (tl.int32,) * 8, is_pure=True, pack=1
        )
    else:  # same bits, for the interpreter (no inline asm there)
        n0 = ((w & 15) << 16) | 0x43000000
        n1 = (((w >> 4) & 15) << 16) | 0x43000000
        n2 = (((w >> 8) & 15) << 16) | 0x43000000
        n3 = (((w >> 12) & 15) << 16) | 0x43000000
        n4 = (((w >> 16) & 15) << 16) | 0x43000000
        n5 = (((w >> 20) & 15) << 16) | 0x43000000
        n6 = (((w >> 24) & 15) << 16) | 0x43000000
        n7 = (((w >> 28) & 15) << 16) | 0x43000000
    return _f32(n0), _f32(n1), _f32(n2), _f32(n3), _f32(n4), _f32(n5), _f32(n6), _f32(n7)


@triton.jit
def _dot(x, w, acc, DOT_F32: tl.constexpr):
    # float32 activations get a true fp32 product (not tf32), like F.linear's default.
    if DOT_F32 or x.dtype == tl.float32:
        acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, w.to(x.dtype), acc)
    return acc


# ----------------------------------------------------------------------------- int8


@triton.jit
def _int8_gemv_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    N,
    KW,
    stride_qn,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    # q_ptr: int32 words of 4 int8; x_ptr: int64 words of 4 bf16; KW: words per row. The x
    # pointers are broadcast over the rows so that both loads get one layout and a thread that
    # holds several rows converts each x word once.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    jw = tl.broadcast_to(tl.arange(0, BLOCK_W)[None, :], (BLOCK_N, BLOCK_W))
    q_ptrs = q_ptr + offs_n.to(tl.int64)[:, None] * stride_qn + jw
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    w = tl.load(q_ptrs, mask=n_mask[:, None] & (jw < KW), other=0)
    for kw0 in range(0, KW, BLOCK_W):
        if PREFETCH:  # the next tile's loads are in flight while this one is reduced
            w_next = tl.load(q_ptrs + kw0 + BLOCK_W, mask=n_mask[:, None] & (kw0 + BLOCK_W + jw < KW), other=0)
        else:
            w = tl.load(q_ptrs + kw0, mask=n_mask[:, None] & (kw0 + jw < KW), other=0)
        x0, x1, x2, x3 = _bf16x4(tl.load(x_ptr + kw0 + jw, mask=kw0 + jw < KW, other=0))
        # Sign-extend each byte; I2F's quarter rate is enough at one conversion per byte.
        acc += ((w << 24) >> 24).to(tl.float32) * x0
        acc += ((w << 16) >> 24).to(tl.float32) * x1
        acc += ((w << 8) >> 24).to(tl.float32) * x2
        acc += (w >> 24).to(tl.float32) * x3
        if PREFETCH:
            w = w_next
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _int8_dot_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    # The weight tile is read as (BLOCK_K, BLOCK_N): K is contiguous in memory, so this is W^T.
    q_ptrs = q_ptr + offs_n.to(tl.int64)[None, :] * stride_qn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + offs_k < K
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(q_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0)
        # |q| <= 127 is exact in bf16/fp16, so the per-channel scale can wait until the end.
        acc = _dot(x, _i8_to_f32(q), acc, DOT_F32)
    acc *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int8_dequant_kernel(q_ptr, s_ptr, w_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    idx = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    q = tl.load(q_ptr + idx, mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    tl.store(w_ptr + idx, (q * s[:, None]).to(w_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- int4


@triton.jit
def _int4_gemv_kernel(
    x_ptr,
    xw_ptr,
    q_ptr,
    s_ptr,
    m_ptr,
    b_ptr,
    y_ptr,
    N,
    KW,
    G,
    stride_qn,
    stride_sn,
    HAS_BIAS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PER_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    # q_ptr: int32 words (8 nibbles, k in order); x_ptr / xw_ptr: x as int64 words of 4 bf16 and as
    # int32 words of 2 bf16; KW: weight words per row.
    # Tile (rows, groups, words of a group): one scale per (row, group), loaded once.
    W: tl.constexpr = GROUP // 8
    BW: tl.constexpr = GROUPS_PER_BLOCK * W
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_g = tl.arange(0, GROUPS_PER_BLOCK)
    jw = offs_g[:, None] * W + tl.arange(0, W)[None, :]
    jw = tl.broadcast_to(jw[None, :, :], (BLOCK_N, GROUPS_PER_BLOCK, W))
    q_ptrs = q_ptr + rows[:, None, None] * stride_qn + jw
    s_ptrs = s_ptr + rows[:, None] * stride_sn + offs_g[None, :]
    nm = n_mask[:, None, None]
    acc = tl.zeros((BLOCK_N, GROUPS_PER_BLOCK, W), dtype=tl.float32)
    w = tl.load(q_ptrs, mask=nm & (jw < KW), other=0)
    for kw0 in range(0, KW, BW):
        if PREFETCH:
            w_next = tl.load(q_ptrs + kw0 + BW, mask=nm & (kw0 + BW + jw < KW), other=0)
        else:
            w = tl.load(q_ptrs + kw0, mask=nm & (kw0 + jw < KW), other=0)
        k_mask = kw0 + jw < KW
        x0, x1, x2, x3 = _bf16x4(tl.load(x_ptr + 2 * (kw0 + jw), mask=k_mask, other=0))
        x4, x5, x6, x7 = _bf16x4(tl.load(x_ptr + 2 * (kw0 + jw) + 1, mask=k_mask, other=0))
        g_mask = n_mask[:, None] & (kw0 + offs_g * W < KW)[None, :]
        s = tl.load(s_ptrs + kw0 // W, mask=g_mask, other=0.0).to(tl.float32)
        n0, n1, n2, n3, n4, n5, n6, n7 = _nibbles(w, USE_ASM)
        t = n0 * x0 + n1 * x1 + n2 * x2 + n3 * x3 + n4 * x4 + n5 * x5 + n6 * x6 + n7 * x7
        acc += s[:, :, None] * t
        if PREFETCH:
            w = w_next
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    # Each weight was taken as 128 + q, so add sum_g (min_g - 128 scale_g) * sum_{k in g} x_k:
    # once per (row, group), on a (row, group) tile, with the group sums of x over the whole row.
    GB: tl.constexpr = 16
    HALF: tl.constexpr = GROUP // 2
    offs_gb = tl.arange(0, GB)
    offs_h = tl.arange(0, HALF)
    acc_m = tl.zeros((BLOCK_N, GB), dtype=tl.float32)
    for g0 in range(0, G, GB):
        g = g0 + offs_gb
        kp = g[:, None] * HALF + offs_h[None, :]
        xp = tl.load(xw_ptr + kp, mask=kp < 4 * KW, other=0)
        xs = tl.sum(_f32(xp << 16) + _f32(xp & -65536), axis=1)
        gm = n_mask[:, None] & (g < G)[None, :]
        s = tl.load(s_ptr + rows[:, None] * stride_sn + g[None, :], mask=gm, other=0.0).to(tl.float32)
        mn = tl.load(m_ptr + rows[:, None] * stride_sn + g[None, :], mask=gm, other=0.0).to(tl.float32)
        acc_m += (mn - 128.0 * s) * xs[None, :]
    y += tl.sum(acc_m, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _int4_dot_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    m_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    GROUP: tl.constexpr,
    ALIGNED: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Even and odd k live in the low and high nibbles, so x @ W^T is split into
    # x[:, 0::2] @ W_lo^T + x[:, 1::2] @ W_hi^T: two dots of BLOCK_K / 2, no interleaving needed.
    HALF: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + 2 * offs_j[None, :]
    q_ptrs = q_ptr + rows[None, :] * stride_qn + offs_j[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ke = k0 + 2 * offs_j
        xe = tl.load(x_ptrs + k0, mask=m_mask[:, None] & (ke < K)[None, :], other=0.0)
        xo = tl.load(x_ptrs + k0 + 1, mask=m_mask[:, None] & (ke + 1 < K)[None, :], other=0.0)
        q = tl.load(q_ptrs + k0 // 2, mask=(ke < K)[:, None] & n_mask[None, :], other=0).to(tl.int32)
        lo = _u32_to_f32(q & 0xF)
        hi = _u32_to_f32(q >> 4)
        if ALIGNED:
            # BLOCK_K divides GROUP: one (scale, min) per output column for the whole tile.
            g = k0 // GROUP
            s = tl.load(s_ptr + rows * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            mn = tl.load(m_ptr + rows * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            w_lo = lo * s + mn
            w_hi = hi * s + mn
        else:
            # Any group size: gather the scale of every element (slower, but correct for odd groups).
            gm = (ke < K)[:, None] & n_mask[None, :]
            go = ((ke + 1) < K)[:, None] & n_mask[None, :]
            se = tl.load(s_ptr + rows[None, :] * stride_sn + (ke // GROUP)[:, None], mask=gm, other=0.0)
            me = tl.load(m_ptr + rows[None, :] * stride_sn + (ke // GROUP)[:, None], mask=gm, other=0.0)
            so = tl.load(s_ptr + rows[None, :] * stride_sn + ((ke + 1) // GROUP)[:, None], mask=go, other=0.0)
            mo = tl.load(m_ptr + rows[None, :] * stride_sn + ((ke + 1) // GROUP)[:, None], mask=go, other=0.0)
            w_lo = lo * se.to(tl.float32) + me.to(tl.float32)
            w_hi = hi * so.to(tl.float32) + mo.to(tl.float32)
        acc = _dot(xe, w_lo, acc, DOT_F32)
        acc = _dot(xo, w_hi, acc, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int4_dequant_kernel(
    q_ptr,
    s_ptr,
    m_ptr,
    w_ptr,
    N,
    K,
    G,
    stride_qn,
    stride_sn,
    GROUP: tl.constexpr,
    GROUPS_PER_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = GROUP // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.program_id(1) * GROUPS_PER_BLOCK + tl.arange(0, GROUPS_PER_BLOCK)
    rows = offs_n.to(tl.int64)
    n_mask = offs_n < N
    kb = offs_g[:, None] * HALF + tl.arange(0, HALF)[None, :]
    q_mask = n_mask[:, None, None] & (2 * kb < K)[None, :, :]
    q = tl.load(q_ptr + rows[:, None, None] * stride_qn + kb[None, :, :], mask=q_mask, other=0).to(tl.int32)
    g_mask = n_mask[:, None] & (offs_g < G)[None, :]
    s = tl.load(s_ptr + rows[:, None] * stride_sn + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
    mn = tl.load(m_ptr + rows[:, None] * stride_sn + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
    lo = _u32_to_f32(q & 15) * s[:, :, None] + mn[:, :, None]
    hi = _u32_to_f32(q >> 4) * s[:, :, None] + mn[:, :, None]
    # Interleave even/odd k back into memory order for one contiguous store.
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, GROUPS_PER_BLOCK, GROUP))
    k = offs_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = n_mask[:, None, None] & (k < K)[None, :, :]
    tl.store(w_ptr + rows[:, None, None] * K + k[None, :, :], w.to(w_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

# Launch configs the gemv tuner tries, per shape, on first use (small tiles keep every SM busy on
# the narrow k/v projections, large ones amortize the x conversions over more rows).
INT8_GEMV_CONFIGS = [
    {"BLOCK_N": bn, "BLOCK_W": bw, "num_warps": nw, "PREFETCH": True}
    for bn, bw, nw in [(16, 64, 4), (32, 64, 4), (16, 128, 4), (32, 32, 4), (64, 32, 4), (8, 64, 2), (4, 64, 1)]
]
INT4_GEMV_CONFIGS = [
    {"GROUPS_PER_BLOCK": g, "BLOCK_N": bn, "num_warps": nw, "PREFETCH": True}
    for g, bn, nw in [(2, 32, 4), (1, 32, 4), (2, 64, 4), (4, 32, 4), (2, 16, 4), (1, 16, 2), (2, 8, 2), (1, 4, 1)]
]
_tuned: dict[tuple, dict] = {}


# triton.jit reads the variable when it wraps a function, i.e. when this module is imported: the
# kernels above are interpreted (CPU tensors, tests) for the life of the process, or compiled.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _use_asm() -> bool:
    # QUANTARENA_NO_ASM=1 takes the plain-Triton nibble unpacking (same bits, more instructions).
    return not INTERPRETED and os.environ.get("QUANTARENA_NO_ASM") != "1"


def _pick_config(key: tuple, configs: list[dict], launch) -> dict:
    """The fastest of ``configs`` for ``key``, timed once on the real inputs, then cached.

    Without a GPU (interpreter) or while a CUDA graph is being captured, nothing is timed and
    the first config is used (uncached, so a later eager call still tunes).
    """
    if key in _tuned:
        return _tuned[key]
    if INTERPRETED or torch.cuda.is_current_stream_capturing():
        return configs[0]
    best = None
    for cfg in configs:
        try:
            ms = do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20, return_mode="median")
        except triton.runtime.errors.OutOfResources:
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    _tuned[key] = best[1] if best else configs[0]
    return _tuned[key]


def _dot_config(m: int, int4: bool) -> dict:
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128 if int4 else 256, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def _dot_f32(x: torch.Tensor) -> bool:
    # Triton's interpreter computes bf16 dots wrongly (3.9); it is a CPU test path, so upcast there.
    return x.dtype == torch.bfloat16 and INTERPRETED


def _pick_path(m: int, dot_max_m: int, path: str | None) -> str:
    if path is not None:
        if path not in ("gemv", "dot", "dequant"):
            raise ValueError(f"unknown kernel path {path!r}")
        return path
    if m <= GEMV_MAX_M:
        return "gemv"
    return "dot" if m <= dot_max_m else "dequant"


def _words_ok(x2: torch.Tensor, qweight: torch.Tensor, k_multiple: int) -> bool:
    # The gemv kernels read x as int64 and the weight as int32 words: bf16, K a multiple of the
    # word, aligned rows. Anything else takes the dot path (M padded to 16).
    k = x2.shape[1]
    return (
        x2.dtype == torch.bfloat16
        and k % k_multiple == 0
        and x2.data_ptr() % 8 == 0
        and qweight.data_ptr() % 4 == 0
        and qweight.stride(0) % 4 == 0
    )


def _prepare(x: torch.Tensor, n: int, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty((*x.shape[:-1], n), device=x.device, dtype=x.dtype)
    elif out.shape != (*x.shape[:-1], n) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {(*x.shape[:-1], n)} tensor, got {tuple(out.shape)}")
    return x2, out.view(-1, n)


def _pow2_group(group_size: int) -> bool:
    return group_size >= 16 and group_size & (group_size - 1) == 0


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n, k = qweight.shape
    w = torch.empty((n, k), device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 256))
    _int8_dequant_kernel[grid](qweight, scales, w, n, k, BLOCK_N=32, BLOCK_K=256)
    return w


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    k: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    if not _pow2_group(group_size):
        return dequantize_int4_groupwise(qweight, scales, mins, k, group_size).to(dtype)
    n, g = scales.shape
    w = torch.empty((n, k), device=qweight.device, dtype=dtype)
    gpb = max(1, 256 // group_size)
    grid = (triton.cdiv(n, 16), triton.cdiv(g, gpb))
    _int4_dequant_kernel[grid](
        qweight,
        scales,
        mins,
        w,
        n,
        k,
        g,
        qweight.stride(0),
        scales.stride(0),
        GROUP=group_size,
        GROUPS_PER_BLOCK=gpb,
        BLOCK_N=16,
    )
    return w


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    path: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x @ (qweight * scales[:, None])^T + bias`` for the own int8 per-channel format.

    ``path`` forces "gemv", "dot" or "dequant" (default: by M; a gemv the shape or dtype does not
    allow runs as "dot"); ``config`` sets the launch parameters of the chosen Triton kernel.
    """
    n, k = qweight.shape
    x2, y = _prepare(x, n, out)
    m = x2.shape[0]
    path = _pick_path(m, INT8_DOT_MAX_M, path)
    has_bias = bias is not None
    b = bias if has_bias else scales  # any pointer: never read without HAS_BIAS
    if path == "gemv" and m == 1 and _words_ok(x2, qweight, 4):
        x64, q32 = x2.view(torch.int64), qweight.view(torch.int32)

        def launch(cfg: dict) -> None:
            grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
            _int8_gemv_kernel[grid](x64, q32, scales, b, y, n, k // 4, q32.stride(0), HAS_BIAS=has_bias, **cfg)

        launch(config or _pick_config(("int8", n, k), INT8_GEMV_CONFIGS, launch))
    elif path in ("gemv", "dot"):
        cfg = {**_dot_config(m, int4=False), **(config or {})}
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
        _int8_dot_kernel[grid](
            x2,
            qweight,
            scales,
            b,
            y,
            m,
            n,
            k,
            x2.stride(0),
            qweight.stride(0),
            y.stride(0),
            HAS_BIAS=has_bias,
            DOT_F32=_dot_f32(x),
            **cfg,
        )
    else:
        torch.mm(x2, dequantize_int8(qweight, scales, x.dtype).t(), out=y)
        if has_bias:
            y += bias.to(y.dtype)
    return y.view(*x.shape[:-1], n)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    path: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x @ W^T + bias`` with W in the own int4 group-wise format (see ``quantarena.ownquant``)."""
    n, k = qweight.shape[0], x.shape[-1]
    if qweight.shape[1] != (k + 1) // 2:
        raise ValueError(f"qweight has {qweight.shape[1]} bytes per row, expected {(k + 1) // 2} for K={k}")
    x2, y = _prepare(x, n, out)
    m = x2.shape[0]
    path = _pick_path(m, INT4_DOT_MAX_M, path)
    has_bias = bias is not None
    b = bias if has_bias else scales
    if path == "gemv" and m == 1 and _pow2_group(group_size) and _words_ok(x2, qweight, 8):
        x64, x32, q32 = x2.view(torch.int64), x2.view(torch.int32), qweight.view(torch.int32)
        groups = scales.shape[1]

        def launch(cfg: dict) -> None:
            grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
            _int4_gemv_kernel[grid](
                x64,
                x32,
                q32,
                scales,
                mins,
                b,
                y,
                n,
                k // 8,
                groups,
                q32.stride(0),
                scales.stride(0),
                HAS_BIAS=has_bias,
                GROUP=group_size,
                USE_ASM=_use_asm(),
                **cfg,
            )

        launch(config or _pick_config(("int4", n, k, group_size), INT4_GEMV_CONFIGS, launch))
    elif path in ("gemv", "dot"):
        cfg = {**_dot_config(m, int4=True), **(config or {})}
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
        _int4_dot_kernel[grid](
            x2,
            qweight,
            scales,
            mins,
            b,
            y,
            m,
            n,
            k,
            x2.stride(0),
            qweight.stride(0),
            scales.stride(0),
            y.stride(0),
            HAS_BIAS=has_bias,
            GROUP=group_size,
            ALIGNED=group_size % cfg["BLOCK_K"] == 0,
            DOT_F32=_dot_f32(x),
            **cfg,
        )
    else:
        torch.mm(x2, dequantize_int4(qweight, scales, mins, k, group_size, x.dtype).t(), out=y)
        if has_bias:
            y += bias.to(y.dtype)
    return y.view(*x.shape[:-1], n)


# ----------------------------------------------------------------------------- torch ops

# Custom ops keep torch.compile from tracing into the launchers: the graph sees one opaque op per
# linear, and CUDA graphs capture the Triton launches inside it.


@torch.library.custom_op("quantarena::int8_linear", mutates_args=())
def _int8_linear_op(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return int8_linear(x, qweight, scales, bias)


@_int8_linear_op.register_fake
def _(x, qweight, scales, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("quantarena::int4_linear", mutates_args=())
def _int4_linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return int4_linear(x, qweight, scales, mins, group_size, bias)


@_int4_linear_op.register_fake
def _(x, qweight, scales, mins, group_size, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
