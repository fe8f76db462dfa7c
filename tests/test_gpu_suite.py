"""The GPU suite's CPU-side logic: its plan and budget, the refusal without CUDA, the record it writes (with a
runner standing in for the GPU steps), the decode targets it checks, and what ``prepare`` puts in ``.carry``."""

from __future__ import annotations

import json

import gpu_suite
import pytest
import torch


def test_the_plan_fits_the_budget_and_names_every_figure(tmp_path):
    steps = gpu_suite.plan("h200", tmp_path)
    assert [s.name for s in steps] == ["kernels", "gemv", "decode", "sweep", "qlora"]
    assert sum(s.timeout_s for s in steps) <= gpu_suite.BUDGET_S <= 8 * 60
    decode = next(s for s in steps if s.name == "decode")
    assert {"own-int4-fast", "own-int8-fast", "bf16-fast"} <= set(decode.command)
    assert {v for _, v in gpu_suite.TARGETS_MS} <= set(decode.command)
    assert all(str(tmp_path) in " ".join(s.command) for s in steps)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_run_exits_2_saying_why(capsys):
    assert gpu_suite.main(["run"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_dry_run_prints_the_plan_anywhere(capsys, tmp_path):
    assert gpu_suite.main(["run", "--dry-run", "--results", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("\n") == 5


def fake_runner(results, fail: set[str]):
    def run(step):
        if step.name == "decode":
            rows = [
                {"shape": "8b", "variant": "own-int4-fast", "decode_ms_per_token": 2.5},
                {"shape": "8b", "variant": "own-int8-fast", "decode_ms_per_token": 5.0},
            ]
            (results / step.output).write_text(json.dumps({"rows": rows}))
        elif step.output:
            (results / step.output).write_text("{}")
        return ("failed", "boom") if step.name in fail else ("ok", "")

    return run


def test_the_record_has_every_step_and_the_targets(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    steps = gpu_suite.plan("h200", tmp_path)
    record = gpu_suite.run_steps(steps, tmp_path, "h200", fake_runner(tmp_path, fail={"sweep"}))
    written = json.loads((tmp_path / "gpu_suite_h200.json").read_text())
    assert written == json.loads(json.dumps(record))
    assert [s["status"] for s in written["steps"]] == ["ok", "ok", "ok", "failed", "ok"]
    assert written["ok"] is False  # one failed step fails the suite (main returns 1)
    targets = {(t["shape"], t["variant"]): (t["measured_ms"], t["met"]) for t in written["decode_targets"]}
    assert targets == {
        ("8b", "own-int4-fast"): (2.5, True),
        ("8b", "own-int8-fast"): (5.0, False),
        ("1b", "own-int4-fast"): (None, False),
    }
    assert {p.name for p in out.iterdir()} == {
        "gpu_suite_h200.json",
        "gemv_h200.json",
        "decode_h200.json",
        "gpu_sweep_h200.json",
        "gpu_qlora_h200.json",
    }
    assert "| decode | ok |" in gpu_suite.table(record) and "| 8b | own-int8-fast | 5.00 | 4.5 | False |" in (
        gpu_suite.table(record)
    )


def test_prepare_carries_the_tokenizer_and_data(tmp_path, tiny_llama_dir, data_dir):
    gpu_suite.prepare(tmp_path / "carry", None, tiny_llama_dir, data_dir)
    assert (tmp_path / "carry" / "smollm2" / "config.json").is_file()
    assert (tmp_path / "carry" / "smollm2" / "tokenizer_config.json").is_file()
    for name in gpu_suite.DATA_FILES:
        assert (tmp_path / "carry" / "data" / name).read_bytes() == (data_dir / name).read_bytes()
