"""The checkpoint cache: a variant is quantized once and reloaded by later sweeps; any change to what determines it
misses; --force ignores it; a corrupt entry is found and rebuilt; methods that cannot reload are never cached."""

import json
import shutil
from pathlib import Path

import pytest

import quantarena
from quantarena.sweep.api import prepare
from quantarena.sweep.cache import CHECKPOINT_DIR, RECORD_FILE

PPL = {"name": "perplexity", "max_tokens": 120, "max_length": 40, "stride": 20}
PPL_80 = PPL | {"max_tokens": 80, "label": "ppl-80"}


def sweep(model_dir: Path, out: Path, cache: Path, methods=("own-int4",), tasks=(PPL,), **extra):
    return quantarena.sweep_config(
        {
            "model": str(model_dir),
            "methods": list(methods),
            "tasks": list(tasks),
            "output_dir": str(out),
            "cache_dir": str(cache),
            "executor": "inline",
        }
        | extra
    )


def entries(cache: Path) -> list[Path]:
    """The cached checkpoints (not the size records of variants kept without one)."""
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_a_later_sweep_reloads_the_variant_and_a_new_task_quantizes_nothing(tmp_path, tiny_llama_dir):
    cache = tmp_path / "cache"
    (first,) = quantarena.run(sweep(tiny_llama_dir, tmp_path / "a", cache)).cells
    assert first.variant_source == "quantized" and first.variant_note is None
    (entry,) = entries(cache)
    record = json.loads((entry / RECORD_FILE).read_text())
    assert record["quantize_s"] == first.measurements["quantize_s"]
    assert record["disk_bytes"] == first.measurements["disk_bytes"]

    # Another output dir (nothing to resume), one more task: both cells come from the cached checkpoint.
    again, added = quantarena.run(sweep(tiny_llama_dir, tmp_path / "b", cache, tasks=(PPL, PPL_80))).cells
    assert [again.variant_source, added.variant_source] == ["cache", "cache"]
    assert entries(cache) == [entry]
    assert again.metrics["perplexity"] == first.metrics["perplexity"]  # the same model, bit for bit
    assert again.per_example == first.per_example
    # quantize_s is the quantization's own time, recorded when it happened, not the reload's.
    assert again.measurements["quantize_s"] == first.measurements["quantize_s"]
    assert again.measurements["weight_bytes"] == first.measurements["weight_bytes"]


def test_force_quantizes_again_and_replaces_the_entry(tmp_path, tiny_llama_dir):
    cache = tmp_path / "cache"
    quantarena.run(sweep(tiny_llama_dir, tmp_path / "a", cache))
    (entry,) = entries(cache)
    written = (entry / RECORD_FILE).stat().st_mtime_ns
    (cell,) = quantarena.run(sweep(tiny_llama_dir, tmp_path / "b", cache), force=True).cells
    assert cell.variant_source == "quantized"
    assert entries(cache) == [entry] and (entry / RECORD_FILE).stat().st_mtime_ns > written


def variant_key(model_dir: Path, tmp_path: Path, **config) -> str:
    methods = [config.pop("method", "own-int4")]
    (cell,) = prepare(sweep(model_dir, tmp_path / "out", tmp_path / "cache", methods=methods, **config))
    return cell.variant.key()


def test_every_input_that_determines_the_variant_changes_its_key(tmp_path, tiny_llama_dir, monkeypatch):
    base = variant_key(tiny_llama_dir, tmp_path)
    assert variant_key(tiny_llama_dir, tmp_path) == base
    # Display labels and tasks do not determine the checkpoint.
    assert variant_key(tiny_llama_dir, tmp_path, tasks=[PPL_80]) == base
    assert variant_key(tiny_llama_dir, tmp_path, method={"name": "own-int4", "label": "x"}) == base
    changed = {
        "method option": variant_key(tiny_llama_dir, tmp_path, method={"name": "own-int4", "group_size": 32}),
        "method": variant_key(tiny_llama_dir, tmp_path, method="own-int8"),
        "seed": variant_key(tiny_llama_dir, tmp_path, seed=1),
    }
    edited = tmp_path / "edited"
    shutil.copytree(tiny_llama_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-5}))
    changed["model config"] = variant_key(edited, tmp_path)
    shutil.copytree(tiny_llama_dir, edited, dirs_exist_ok=True)
    tokenizer = json.loads((edited / "tokenizer.json").read_text())
    tokenizer["normalizer"] = None
    (edited / "tokenizer.json").write_text(json.dumps(tokenizer))
    changed["tokenizer"] = variant_key(edited, tmp_path)
    monkeypatch.setattr("quantarena.sweep.plan.package_version", lambda package: "0.0-other")
    changed["library versions"] = variant_key(tiny_llama_dir, tmp_path)
    assert len({base, *changed.values()}) == len(changed) + 1, changed


def test_the_calibration_data_is_part_of_a_calibrating_methods_key(tmp_path, tiny_llama_dir, data_dir):
    """quanto with int8 activations calibrates on SST-2 train sentences: other sentences, another variant."""
    other = tmp_path / "data"
    shutil.copytree(data_dir, other, ignore=shutil.ignore_patterns("imdb", "mmlu", "hellaswag", "lambada_openai"))
    method = {"name": "quanto-int8", "activations": "int8"}
    base = variant_key(tiny_llama_dir, tmp_path, method=method, data_dir=str(data_dir))
    assert variant_key(tiny_llama_dir, tmp_path, method=method, data_dir=str(other)) == base  # same content
    train = other / "sst2" / "train.jsonl.gz"
    train.write_bytes(train.read_bytes()[:-100] + bytes(100))
    assert variant_key(tiny_llama_dir, tmp_path, method=method, data_dir=str(other)) != base
    # A method that does not calibrate does not depend on that file.
    assert variant_key(tiny_llama_dir, tmp_path, data_dir=str(other)) == variant_key(tiny_llama_dir, tmp_path)


@pytest.mark.parametrize(
    "damage, problem",
    [
        ("flip", "model.safetensors does not match its recorded sha256"),
        ("truncate", "model.safetensors is"),
        ("record", f"{RECORD_FILE} missing or unreadable"),
        ("extra", "files differ from the recorded ones"),
    ],
)
def test_a_damaged_entry_is_found_and_rebuilt(tmp_path, tiny_llama_dir, damage, problem):
    cache = tmp_path / "cache"
    (first,) = quantarena.run(sweep(tiny_llama_dir, tmp_path / "a", cache)).cells
    (entry,) = entries(cache)
    weights = entry / CHECKPOINT_DIR / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF  # inside the last tensor: the file still parses, its size is unchanged
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[:-64]))
    elif damage == "record":
        (entry / RECORD_FILE).write_text("{")
    else:
        (entry / CHECKPOINT_DIR / "stray.bin").write_bytes(b"x")
    (cell,) = quantarena.run(sweep(tiny_llama_dir, tmp_path / "b", cache)).cells
    assert cell.status == "ok" and cell.variant_source == "quantized"
    assert problem in cell.variant_note and cell.variant_note.endswith("quantized again")
    assert cell.metrics["perplexity"] == first.metrics["perplexity"]
    (again,) = quantarena.run(sweep(tiny_llama_dir, tmp_path / "c", cache)).cells
    assert again.variant_source == "cache"  # the rebuilt entry is whole


@pytest.mark.parametrize(
    "method, note",
    [
        ("torch-dynamic-int8", "not cached: no loader reads its checkpoint back, so it is quantized in every run"),
        ("fp32", "not cached: applied again in every run, which costs less than reloading a copy"),
    ],
)
def test_variants_kept_without_a_checkpoint_are_quantized_in_every_run(tmp_path, tiny_llama_dir, method, note):
    cache = tmp_path / "cache"
    first, again = (
        quantarena.run(sweep(tiny_llama_dir, tmp_path / out, cache, methods=[method])).cells[0] for out in "ab"
    )
    for cell in (first, again):
        assert cell.status == "ok" and cell.variant_source == "quantized" and cell.variant_note == note
    assert entries(cache) == []
    # Only the size is remembered: the second run did not save the variant again to measure it.
    assert again.measurements["disk_bytes"] == first.measurements["disk_bytes"] > 0
    assert again.measurements["save_s"] == first.measurements["save_s"]
    assert again.metrics["perplexity"] == first.metrics["perplexity"]


def test_no_cache_when_switched_off(tmp_path, tiny_llama_dir):
    cache = tmp_path / "cache"
    for out in ("a", "b"):
        (cell,) = quantarena.run(sweep(tiny_llama_dir, tmp_path / out, cache, cache_variants=False)).cells
        assert cell.variant_source == "quantized" and cell.variant_note is None
    assert not cache.exists()


def test_load_and_serve_peaks_are_measured_apart(tmp_path, tiny_llama_dir):
    """A method that holds 400 MB while quantizing, beside one that holds 1 MB: the load peaks differ by the
    400 MB, the serving peaks (what a user provisions to run the quantized model) do not."""
    methods = [{"name": "test-allocate", "megabytes": 400}, {"name": "test-allocate", "megabytes": 1, "label": "1mb"}]
    config = sweep(
        tiny_llama_dir,
        tmp_path / "out",
        tmp_path / "cache",
        methods=methods,
        executor="local",
        plugins=["plugins.breaking_methods"],
    )
    big, small = (cell.measurements for cell in quantarena.run(config).cells)
    mb = 1 << 20
    assert big["load_peak_rss_bytes"] - small["load_peak_rss_bytes"] > 350 * mb
    assert abs(big["serve_peak_rss_bytes"] - small["serve_peak_rss_bytes"]) < 50 * mb
    assert small["serve_peak_rss_bytes"] > small["weight_bytes"]
