import torch
from torch import nn

from quantarena.measure import dir_bytes, peak_rss_bytes, weight_bytes
from quantarena.methods import METHODS
from quantarena.methods.torch_dynamic import TorchDynamicInt8Config


def test_plain_model_bytes_are_numel_times_element_size():
    model = nn.Sequential(nn.Linear(10, 20), nn.LayerNorm(20)).to(torch.float16)
    expected = sum(p.numel() * 2 for p in model.parameters())
    assert weight_bytes(model) == expected


def test_tied_weights_are_counted_once():
    emb = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    assert weight_bytes(nn.ModuleDict({"emb": emb, "head": head})) == 100 * 16 * 4


def test_buffers_are_counted():
    bn = nn.BatchNorm1d(8)
    # weight, bias, running mean, running var (fp32) + num_batches_tracked (int64)
    assert weight_bytes(bn) == 4 * 8 * 4 + 8


def test_torch_dynamic_int8_counts_packed_int8_weights():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    fp32 = weight_bytes(model)
    quantized = METHODS.get("torch-dynamic-int8").apply(model, TorchDynamicInt8Config(skip_modules=()))
    weights_int8 = 64 * 128 + 128 * 32
    biases_fp32 = (128 + 32) * 4
    weight_qparams = 2 * 16  # per-tensor scale (fp64) and zero point (int64) of each weight
    module_qparams = 2 * (4 + 8)  # each module's stored output scale (fp32) and zero point (int64)
    assert weight_bytes(quantized) == weights_int8 + biases_fp32 + weight_qparams + module_qparams
    assert weight_bytes(quantized) < fp32 / 3.5


def test_dir_bytes(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 5)
    assert dir_bytes(tmp_path) == 15


def _child_peak(queue) -> None:
    queue.put(peak_rss_bytes())


def test_a_spawned_cell_does_not_inherit_the_parents_peak_memory():
    import multiprocessing as mp

    ballast = bytearray(400 * 2**20)  # the sweep process after a fine-tune step, say
    ballast[::4096] = b"x" * len(ballast[::4096])
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_peak, args=(queue,))
    child.start()
    child_peak = queue.get(timeout=120)
    child.join()
    assert peak_rss_bytes() > 400 * 2**20
    assert child_peak < peak_rss_bytes() - 300 * 2**20
    del ballast
