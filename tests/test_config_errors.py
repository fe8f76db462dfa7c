"""Bad input: one clear line naming what is valid, exit code 2, nothing half-done."""

import json

import pytest
from typer.testing import CliRunner

from quantarena.cli import app
from quantarena.config import load_config, sweep_config
from quantarena.errors import ConfigError, first_line

runner = CliRunner()


def run_cli(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stderr.strip()


BASE = {"model": "some-model", "methods": ["fp32"], "tasks": ["perplexity"]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": ["fp32", "int3-magic"]}, "unknown method 'int3-magic'; valid: bf16, bnb-fp4, bnb-int8, bnb-nf4"),
        ({"tasks": ["mmlu-pro"]}, "unknown task 'mmlu-pro'; valid: arc_challenge, arc_easy, classification"),
        ({"methods": [{"name": "own-int4", "group_size": 0}]}, "group_size: Input should be greater than 0"),
        ({"methods": [{"name": "own-int4", "bits": 3}]}, "unknown key 'bits'; valid keys: calibration_dataset"),
        ({"methods": [{"group_size": 3}]}, "each entry needs a name"),
        ({"methods": []}, "expected a non-empty list"),
        ({"batch_size": -4}, "batch_size: Input should be greater than or equal to 1"),
        ({"batch_size": "eight"}, "batch_size: Input should be a valid integer"),
        ({"device": "tpu"}, "device: Input should be 'cpu' or 'cuda'"),
        ({"colour": "blue"}, "unknown key 'colour'; valid keys: models, methods, tasks, baseline"),
        ({"baseline": "bf16"}, "baseline 'bf16' is not one of the methods (fp32)"),
        ({"methods": ["fp32", "fp32"]}, "method 'fp32' is listed twice"),
        ({"tasks": [{"name": "perplexity", "stride": 4096}]}, "stride (4096) must be <= max_length (1024)"),
        ({"tasks": [{"name": "classification", "limit": -1}]}, "limit: Input should be greater than 0"),
    ],
)
def test_invalid_config_names_the_problem(change, message):
    with pytest.raises(ConfigError) as info:
        sweep_config(BASE | change)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_sections():
    with pytest.raises(ConfigError, match="missing 'tasks'"):
        sweep_config({"model": "m", "methods": ["fp32"]})


def test_malformed_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("model = 'x'\nmethods = [fp32\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(path)


def test_toml_with_method_tables(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(
        'model = "m"\nmethods = ["fp32", { name = "own-int4", group_size = 32, label = "int4-g32" }]\n'
        '[[tasks]]\nname = "perplexity"\nmax_tokens = 100\n'
    )
    config = load_config(path)
    assert [m.label for m in config.methods] == ["fp32", "int4-g32"]
    assert config.methods[1].config.group_size == 32
    assert config.tasks[0].config.max_tokens == 100


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "/no/such/model", "--method", "fp32", "--task", "perplexity"],
            "model path /no/such/model does not exist",
        ),
        (["--model", "x", "--method", "nope", "--task", "perplexity"], "unknown method 'nope'"),
        (["--model", "x", "--method", "own-int4:group_size", "--task", "perplexity"], "is not KEY=VALUE"),
        (["/no/such/config.toml"], "config file /no/such/config.toml does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
    code, stderr = run_cli("run", *args)
    assert code == 2
    assert stderr.startswith("error: ") and message in stderr
    assert len(stderr.splitlines()) == 1


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    code, stderr = run_cli("run", "--model", str(tmp_path), "--method", "fp32", "--task", "perplexity")
    assert code == 2 and "has no weights" in stderr


def test_folder_without_config(tmp_path):
    code, stderr = run_cli("run", "--model", str(tmp_path), "--method", "fp32", "--task", "perplexity")
    assert code == 2 and "has no config.json" in stderr


def test_dataset_without_expected_columns(tmp_path, tiny_llama_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"sentence": "a"}\n')
    code, stderr = run_cli(
        "run", "--model", str(tiny_llama_dir), "--method", "fp32", "--task", f"perplexity:dataset='{data}'"
    )
    assert code == 2 and "missing column(s) text; available: sentence" in stderr


def test_missing_data_dir_says_how_to_set_it(tmp_path, tiny_llama_dir):
    code, stderr = run_cli(
        "run", "--model", str(tiny_llama_dir), "--method", "fp32", "--task", "perplexity", "--data-dir", str(tmp_path)
    )
    assert code == 2 and "set QUANTARENA_DATA_DIR or --data-dir" in stderr


def test_cuda_requested_without_gpu(tiny_llama_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, stderr = run_cli(
        "run", "--model", str(tiny_llama_dir), "--method", "fp32", "--task", "perplexity", "--device", "cuda"
    )
    assert code == 2 and "no CUDA GPU is available" in stderr


def test_task_without_a_model_of_its_kind(tiny_bert_dir):
    code, stderr = run_cli("run", "--model", str(tiny_bert_dir), "--method", "fp32", "--task", "perplexity")
    assert code == 2 and "task perplexity needs a causal-lm model" in stderr


def test_unwritable_output_dir(tmp_path, tiny_llama_dir):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, stderr = run_cli(
        "run",
        "--model",
        str(tiny_llama_dir),
        "--method",
        "fp32",
        "--task",
        "perplexity",
        "--output-dir",
        str(blocker / "out"),
    )
    assert code == 2 and "cannot be created" in stderr


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst / "model.safetensors"


def test_truncated_safetensors(tmp_path, tiny_llama_dir):
    weights = _copy_model(tiny_llama_dir, tmp_path / "m")
    weights.write_bytes(weights.read_bytes()[:-1000])
    code, stderr = run_cli("run", "--model", str(tmp_path / "m"), "--method", "fp32", "--task", "perplexity")
    assert code == 2 and "model.safetensors is corrupt" in stderr and "spans bytes" in stderr


def test_safetensors_with_garbage_header(tmp_path, tiny_llama_dir):
    weights = _copy_model(tiny_llama_dir, tmp_path / "m")
    weights.write_bytes((20).to_bytes(8, "little") + b"not json at all....." + b"\0" * 100)
    code, stderr = run_cli("run", "--model", str(tmp_path / "m"), "--method", "fp32", "--task", "perplexity")
    assert code == 2 and "header is not valid JSON" in stderr


def test_empty_dataset(tmp_path, tiny_bert_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    code, stderr = run_cli(
        "run", "--model", str(tiny_bert_dir), "--method", "fp32", "--task", f"classification:dataset='{data}'"
    )
    assert code == 2 and "has no records" in stderr


def test_labels_that_are_not_class_ids(tmp_path, tiny_bert_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "positive"}\n')
    code, stderr = run_cli(
        "run", "--model", str(tiny_bert_dir), "--method", "fp32", "--task", f"classification:dataset='{data}'"
    )
    assert code == 2 and "label 'positive' is not an integer class id" in stderr


def test_plugin_that_cannot_be_imported(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text('plugins = ["no_such_plugin_module"]\nmodel = "m"\nmethods = ["fp32"]\ntasks = ["perplexity"]\n')
    code, stderr = run_cli("run", str(config))
    assert code == 2 and "plugin 'no_such_plugin_module' cannot be imported: ModuleNotFoundError" in stderr


def test_missing_gguf_file(tmp_path):
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    config = tmp_path / "s.toml"
    config.write_text(
        f'methods = ["fp32"]\ntasks = ["perplexity"]\n[[models]]\nsource = "{tmp_path}"\ngguf_file = "model.gguf"\n'
    )
    code, stderr = run_cli("run", str(config))
    assert code == 2 and "GGUF file model.gguf not in" in stderr and "found: other.gguf" in stderr


def test_cuda_only_method_on_cpu_is_a_reasoned_skip():
    from quantarena.methods import Requirements

    assert Requirements(devices=("cuda",)).unmet("cpu") == "needs device cuda, sweep runs on cpu"
    assert Requirements(devices=("cpu",)).unmet("cuda") == "needs device cpu, sweep runs on cuda"


def test_an_error_is_reported_by_its_first_line_even_without_a_message():
    assert first_line(ValueError("bad header\n  at byte 12\n  dump...")) == "bad header"
    # Some libraries raise without a message: one line naming the exception, never an IndexError.
    assert first_line(OSError()) == "OSError"
    assert first_line(KeyError(), "unreadable") == "unreadable"
