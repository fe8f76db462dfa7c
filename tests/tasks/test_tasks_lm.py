"""The language-model tasks in a sweep (tiny random Llama, every task, two methods), and their bad-input errors."""

from __future__ import annotations

import json

import pytest

import quantarena
from quantarena.config import sweep_config
from quantarena.errors import ConfigError, DataError
from quantarena.tasks import TASKS

LM_TASKS = [
    {"name": "arc_easy", "limit": 6},
    {"name": "arc_challenge", "limit": 4, "limit_seed": 1},
    {"name": "mmlu", "subjects": ["anatomy", "virology"], "limit": 2, "num_fewshot": 1},
    {"name": "hellaswag", "limit": 4},
    {"name": "lambada", "limit": 6},
    {"name": "wikitext", "limit": 1, "max_length": 64, "window_max_tokens": 128, "window_length": 64, "stride": 32},
    {"name": "divergence", "max_tokens": 48, "max_length": 32, "stride": 16},
    {"name": "generation", "prompt_tokens": 8, "new_tokens": 3, "repeats": 2},
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("lm-sweep")
    config = sweep_config(
        {
            "model": str(tiny_llama_dir),
            "methods": ["fp32", "own-int8"],
            "tasks": LM_TASKS,
            "output_dir": str(out / "run"),
            "executor": "inline",
            "batch_size": 4,
        }
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("QUANTARENA_CACHE", str(out / "cache"))
    try:
        yield quantarena.run(config), out
    finally:
        mp.undo()


def cell(results, task: str, method: str):
    return next(c for c in results.cells if c.task_name == task and c.method == method)


def test_every_lm_task_runs_for_every_method(sweep):
    results, _ = sweep
    assert [(c.task_name, c.method, c.status, c.reason) for c in results.cells if c.status != "ok"] == []
    assert len(results.cells) == len(LM_TASKS) * 2


def test_multiple_choice_records(sweep):
    results, _ = sweep
    arc = cell(results, "arc_easy", "fp32")
    per = arc.per_example
    assert len(per["labels"]) == 6 and all(len(lp) == 4 for lp in per["choice_logprobs"])
    assert arc.metrics["acc"] == sum(p == y for p, y in zip(per["predictions"], per["labels"], strict=True)) / 6
    mmlu = cell(results, "mmlu", "own-int8")
    assert set(mmlu.metrics["subjects"]) == {"anatomy", "virology"}
    assert mmlu.metrics["categories"]["stem"]["n"] == 2 and mmlu.metrics["categories"]["other"]["n"] == 2


def test_divergence_against_the_baseline(sweep):
    results, out = sweep
    base, variant = cell(results, "divergence", "fp32"), cell(results, "divergence", "own-int8")
    assert base.metrics["kl_mean"] == pytest.approx(0, abs=1e-6) and base.metrics["top1_agreement"] == 1
    assert variant.metrics["kl_mean"] > 0 and variant.metrics["kl_p99"] >= variant.metrics["kl_median"]
    assert variant.metrics["reference_perplexity"] == pytest.approx(base.metrics["perplexity"], rel=1e-6)
    # The baseline's outputs were computed once and cached for the variant.
    cached = list((out / "cache" / "divergence").glob("*.npy"))
    assert len(cached) == 1
    assert json.loads(cached[0].with_suffix(".json").read_text())["reference"]["method"][0] == "fp32"


def test_generation_latency(sweep):
    results, _ = sweep
    m = cell(results, "generation", "own-int8").metrics
    assert m["prompt_tokens"] == 8 and m["new_tokens"] == 3 and len(m["decode_ms_per_token_samples"]) == 2
    assert m["decode_tokens_per_s"] == pytest.approx(1000 / m["decode_ms_per_token"])
    assert m["prefill_ms"] > 0 and m["peak_memory_bytes"] > 0


def test_report_shows_flips_and_divergence(sweep):
    _, out = sweep
    text = (out / "run" / "results.md").read_text()
    assert "Flipped" in text and "KL mean" in text


def test_wikitext_reports_both_perplexities(sweep):
    results, _ = sweep
    m = cell(results, "wikitext", "fp32").metrics
    assert m["word_perplexity"] > m["byte_perplexity"] > 1
    assert m["bits_per_byte"] == pytest.approx(__import__("math").log2(m["byte_perplexity"]))
    assert m["token_perplexity"] > 1 and m["window_n_tokens"] == 127


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"name": "mmlu", "subjects": ["astrology"]}, "unknown subject(s) astrology; valid: abstract_algebra"),
        ({"name": "mmlu", "num_fewshot": 6}, "num_fewshot: Input should be less than or equal to 5"),
        ({"name": "arc_easy", "limit_seed": 2}, "limit_seed draws a random sample of `limit` examples; set limit too"),
        ({"name": "divergence", "reference_method": "int3"}, "reference_method 'int3' is not a method; valid:"),
    ],
)
def test_bad_task_options(task, message):
    with pytest.raises(ConfigError) as info:
        sweep_config({"model": "m", "methods": ["fp32"], "tasks": [task]})
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("arc_easy", "missing column(s) question, choices, answerKey; available: text, label"),
        ("mmlu", "missing column(s) question, subject, choices, answer; available: text, label"),
        ("lambada", "has no last word to predict"),
    ],
)
def test_dataset_without_the_task_columns(tmp_path, task, message):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"text": "word", "label": 1}) + "\n")
    cls = TASKS.get(task)
    with pytest.raises(DataError) as info:
        cls(cls.Config(dataset=str(path)), tmp_path).load()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_exits_2_on_a_dataset_without_columns(tmp_path, tiny_llama_dir):
    from typer.testing import CliRunner

    from quantarena.cli import app

    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"text": "a b c"}) + "\n")
    args = ["run", "--model", str(tiny_llama_dir), "--method", "fp32", "--task", f"arc_easy:dataset={path}"]
    result = CliRunner().invoke(app, [*args, "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "missing column(s) question, choices, answerKey" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
