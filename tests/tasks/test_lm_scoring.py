"""The log-likelihood scorer, the metric definitions and the divergence pieces, on tiny random models."""

from __future__ import annotations

import functools
import math
import statistics

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from quantarena.metrics import accuracy_stderr
from quantarena.report.stats import flipped_predictions
from quantarena.results import CellResult
from quantarena.tasks import loglik
from quantarena.tasks.base import TaskConfig
from quantarena.tasks.divergence import ReferenceCache, summarize, token_divergence
from quantarena.tasks.multiple_choice import pooled_stderr, predictions
from quantarena.tasks.wikitext import documents, rolling_requests


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    """float64, so the cached and the full computation agree to ~1e-12 and greedy flags are exact."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64).eval()


def direct(model, request: loglik.Request, max_length: int) -> tuple[float, bool, bool]:
    """lm-eval's own recipe: one forward of (context + continuation)[-(max_length+1):][:-1]."""
    tokens = list(request.context + request.continuation)[-(max_length + 1) :]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([tokens[:-1]])).logits[0], -1)
    n = len(request.continuation)
    targets = torch.tensor(request.continuation)
    scored = logprobs[-n:]
    hits = scored.argmax(-1) == targets
    return scored.gather(-1, targets[:, None]).sum().item(), bool(hits.all()), bool(hits[-1])


def requests_with_shared_contexts(seed: int = 0) -> list[loglik.Request]:
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(5, 3000, (n,), generator=gen).tolist())

    out = []
    for length in (3, 17, 9, 17, 1, 30):
        context = ids(length)
        out += [loglik.Request(context, ids(k)) for k in (1, 4, 2, 7)]
    return out


@pytest.mark.parametrize(("batch_size", "max_length"), [(1, 64), (2, 64), (8, 64), (3, 12)])
def test_scorer_equals_direct_computation(tiny_lm, batch_size, max_length):
    requests = requests_with_shared_contexts()
    # Duplicates of a greedy continuation, so the greedy flags are not all False.
    context = requests[0].context
    with torch.no_grad():
        greedy_token = tiny_lm(torch.tensor([context])).logits[0, -1].argmax().item()
    requests.append(loglik.Request(context, (greedy_token,)))
    scored = loglik.score(tiny_lm, requests, batch_size=batch_size, max_length=max_length, device=torch.device("cpu"))
    for request, score in zip(requests, scored.scores, strict=True):
        logprob, greedy, last_greedy = direct(tiny_lm, request, max_length)
        assert score.logprob == pytest.approx(logprob, abs=1e-9)
        assert (score.greedy, score.last_greedy) == (greedy, last_greedy)
    assert scored.scores[-1].greedy


def test_each_context_is_forwarded_once(tiny_lm):
    requests = requests_with_shared_contexts()
    scored = loglik.score(tiny_lm, requests, batch_size=64, max_length=64, device=torch.device("cpu"))
    # A unit per context: the context once, then each continuation but its last token.
    units = {r.context: len(r.context) for r in requests}
    for r in requests:
        units[r.context] += len(r.continuation) - 1
    widest = max(units.values())
    assert scored.n_forwards == 1
    # Rows as wide as the widest unit, shorter units sharing rows: less than one row per unit.
    assert widest * 2 <= scored.n_tokens_forwarded < widest * len(units)
    assert loglik.score(tiny_lm, requests, batch_size=1, max_length=64, device=torch.device("cpu")).n_forwards > 1


class NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes no ``logits_to_keep``; its output head exposed or not."""

    def __init__(self, model, expose_head: bool):
        super().__init__()
        self.inner, self.dtype = model, model.dtype
        if expose_head:
            self.get_output_embeddings = model.get_output_embeddings

    def forward(self, **inputs):
        return self.inner(**inputs)


def test_only_the_scored_positions_reach_the_output_head(tiny_lm):
    requests = requests_with_shared_contexts()
    seen = []
    hook = tiny_lm.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        scored = loglik.score(tiny_lm, requests, batch_size=3, max_length=64, device=torch.device("cpu"))
    finally:
        hook.remove()
    assert sum(shape[1] for shape in seen) == sum(len(r.continuation) for r in requests)
    assert all(shape[0] == 1 for shape in seen) and len(seen) == scored.n_forwards
    # Without logits_to_keep, with or without a reachable head: the same scores.
    for expose_head in (True, False):
        model = NoLogitsToKeep(tiny_lm, expose_head)
        plain = loglik.score(model, requests, batch_size=3, max_length=64, device=torch.device("cpu"))
        assert [s.logprob for s in plain.scores] == pytest.approx([s.logprob for s in scored.scores], abs=1e-9)
        assert [s.greedy for s in plain.scores] == [s.greedy for s in scored.scores]


def requests_with_shared_prefixes(seed: int = 1) -> list[loglik.Request]:
    """Few-shot-like: three long heads, each continued by several questions, one of them a single token and
    one empty (the context is the head itself); contexts sharing no long prefix; and one sharing the first
    head until left truncation to 150 positions cuts into it."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(5, 3000, (n,), generator=gen).tolist())

    out = []
    for head, questions in ((ids(90), (1, 12, 30, 5)), (ids(70), (8, 0, 2)), (ids(140), (10, 10, 25))):
        for n in questions:
            out += [loglik.Request(head + ids(n), ids(k)) for k in (1, 3, 2)]
    out += [loglik.Request(ids(n), ids(k)) for n, k in ((40, 2), (3, 1), (100, 4))]
    out.append(loglik.Request(out[0].context + ids(100), (11, 12)))
    return out


@pytest.mark.parametrize(("batch_size", "max_length"), [(1, 512), (3, 512), (64, 512), (4, 150)])
def test_shared_prefixes_score_as_whole_contexts(tiny_lm, monkeypatch, batch_size, max_length):
    requests = requests_with_shared_prefixes()
    cpu = torch.device("cpu")
    shared = loglik.score(tiny_lm, requests, batch_size=batch_size, max_length=max_length, device=cpu)
    for request, score in zip(requests, shared.scores, strict=True):
        logprob, greedy, last_greedy = direct(tiny_lm, request, max_length)
        assert score.logprob == pytest.approx(logprob, abs=1e-9)
        assert (score.greedy, score.last_greedy) == (greedy, last_greedy)
    monkeypatch.setattr(loglik, "SHARED_PREFIX", 10**6)
    whole = loglik.score(tiny_lm, requests, batch_size=batch_size, max_length=max_length, device=cpu)
    assert shared.n_tokens_forwarded < whole.n_tokens_forwarded


@pytest.mark.parametrize(
    ("max_length", "prefixes"),
    [
        # The second head is 70 tokens, but one context is that head itself: its last position must be
        # computed with its continuations, so 69 are shared.
        (512, [69, 90, 140]),
        # Truncation: the longest context no longer starts with the first head; the third head's contexts
        # lose 0, 1 or 2 tokens by continuation length (a group for each) and 15 to 17 for its longest
        # question (alone in its group: none).
        (150, [69, 90, 138, 139, 140]),
    ],
)
def test_each_shared_prefix_is_forwarded_once(tiny_lm, monkeypatch, max_length, prefixes):
    assert computed_prefixes(tiny_lm, monkeypatch, requests_with_shared_prefixes(), max_length) == prefixes


def computed_prefixes(model, monkeypatch, requests: list[loglik.Request], max_length: int) -> list[int]:
    """The lengths of the prefixes scoring ``requests`` computed, checking each was computed once, alone, just
    before the forwards that continue it, and the scorer's counters."""
    calls = []  # (input shape, cached positions) per model call
    forward = model.forward

    @functools.wraps(forward)
    def spy(input_ids, past_key_values=None, **kwargs):
        calls.append((tuple(input_ids.shape), 0 if past_key_values is None else past_key_values.get_seq_length()))
        return forward(input_ids=input_ids, past_key_values=past_key_values, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    scored = loglik.score(model, requests, batch_size=3, max_length=max_length, device=torch.device("cpu"))
    monkeypatch.undo()
    first = [i for i, (_, past) in enumerate(calls) if past and calls[i - 1][1] != past]
    assert all(calls[i - 1] == ((1, calls[i][1]), 0) for i in first)
    assert scored.n_forwards == len(calls)
    assert scored.n_tokens_forwarded == sum(rows * width for (rows, width), _ in calls)
    return sorted(calls[i][1] for i in first)


def test_a_common_opening_does_not_hide_longer_prefixes(tiny_lm, monkeypatch):
    """MMLU's shape: every subject opens with the same line, then its own examples. Sharing the line alone
    would save 12 positions per question; each subject's whole head saves far more."""
    gen = torch.Generator().manual_seed(2)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(5, 3000, (n,), generator=gen).tolist())

    opening = ids(12)
    requests = [
        loglik.Request(head + ids(n), ids(1)) for head in (opening + ids(60), opening + ids(80)) for n in (4, 9, 6)
    ]
    requests += [loglik.Request(opening + ids(n), ids(2)) for n in (30, 20)]
    assert computed_prefixes(tiny_lm, monkeypatch, requests, 512) == [72, 92]
    scored = loglik.score(tiny_lm, requests, batch_size=3, max_length=512, device=torch.device("cpu"))
    for request, score in zip(requests, scored.scores, strict=True):
        assert score.logprob == pytest.approx(direct(tiny_lm, request, 512)[0], abs=1e-9)


def test_shared_prefix_with_eager_attention(tiny_llama_dir):
    """Eager attention adds the mask to the scores itself; SDPA (the default) takes it as an argument. (The
    eager softmax is float32: agreement to ~1e-8, where a wrong mask or position is off by far more.)"""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64, attn_implementation="eager")
    requests = requests_with_shared_prefixes()
    scored = loglik.score(model.eval(), requests, batch_size=3, max_length=512, device=torch.device("cpu"))
    for request, score in zip(requests, scored.scores, strict=True):
        assert score.logprob == pytest.approx(direct(model, request, 512)[0], abs=1e-6)


def test_encode_pair_is_lm_evals():
    class Chars:  # one token per character: boundaries are visible
        bos_token_id, eos_token_id = None, 0

        def __call__(self, text):
            return type("Enc", (), {"input_ids": [ord(c) for c in text]})

    tok = Chars()
    assert loglik.encode_pair(tok, "Answer: ", "yes", 7) == loglik.Request(
        tuple(map(ord, "Answer:")), (32, *map(ord, "yes"))
    )
    assert loglik.encode_pair(tok, "", "yes", loglik.prefix_token_id(tok)) == loglik.Request(
        (0,), tuple(map(ord, "yes"))
    )


def test_continuation_longer_than_the_window_is_refused(tiny_lm):
    from quantarena.errors import DataError

    with pytest.raises(DataError, match="exceeds max_length 4"):
        loglik.score(tiny_lm, [loglik.Request((1,), (2,) * 5)], batch_size=1, max_length=4, device=torch.device("cpu"))


def test_acc_norm_divides_by_characters_and_ties_go_first():
    # acc: -10 beats -12; acc_norm: -12 / 6 characters beats -10 / 2.
    assert predictions([-10.0, -12.0], ("ab", "abcdef")) == (0, 1)
    assert predictions([-3.0, -3.0, -5.0], ("a", "b", "c")) == (0, 0)


def test_stderr_is_lm_evals_mean_stderr():
    scores = [1, 0, 1, 1, 0, 1, 1]
    expected = statistics.stdev(scores) / math.sqrt(len(scores))
    assert accuracy_stderr(sum(scores) / len(scores), len(scores)) == pytest.approx(expected, rel=1e-12)


def test_pooled_stderr_is_lm_evals():
    metrics = pytest.importorskip("lm_eval.api.metrics")
    stderrs, sizes = [0.1, 0.05, 0.2], [10, 40, 5]
    assert pooled_stderr(stderrs, sizes) == pytest.approx(metrics.pooled_sample_stderr(stderrs, sizes), rel=1e-12)


def test_rolling_windows_are_lm_evals():
    utils = pytest.importorskip("lm_eval.utils")
    for n_tokens, max_length in [(1, 4), (4, 4), (5, 4), (11, 4), (23, 7)]:
        tokens = list(range(100, 100 + n_tokens))
        theirs = [
            utils.make_disjoint_window(w)
            for w in utils.get_rolling_token_windows(tokens, prefix_token=1, max_seq_len=max_length, context_len=1)
        ]
        ours = rolling_requests(tokens, 1, max_length)
        assert [(list(r.context), list(r.continuation)) for r in ours] == theirs


def test_documents_split_at_top_level_headings():
    raw = " \n = A = \n \n text a \n = = Sub = = \n more \n = B = \n text b \n"
    pages = documents(raw)
    assert [p.splitlines()[0].strip() for p in pages] == ["= A =", "= B ="]
    assert "= = Sub = =" in pages[0]


def test_limit_takes_the_first_n_or_a_seeded_sample():
    items = list(range(100))
    assert TaskConfig(limit=5).select(items) == [0, 1, 2, 3, 4]
    sample = TaskConfig(limit=10, limit_seed=3).select(items)
    assert sample == sorted(sample) and len(set(sample)) == 10 and sample != items[:10]
    assert TaskConfig(limit=10, limit_seed=3).select(items) == sample
    assert TaskConfig(limit=10, limit_seed=4).select(items) != sample
    assert TaskConfig().select(items) == items and TaskConfig(limit=500).select(items) == items


def test_kl_matches_scipy_and_top1_flags():
    gen = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(6, 50, generator=gen, dtype=torch.float64), -1)
    q = torch.log_softmax(p + 0.3 * torch.randn(6, 50, generator=gen, dtype=torch.float64), -1)
    kl, same = token_divergence(p, q)
    expected = [entropy(p[i].exp().numpy(), q[i].exp().numpy()) for i in range(6)]
    assert kl.double().numpy() == pytest.approx(expected, rel=1e-5)
    assert same.tolist() == (p.argmax(-1) == q.argmax(-1)).tolist()
    zero, all_same = token_divergence(p, p)
    assert zero.abs().max() < 1e-6 and all_same.all()


def test_summary_of_a_variant():
    rng = np.random.default_rng(0)
    kl = rng.exponential(0.01, 1000)
    nll_ref = rng.normal(3.0, 1.0, 1000)
    nll = nll_ref + rng.normal(0.02, 0.05, 1000)
    same = rng.random(1000) < 0.9
    s = summarize(kl, same, nll_ref, nll)
    assert s["kl_mean"] == pytest.approx(kl.mean()) and s["kl_p99"] == pytest.approx(np.percentile(kl, 99))
    assert s["kl_median"] == pytest.approx(np.median(kl))
    assert s["top1_agreement"] == pytest.approx(same.mean())
    assert s["delta_perplexity"] == pytest.approx(math.exp(nll.mean()) - math.exp(nll_ref.mean()))
    assert s["ln_ppl_ratio"] == pytest.approx((nll - nll_ref).mean())
    # Paired: the Δ's uncertainty is far below either perplexity's own.
    alone = math.exp(nll.mean()) * nll.std(ddof=1) / math.sqrt(1000)
    assert 0 < s["delta_perplexity_stderr"] < alone / 5
    identical = summarize(np.zeros(10), np.ones(10, bool), nll_ref[:10], nll_ref[:10])
    assert identical["delta_perplexity"] == 0 and identical["delta_perplexity_stderr"] == 0


def test_flipped_predictions_pair_on_the_same_examples():
    def cell(predictions, labels=(0, 1, 2, 1)):
        return CellResult("m", "x", "t", "ok", per_example={"predictions": predictions, "labels": list(labels)})

    assert flipped_predictions(cell([0, 1, 2, 1]), cell([0, 2, 0, 1])) == 2
    assert flipped_predictions(cell([0, 1, 2, 1]), cell([0, 1, 2, 1], labels=(1, 1, 1, 1))) is None
    assert flipped_predictions(cell([0, 1]), cell([0, 1, 2, 1])) is None


def test_reference_cache_round_trip(tmp_path):
    cache = ReferenceCache(tmp_path / "div")
    assert cache.get("k") is None
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.put("k", data, {"model": "x"})
    assert np.array_equal(cache.get("k"), data)
    assert not [p for p in (tmp_path / "div").iterdir() if p.name.startswith(".")]


def test_padding_and_scored_positions_are_counted(tiny_lm):
    requests = requests_with_shared_contexts()
    scored = loglik.score(tiny_lm, requests, batch_size=3, max_length=64, device=torch.device("cpu"))
    real = sum(u.length for u in loglik._units(requests))  # contexts shorter than SHARED_PREFIX: nothing shared
    assert scored.n_tokens_forwarded - scored.n_padding_tokens == real
    assert scored.n_scored_tokens == sum(len(r.continuation) for r in requests)


def units_of(lengths: list[int]) -> list[loglik._Unit]:
    return [loglik._Unit((i,), (i,), n) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("seed", range(5))
def test_packs_hold_every_unit_once_within_their_rows(seed):
    rng = np.random.default_rng(seed)
    lengths = sorted(rng.integers(1, 300, size=int(rng.integers(1, 200))).tolist(), reverse=True)
    forwards = loglik._packs(units_of(lengths), batch_size=8)
    packed = [u for rows in forwards for row in rows for u in row]
    assert sorted(u.length for u in packed) == sorted(lengths) and len({u.context for u in packed}) == len(lengths)
    for rows in forwards:
        longest = max(u.length for row in rows for u in row)
        widest = max(sum(u.length for u in row) for row in rows)
        assert len(rows) <= 8 and widest <= 2 * longest
        assert len(rows) * widest <= loglik.ROW_TOKENS or len(rows) == 1


def test_wider_rows_pair_units_the_narrowest_would_pad():
    """0-shot MMLU's ten questions of a subject (lengths seen on SmolLM2): rows as wide as the longest pad 31% of
    two forwards; rows 1.25x as wide hold two questions each, one forward, 11% padding."""
    lengths = [74, 48, 47, 46, 45, 43, 41, 39, 39, 37]
    forwards = loglik._packs(units_of(lengths), batch_size=8)
    assert len(forwards) == 1
    width = max(sum(u.length for u in row) for row in forwards[0])
    assert sum(lengths) / (len(forwards[0]) * width) > 0.85
