"""The Triton kernels against a float64 reference of the own formats.

Without a GPU the kernels run in Triton's interpreter on CPU tensors; with a GPU (and
TRITON_INTERPRET unset) the same tests run the compiled kernels.
"""

import os
import sys

import pytest
import torch

# triton.jit reads TRITON_INTERPRET when it wraps a function, triton's own library included: without a
# GPU it must be set before triton is first imported in this process.
_INTERPRET = not torch.cuda.is_available()
_previous = os.environ.get("TRITON_INTERPRET")
if _INTERPRET:
    if "triton" in sys.modules and _previous != "1":
        raise RuntimeError("triton was imported before tests/test_kernels.py without TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    from quantarena.ownquant import triton_kernels as triton_gemv
finally:
    if _previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _previous
assert triton_gemv.INTERPRETED == _INTERPRET, "the kernels module was imported earlier in the other mode"

from torch import nn  # noqa: E402

from quantarena.methods.base import replace_linears  # noqa: E402
from quantarena.ownquant.formats import (  # noqa: E402
    Int4WeightLinear,
    Int8WeightLinear,
    dequantize_int4_groupwise,
    dequantize_int8_per_channel,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)
from quantarena.ownquant.kernels import (  # noqa: E402
    int4_linear,
    int8_linear,
    kernel_summary,
    kernels_available,
    unavailable_reason,
    use_triton_kernels,
)

DEVICE = "cpu" if triton_gemv.INTERPRETED else "cuda"


@pytest.fixture(autouse=True)
def _interpreted(monkeypatch):
    # Also while the kernels run: triton imports some of its modules lazily, and they read it too.
    if triton_gemv.INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
PATHS = [None, "gemv", "dot", "dequant"]
# (M, N, K): M = 1, 3, 8 decode rows and a prefill-sized M; N and K off every block size.
SHAPES = [(1, 45, 200), (3, 33, 130), (8, 70, 257), (40, 50, 96)]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(y).any(), "output has NaN (an element left unwritten?)"
    return ((y.double() - ref).norm() / ref.norm()).item()


def inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen)
    return w, x, bias


def poisoned(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matches_float64(shape, path, dtype):
    m, n, k = shape
    w, x, bias = inputs(m, n, k, dtype, seed=m * 1000 + k)
    q, s = quantize_int8_per_channel(w)
    ref = x.double() @ dequantize_int8_per_channel(q, s).double().T + bias.double()
    out = poisoned(m, n, dtype)
    y = int8_linear(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), bias.to(DEVICE), out=out, path=path)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    assert rel_err(y.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", [32, 128, 24])
def test_int4_matches_float64(shape, path, group_size):
    m, n, k = shape
    dtype = torch.float32 if group_size == 24 else torch.bfloat16
    w, x, bias = inputs(m, n, k, dtype, seed=m * 1000 + k + group_size)
    packed, scales, mins = quantize_int4_groupwise(w, group_size)
    ref = x.double() @ dequantize_int4_groupwise(packed, scales, mins, k, group_size).double().T
    ref = ref + bias.double()
    out = poisoned(m, n, dtype)
    args = (packed.to(DEVICE), scales.to(DEVICE), mins.to(DEVICE), group_size, bias.to(DEVICE))
    y = int4_linear(x.to(DEVICE), *args, out=out, path=path)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(y.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("k", [128, 200, 264])
def test_int4_gemv_configs_and_partial_last_group(k):
    # group 64 with K = 128, 200, 264: whole groups, then a partial last group of 8 or 8 + 64.
    w, x, bias = inputs(1, 37, k, torch.bfloat16, seed=k)
    packed, scales, mins = quantize_int4_groupwise(w, 64)
    ref = x.double() @ dequantize_int4_groupwise(packed, scales, mins, k, 64).double().T + bias.double()
    args = (packed.to(DEVICE), scales.to(DEVICE), mins.to(DEVICE), 64, bias.to(DEVICE))
    for config in triton_gemv.INT4_GEMV_CONFIGS[:2] + triton_gemv.INT4_GEMV_CONFIGS[-1:]:
        out = poisoned(1, 37, torch.bfloat16)
        int4_linear(x.to(DEVICE), *args, out=out, path="gemv", config=config)
        assert rel_err(out.cpu(), ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("k", [96, 200])
def test_int8_gemv_configs(k):
    w, x, bias = inputs(1, 70, k, torch.bfloat16, seed=k)
    q, s = quantize_int8_per_channel(w)
    ref = x.double() @ dequantize_int8_per_channel(q, s).double().T + bias.double()
    for config in triton_gemv.INT8_GEMV_CONFIGS[:1] + triton_gemv.INT8_GEMV_CONFIGS[-1:]:
        out = poisoned(1, 70, torch.bfloat16)
        int8_linear(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), bias.to(DEVICE), out=out, config=config)
        assert rel_err(out.cpu(), ref) < TOL[torch.bfloat16]


def _run_ptx(asm: str, word: int) -> list[int]:
    """A tiny emulator of the and/shr/mov/prmt PTX in ``_NIBBLES_ASM`` (the interpreter cannot run it)."""
    regs = {"$8": word}

    def val(tok: str) -> int:
        return regs[tok] if tok in regs else int(tok, 0)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        if op.startswith("mov"):
            regs[d] = val(src[0])
        elif op.startswith("and"):
            regs[d] = val(src[0]) & val(src[1])
        elif op.startswith("shr"):
            regs[d] = val(src[0]) >> val(src[1])
        elif op.startswith("prmt"):
            pool = (val(src[1]) << 32 | val(src[0])).to_bytes(8, "little")
            sel = val(src[2])
            regs[d] = int.from_bytes(bytes(pool[(sel >> 4 * i) & 7] for i in range(4)), "little")
        else:
            raise AssertionError(f"unexpected PTX {line!r}")
    return [regs[f"${i}"] for i in range(8)]


def test_nibble_asm_matches_the_plain_unpacking():
    import struct

    asm = triton_gemv._NIBBLES_ASM.value
    gen = torch.Generator().manual_seed(3)
    for word in torch.randint(0, 2**32, (200,), generator=gen, dtype=torch.int64).tolist():
        floats = [struct.unpack("<f", struct.pack("<I", r))[0] for r in _run_ptx(asm, word)]
        assert floats == [128.0 + ((word >> 4 * i) & 15) for i in range(8)]


def test_leading_dims_and_no_bias():
    w, x, _ = inputs(6, 24, 64, torch.float32, seed=1)
    q, s = quantize_int8_per_channel(w)
    x3 = x.view(2, 3, 64)
    y = int8_linear(x3.to(DEVICE), q.to(DEVICE), s.to(DEVICE))
    assert y.shape == (2, 3, 24)
    ref = x.double() @ dequantize_int8_per_channel(q, s).double().T
    assert rel_err(y.reshape(6, 24).cpu(), ref) < TOL[torch.float32]


def test_bad_shapes_are_refused():
    w, x, _ = inputs(1, 8, 64, torch.float32, seed=2)
    packed, scales, mins = quantize_int4_groupwise(w, 32)
    with pytest.raises(ValueError, match="bytes per row"):
        int4_linear(x[:, :40].to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), mins.to(DEVICE), 32)
    with pytest.raises(ValueError, match="path"):
        int4_linear(x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), mins.to(DEVICE), 32, path="nope")


def test_kernels_available_needs_cuda():
    assert not kernels_available("cpu")
    assert "CUDA" in unavailable_reason("cpu")


def test_use_triton_kernels_swaps_forward_and_matches_pytorch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 8))
    model[-1].is_head = True
    assert replace_linears(model, lambda lin: Int4WeightLinear.from_linear(lin, 32), ("4",)) == 2
    model[2] = Int8WeightLinear.from_linear(nn.Linear(48, 40))
    assert isinstance(model[4], nn.Linear)  # skipped by name
    model = model.to(DEVICE)
    x = torch.randn(3, 64, device=DEVICE)
    expected = model(x)
    assert kernel_summary(model) == {"pytorch": 2}
    if DEVICE == "cpu":  # the arena's dispatch leaves CPU models on the portable path
        assert use_triton_kernels(model) == 0
    assert use_triton_kernels(model, interpret=triton_gemv.INTERPRETED) == 2
    assert kernel_summary(model) == {"triton": 2}
    assert [getattr(m, "kernel", None) for m in model] == ["triton", None, "triton", None, None]
    assert type(model[0]) is Int4WeightLinear and type(model[2]) is Int8WeightLinear
    assert rel_err(model(x).cpu(), expected.double().cpu()) < 1e-4


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fast_decode_loop_matches_hf_generate(compile):
    # Compiled: the whole step traced in one graph (fullgraph) through the static cache and the
    # kernels' custom ops; on a GPU it also replays as a CUDA graph.
    transformers = pytest.importorskip("transformers")
    from decode_loop import FastDecoder

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    model = transformers.LlamaForCausalLM(config).eval().to(DEVICE)
    replace_linears(model, lambda lin: Int4WeightLinear.from_linear(lin, 32), ("lm_head", "down_proj"))
    replace_linears(model, Int8WeightLinear.from_linear, ("lm_head",))
    ids = torch.randint(0, 256, (1, 7), device=DEVICE)
    expected = model.generate(
        ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert use_triton_kernels(model, interpret=triton_gemv.INTERPRETED) == 7
    assert kernel_summary(model) == {"triton": 7}
    decoder = FastDecoder(model, max_len=14, compile=compile)
    assert torch.equal(decoder.generate(ids, 5), expected)
    assert torch.equal(decoder.generate(ids, 5), expected)  # the cache resets between runs
