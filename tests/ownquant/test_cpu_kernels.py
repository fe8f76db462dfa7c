"""own-int8 and own-int4 on the CPU through the own AVX2 int4 kernel and PyTorch's packed-weight kernels: prompts
give exactly the portable path's numbers, decode steps the same within the kernels' activation rounding (int16 per
group for the own kernel, bf16 for PyTorch's), the own tensors come back when saving, and the weight bytes are
what the layers hold."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from quantarena import numerics
from quantarena.measure import weight_bytes
from quantarena.methods import METHODS
from quantarena.ownquant import Int4WeightLinear, Int8WeightLinear, kernel_summary
from quantarena.ownquant.cpu import Int4PackedCpuLinear, avx2_kernels_unavailable, use_cpu_kernels

# The kernels own CPU models run where both fit: the own ones wherever they build.
INT4_KERNEL = "int4pack_mm" if avx2_kernels_unavailable() else "int4_avx2"
INT8_KERNEL = "int8pack_mm" if avx2_kernels_unavailable() else "int8_avx2"
needs_avx2_kernel = pytest.mark.skipif(avx2_kernels_unavailable() is not None, reason=str(avx2_kernels_unavailable()))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def same_fp32(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """The same fp32 arithmetic on the same weights: MKL may round a last bit differently on a differently
    aligned (freshly dequantized) weight, nothing more."""
    return y.dtype == ref.dtype == torch.float32 and torch.allclose(y, ref, rtol=1e-6, atol=1e-7)


def own_int4(n: int, k: int, group_size: int, bias: bool, seed: int = 0) -> Int4WeightLinear:
    torch.manual_seed(seed)
    return Int4WeightLinear.from_linear(nn.Linear(k, n, bias=bias), group_size)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "n, k, group_size",
    # (32, 128, 32): one row block on AVX2, (64, 128, 32) one on AVX512, (64, 512, 256) two on AVX2, ...
    [(32, 128, 32), (64, 128, 32), (96, 256, 64), (128, 384, 128), (64, 512, 256)],
)
def test_int4_kernel_form_holds_the_own_tensors_and_matches_the_portable_path(n, k, group_size, bias):
    own = own_int4(n, k, group_size, bias)
    packed = Int4PackedCpuLinear.from_own(own)
    if n % (64 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 32):
        assert packed is None  # a partial row block of the kernel's layout: the layer stays as it is
        return
    assert packed is not None
    back = packed.own_tensors()
    assert torch.equal(back["qweight"], own.qweight)
    assert torch.equal(back["scales"], own.scales) and torch.equal(back["mins"], own.mins)
    assert ("bias" in back) == bias
    with torch.inference_mode():
        for shape in [(1, k), (7, k), (2, 5, k)]:  # prompts and plain batches: the portable path's numbers
            x = torch.randn(*shape)
            assert same_fp32(packed(x), own(x))
        for batch in (1, 3):  # decode steps: the kernel
            x = torch.randn(batch, 1, k)
            y = packed(x)
            assert y.shape == (batch, 1, n) and y.dtype == torch.float32
            assert rel_err(y, own(x)) < 1e-2
        with numerics.exact():  # scoring: one position per row is no decode step
            assert same_fp32(packed(x), own(x))
    assert torch.equal(packed.dequantize(), own.dequantize())


def test_the_own_kernels_build_wherever_they_can():
    """A machine with AVX2 and a compiler (this one, CI) must build it: a failed build is a defect, not a skip."""
    from quantarena.environment import cxx_compiler

    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and cxx_compiler():
        assert avx2_kernels_unavailable() is None


def test_without_the_own_kernels_the_own_formats_run_pytorchs(monkeypatch):
    from quantarena.ownquant import cpu

    monkeypatch.setattr(cpu, "avx2_kernels_unavailable", lambda: "needs a C++ compiler to build it (none on PATH)")
    model = nn.Sequential(own_int4(64, 128, 32, bias=False), Int8WeightLinear.from_linear(nn.Linear(64, 32)))
    assert use_cpu_kernels(model) == 2 and kernel_summary(model) == {"int4pack_mm": 1, "int8pack_mm": 1}


@needs_avx2_kernel
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "n, k, group_size",
    # one 4-row block; rows not a multiple of 4 (a tail of single rows); one group a row; long groups
    [(4, 64, 32), (37, 128, 64), (96, 256, 128), (64, 512, 256)],
)
def test_own_int4_kernel_reads_the_own_tensors_in_place_and_matches_the_portable_path(n, k, group_size, bias):
    own = own_int4(n, k, group_size, bias)
    portable = copy.deepcopy(own)
    model = nn.Sequential(own)
    tensors = {name: t.clone() for name, t in model.state_dict().items()}
    assert use_cpu_kernels(model) == 1 and kernel_summary(model) == {"int4_avx2": 1}
    assert all(torch.equal(t, tensors[name]) for name, t in model.state_dict().items())
    assert weight_bytes(model) == weight_bytes(nn.Sequential(portable))
    with torch.inference_mode():
        for shape in [(1, k), (7, k), (2, 5, k)]:  # prompts and plain batches: the portable path's numbers
            x = torch.randn(*shape)
            assert same_fp32(model(x), portable(x))
        for batch in (1, 3):  # decode steps: the kernel, int16 activations per group
            x = torch.randn(batch, 1, k)
            x[0, 0, :group_size] *= 1e3  # one loud group must not drown the others (each has its own scale)
            y = model(x)
            assert y.shape == (batch, 1, n) and y.dtype == torch.float32
            reference = x.double() @ own.dequantize().double().T + (own.bias.double() if bias else 0)
            assert rel_err(y, reference) < 1e-4
        with numerics.exact():  # scoring: one position per row is no decode step
            assert same_fp32(model(x), portable(x))


@needs_avx2_kernel
@pytest.mark.parametrize("n, k, group_size", [(4, 64, 32), (37, 128, 64), (96, 256, 128), (64, 512, 256)])
def test_own_dequantize_is_the_portable_paths_bit_for_bit(n, k, group_size):
    """Prompts and scoring multiply these weights: any difference would change scores."""
    own = own_int4(n, k, group_size, bias=False)
    own.scales.mul_(torch.rand_like(own.scales.float()).half() * 7)  # scales and mins other than one init's
    own.mins.sub_(torch.rand_like(own.mins.float()).half())
    out = torch.full((n, k), float("nan"))
    torch.ops.quantarena_cpu.int4_dequantize(own.qweight, own.scales, own.mins, group_size, out)
    assert torch.equal(out, own.dequantize())
    int8 = Int8WeightLinear.from_linear(nn.Linear(k, n))
    out = torch.full((n, k), float("nan"))
    torch.ops.quantarena_cpu.int8_dequantize(int8.qweight, int8.scales, out)
    assert torch.equal(out, int8.dequantize())


@needs_avx2_kernel
def test_own_int4_kernel_propagates_nan_and_inf_and_reads_zeros():
    own = own_int4(8, 128, 64, bias=False)
    model = nn.Sequential(own)
    use_cpu_kernels(model)
    x = torch.zeros(3, 1, 128)
    x[1, 0, 5] = float("nan")
    x[2, 0, 70] = float("inf")
    with torch.inference_mode():
        y = model(x)
    assert torch.allclose(y[0], torch.zeros(1, 8))  # an all-zero group has no scale to divide by
    assert torch.isnan(y[1]).all() and not torch.isfinite(y[2]).any()


@pytest.mark.parametrize(
    "n, k, group_size",
    [
        (45, 128, 64),  # rows not a multiple of the kernel's 16
        (64, 160, 64),  # a partial last group
        (64, 128, 16),  # a group size neither kernel takes
    ],
)
def test_layers_the_kernels_cannot_hold_keep_the_portable_path(n, k, group_size):
    own = own_int4(n, k, group_size, bias=False)
    assert Int4PackedCpuLinear.from_own(own) is None
    model = nn.Sequential(own)
    x = torch.randn(2, k)
    with torch.inference_mode():
        ref = model(x)
        assert use_cpu_kernels(model, own_kernels=False) == 0
        assert torch.equal(model(x), ref)
    assert kernel_summary(model) == {"pytorch": 1}


@pytest.mark.parametrize("own_kernels", [True, False])
def test_int8_kernels_read_the_own_tensors_in_place(own_kernels):
    torch.manual_seed(0)
    model = nn.Sequential(
        Int8WeightLinear.from_linear(nn.Linear(96, 48)),
        nn.ReLU(),
        Int8WeightLinear.from_linear(nn.Linear(48, 40, bias=False)),
        Int8WeightLinear.from_linear(nn.Linear(40, 32)),  # 40 inputs: not the own kernel's multiple of 16
    )
    kernel = INT8_KERNEL if own_kernels else "int8pack_mm"
    prompt, step = torch.randn(2, 3, 96), torch.randn(3, 1, 96)
    step[0, 0, :8] *= 1e3  # one loud block of activations
    with torch.inference_mode():
        ref_prompt = model(prompt)
        first_two = nn.Sequential(*model[:3])
        ref_step = copy.deepcopy(first_two).double()(step.double())
        tensors = {k: v.clone() for k, v in model.state_dict().items()}
        assert use_cpu_kernels(model, own_kernels) == 3
        assert same_fp32(model(prompt), ref_prompt)
        tolerance = 1e-4 if kernel == "int8_avx2" else 1e-2  # int16 activations per block of 64, or bf16
        assert rel_err(first_two(step), ref_step) < tolerance
    assert kernel_summary(model) == {kernel: 2, "int8pack_mm": 1} if kernel == "int8_avx2" else {kernel: 3}
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())


def test_weight_bytes_count_what_the_kernel_form_holds():
    own = own_int4(64, 128, 32, bias=True)
    portable = weight_bytes(nn.Sequential(own))
    held = weight_bytes(nn.Sequential(Int4PackedCpuLinear.from_own(own)))
    # The own tensors' bytes (the codes in the kernel's layout) and the kernel's bf16 scale and zero point.
    scale_bytes = own.scales.numel() * own.scales.element_size()
    assert held == portable + 2 * scale_bytes


@pytest.mark.parametrize(
    "method_name, kernel",
    [("own-int4", "auto"), ("own-int4", "torch-packed"), ("own-int8", "auto"), ("own-int8", "torch-packed")],
)
def test_method_runs_the_kernels_saves_the_own_format_and_reloads_them(tiny_llama_dir, tmp_path, method_name, kernel):
    method = METHODS.get(method_name)
    ids = torch.randint(0, 30522, (2, 11))

    def quantized(kernel: str) -> nn.Module:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        return method.apply(model, method.config_cls(kernel=kernel))

    fast, portable = quantized(kernel), quantized("pytorch")
    fast_kernels = kernel_summary(fast)
    assert kernel_summary(portable) == {"pytorch": 14}
    assert sum(fast_kernels.values()) == 14
    # Every layer whose shape the kernel takes on any CPU runs it (the 160-wide down projection has a partial
    # int4 group and stays portable).
    int8_kernel = INT8_KERNEL if kernel == "auto" else "int8pack_mm"
    expected = {int8_kernel: 14} if method_name == "own-int8" else None
    if expected:
        assert fast_kernels == expected
    else:
        int4_kernel = INT4_KERNEL if kernel == "auto" else "int4pack_mm"
        assert fast_kernels.get(int4_kernel, 0) >= 4 and fast_kernels.get("pytorch", 0) >= 2
    with torch.inference_mode():
        assert same_fp32(fast(input_ids=ids).logits, portable(input_ids=ids).logits)
        fast_tokens = fast.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        portable_tokens = portable.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        # A random model's next-token margins are tiny, so only the first step (the prompt) must agree exactly.
        assert fast_tokens[0, 11] == portable_tokens[0, 11]

    method.save(fast, tmp_path / "fast")
    method.save(portable, tmp_path / "portable")
    fast_tensors, portable_tensors = (load_file(tmp_path / d / "model.safetensors") for d in ("fast", "portable"))
    assert fast_tensors.keys() == portable_tensors.keys()
    assert all(torch.equal(fast_tensors[k], portable_tensors[k]) for k in fast_tensors)

    reloaded = method.reloader(tmp_path / "fast", "cpu")
    assert kernel_summary(reloaded) == fast_kernels
    assert weight_bytes(reloaded) == weight_bytes(fast)
    assert kernel_summary(method.reloader(tmp_path / "portable", "cpu")) == {"pytorch": 14}
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids).logits, fast(input_ids=ids).logits)


def test_a_checkpoint_naming_an_unknown_kernel_is_refused(tiny_llama_dir, tmp_path):
    from quantarena.errors import ModelError

    method = METHODS.get("own-int8")
    model = method.apply(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), method.config_cls())
    method.save(model, tmp_path / "q")
    qmap = tmp_path / "q" / "quantarena_quant.json"
    qmap.write_text(json.dumps(json.loads(qmap.read_text()) | {"kernel": "fastest"}))
    with pytest.raises(ModelError, match="unknown kernel 'fastest'"):
        method.reloader(tmp_path / "q", "cpu")


def test_scores_are_the_portable_paths_in_a_sweep(tmp_path, tiny_llama_dir):
    """Scoring tasks run on exact numerics: single-token continuations (one position per row, which looks like
    a decode step) score as with the portable path, not with the kernels' bf16 activations."""
    import quantarena

    config = quantarena.sweep_config(
        {
            "model": str(tiny_llama_dir),
            "methods": [
                {"name": "own-int4", "label": "fast"},
                {"name": "own-int4", "kernel": "pytorch", "label": "portable"},
            ],
            "tasks": [{"name": "mmlu", "limit": 6}, {"name": "lambada", "limit": 6}],
            "output_dir": str(tmp_path),
            "executor": "inline",
        }
    )
    cells = {(c.method, c.task_name): c for c in quantarena.run(config).cells}
    for task in ("mmlu", "lambada"):
        fast, portable = cells["fast", task], cells["portable", task]
        assert fast.status == portable.status == "ok"
        assert fast.measurements["linear_kernels"].get(INT4_KERNEL)
        assert portable.measurements["linear_kernels"] == {"pytorch": 14}
        assert "float_linear_kernels" not in portable.measurements  # the head of the portable path: nn.Linear
        if not avx2_kernels_unavailable():
            assert fast.measurements["float_linear_kernels"] == {"fp32_avx2": 1}
        for key, values in fast.per_example.items():
            # The same fp32 arithmetic; MKL may round a last bit differently on a differently aligned weight.
            assert np.allclose(values, portable.per_example[key], rtol=1e-6, atol=0), key
        assert fast.metrics[fast.quality_metric] == portable.metrics[portable.quality_metric]


def test_decode_steps_compile_in_one_graph():
    """The kernels are opaque ops (custom ops; the own kernel a C++ op with a fake) and the exact-numerics flag a
    plain global, so a compiled decode step has no graph break (torch.compile cannot trace a ContextVar, and
    Inductor's lowering of the aten ops asserts a realized bf16 input)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        Int4PackedCpuLinear.from_own(own_int4(64, 128, 32, bias=True)),
        Int8WeightLinear.from_linear(nn.Linear(64, 32)),
        own_int4(16, 32, 32, bias=True),
    )
    assert use_cpu_kernels(model) == 2
    x = torch.randn(2, 1, 128)
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert torch.allclose(compiled, eager, rtol=1e-2, atol=1e-3)


@needs_avx2_kernel
@pytest.mark.parametrize("n, k", [(1, 8), (7, 13), (96, 576), (130, 64)])
def test_fp32_gemv_is_the_float_product(n, k):
    """Every row (a partial block of four too) and every column (past the last vector of eight too)."""
    torch.manual_seed(0)
    weight, x = torch.randn(n, k), torch.randn(1, k)
    y = torch.ops.quantarena_cpu.fp32_gemv(x, weight)
    reference = (x.double() @ weight.double().T).float()
    assert y.shape == (1, n) and torch.allclose(y, reference, rtol=1e-5, atol=1e-5)
    x[0, k // 2] = float("nan")
    assert torch.isnan(torch.ops.quantarena_cpu.fp32_gemv(x, weight)).all()


@needs_avx2_kernel
def test_float_layers_take_the_gemv_only_in_one_token_decode_steps():
    from quantarena.ownquant.cpu import float_kernel_summary, use_float_gemv

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), own_int4(40, 48, 16, bias=False), nn.Linear(40, 24).half())
    reference = copy.deepcopy(model)
    assert use_float_gemv(model) == 1  # fp32 only: the own layer and the half one keep their paths
    assert float_kernel_summary(model) == {"fp32_avx2": 1} and float_kernel_summary(reference) == {}
    head = model[0]

    def runs_the_gemv(x: torch.Tensor) -> bool:
        with torch.profiler.profile() as profile:
            head(x)
        return any(event.name == "quantarena_cpu::fp32_gemv" for event in profile.events())

    with torch.inference_mode():
        step = torch.randn(1, 1, 64)
        assert runs_the_gemv(step) and torch.allclose(head(step), reference[0](step), rtol=1e-5, atol=1e-6)
        for other in (torch.randn(3, 1, 64), torch.randn(1, 5, 64)):  # batches and prompts: nn.Linear itself
            assert not runs_the_gemv(other) and torch.equal(head(other), reference[0](other))
        with numerics.exact():
            assert not runs_the_gemv(step)
    x = torch.randn(1, 1, 64, requires_grad=True)
    head(x).sum().backward()  # autograd: nn.Linear, so gradients flow
    assert x.grad is not None and head.weight.grad is not None


def test_own_models_run_their_float_head_through_the_gemv(tiny_llama_dir, tmp_path):
    from quantarena.ownquant.cpu import float_kernel_summary

    method = METHODS.get("own-int4")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    fast = method.apply(copy.deepcopy(model), method.config_cls())
    portable = method.apply(model, method.config_cls(kernel="pytorch"))
    expected = {} if avx2_kernels_unavailable() else {"fp32_avx2": 1}
    assert float_kernel_summary(fast) == expected and float_kernel_summary(portable) == {}
    method.save(fast, tmp_path / "q")
    assert float_kernel_summary(method.reloader(tmp_path / "q", "cpu")) == expected
