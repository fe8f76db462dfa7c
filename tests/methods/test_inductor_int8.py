"""inductor-int8: static int8 (calibrated on SST-2 train) through torch.export, torchao's PT2E x86 quantizer and
Inductor. Compiling takes tens of seconds, so the compiled paths are marked slow."""

import importlib.util
from functools import partial

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from quantarena.errors import ModelError
from quantarena.measure import dir_bytes, weight_bytes
from quantarena.methods import METHODS
from quantarena.methods.calibration import calibration_batches

# Not importorskip: importing torchao imports triton, which tests/test_kernels.py must import first (interpreted).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
METHOD = METHODS.get("inductor-int8")


def test_refuses_a_model_that_is_not_a_sequence_classifier(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(ModelError, match="sequence classifiers only; this model is a LlamaForCausalLM"):
        METHOD.apply(model, METHOD.config_cls())


def test_declares_cpu_only():
    assert METHOD.requires.unmet("cuda") == "needs device cpu, sweep runs on cuda"


@pytest.mark.slow
def test_int8_graph_matches_fp32_counts_true_bytes_and_round_trips(tiny_bert_dir, data_dir, tmp_path):
    # Imported here, for the same reason.
    from torch._dynamo.utils import counters

    fp32 = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    calibration = partial(calibration_batches, tokenizer, data_dir, torch.device("cpu"))
    with torch.no_grad():
        model = METHOD.quantize(
            AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval(),
            METHOD.config_cls(calibration_examples=16),
            calibration,
        )
    compiled = counters["frames"]["ok"]  # both compiles happen while quantizing

    # Every Linear (6 per layer, the pooler, the head) holds its weight as int8 and nothing else:
    # the float weights convert_pt2e leaves beside them are dropped.
    linears = [m for m in fp32.modules() if isinstance(m, nn.Linear)]
    int8 = [t for t in model.graph.buffers() if t.dtype == torch.int8]
    assert sorted(t.numel() for t in int8) == sorted(m.weight.numel() for m in linears)
    linear_fp32_bytes = sum(m.weight.numel() * 4 for m in linears)
    saved = weight_bytes(fp32) - weight_bytes(model)
    channels = sum(m.out_features for m in linears)
    # 3 of 4 weight bytes saved, less the per-channel scale and zero point (at most 16 bytes each).
    assert linear_fp32_bytes * 3 / 4 - 16 * channels <= saved <= linear_fp32_bytes * 3 / 4

    texts = ["a gripping, funny film", "dull", "the plot goes nowhere and the actors know it", "fine"]
    inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    with torch.inference_mode():
        reference = fp32(**inputs).logits.double()
        logits = model(**inputs).logits
        single = model(**{k: v[:1] for k, v in inputs.items()}).logits
    assert torch.isfinite(logits).all()
    assert ((logits.double() - reference).norm() / reference.norm()).item() < 0.1
    torch.testing.assert_close(single, logits[:1], rtol=1e-4, atol=1e-5)  # a batch of one: its own compile
    # Other sizes, inference mode or not, tensors made in it or not (the classification task's batches and
    # its latency samples): none compiles again.
    longer = dict(tokenizer([*texts[:3], " ".join(texts)], padding=True, return_tensors="pt"))
    with torch.no_grad():
        model(**longer)
        model(**{k: v[2:3] for k, v in longer.items()})
    assert counters["frames"]["ok"] == compiled

    METHOD.save(model, tmp_path / "q")
    # The program holds the quantized tensors and, besides, its graph and metadata (under 2 MB).
    assert weight_bytes(model) < dir_bytes(tmp_path / "q") < weight_bytes(model) + 2_000_000
    reloaded = METHOD.reloader(tmp_path / "q", "cpu")
    with torch.inference_mode():
        assert torch.equal(reloaded(**inputs).logits, logits)
    with pytest.raises(ModelError, match="graph takes"):
        reloaded(input_ids=inputs["input_ids"])
