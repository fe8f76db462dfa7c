import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantarena.tasks import EvalContext
from quantarena.tasks.perplexity import Perplexity, PerplexityConfig, sliding_windows


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def text(data_dir):
    return (data_dir / "wikitext2" / "wiki.test.raw").read_text()[:4000]


def evaluate(tiny_lm, text, data_dir, batch_size=2, **options):
    model, tokenizer = tiny_lm
    task = Perplexity(PerplexityConfig(**options), data_dir)
    return task.evaluate(EvalContext(model, tokenizer, torch.device("cpu"), batch_size, 0), text).metrics


def direct_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The transformers recipe, but with the exact count of tokens each window's loss averages over."""
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + max_length, ids.shape[1])
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        n = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * n
        count += n
        prev_end = end
        if end == ids.shape[1]:
            break
    return nll_sum, count


@pytest.mark.parametrize(
    ("seq_len", "max_length", "stride"), [(10, 4, 2), (11, 5, 3), (3, 8, 8), (9, 9, 1), (10, 4, 4)]
)
def test_windows_score_each_token_once(seq_len, max_length, stride):
    scored = []
    for w in sliding_windows(seq_len, max_length, stride):
        assert w.end - w.begin <= max_length
        first = max(w.end - w.target_len, w.begin + 1)
        scored += range(first, w.end)
    # Overlapping windows give every token after the first some context; disjoint windows
    # cannot score their own first token, as in the recipe.
    unscored = {0} if stride < max_length else set(range(0, seq_len, stride))
    assert sorted(scored) == [i for i in range(seq_len) if i not in unscored]


def test_single_window_equals_the_model_loss(tiny_lm, text, data_dir):
    model, tokenizer = tiny_lm
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :300]
    with torch.no_grad():
        expected = math.exp(model(ids, labels=ids).loss.item())
    got = evaluate(tiny_lm, text, data_dir, max_length=300, stride=300, max_tokens=300)
    assert got["n_tokens"] == 299
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("max_length", "stride"), [(128, 64), (100, 37), (64, 64)])
def test_sliding_window_equals_direct_computation(tiny_lm, text, data_dir, max_length, stride):
    model, tokenizer = tiny_lm
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :700]
    nll_sum, count = direct_nll(model, ids, max_length, stride)
    got = evaluate(tiny_lm, text, data_dir, max_length=max_length, stride=stride, max_tokens=700)
    assert got["n_tokens"] == count == (699 if stride < max_length else 699 - 700 // max_length)
    assert got["nll_mean"] == pytest.approx(nll_sum / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll_sum / count), rel=1e-5)


def test_batch_size_does_not_change_the_result(tiny_lm, text, data_dir):
    one = evaluate(tiny_lm, text, data_dir, batch_size=1, max_length=64, stride=32, max_tokens=500)
    many = evaluate(tiny_lm, text, data_dir, batch_size=5, max_length=64, stride=32, max_tokens=500)
    assert many["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert many["n_tokens"] == one["n_tokens"]


def test_stride_larger_than_window_is_rejected():
    with pytest.raises(ValueError, match="stride"):
        PerplexityConfig(max_length=64, stride=65)
