"""Sweeps that survive: resume, SIGKILL, crashing and hanging backends and tasks, a full disk, determinism, Ray."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import quantarena
from quantarena.errors import QuantarenaError
from quantarena.sweep.store import STORE_FILE, Store

PLUGIN = "plugins.breaking_methods"
TESTS_DIR = Path(__file__).resolve().parents[1]
PPL = {"name": "perplexity", "max_tokens": 120, "max_length": 40, "stride": 20}


def config(model_dir, out, methods, tasks=(PPL,), **extra):
    return quantarena.sweep_config(
        {"model": str(model_dir), "methods": methods, "tasks": list(tasks), "output_dir": str(out), "plugins": [PLUGIN]}
        | extra
    )


def stored_rows(out: Path) -> list[tuple[str, str, float]]:
    with sqlite3.connect(out / STORE_FILE) as db:
        return db.execute("SELECT key, status, finished_at FROM cells ORDER BY rowid").fetchall()


def test_rerun_reuses_finished_cells_and_force_reruns(tmp_path, tiny_llama_dir):
    sweep = config(tiny_llama_dir, tmp_path, ["fp32", "own-int8"], executor="inline")
    first = quantarena.run(sweep)
    rows = stored_rows(tmp_path)
    second = quantarena.run(sweep)
    assert stored_rows(tmp_path) == rows
    assert [c.metrics for c in second.cells] == [c.metrics for c in first.cells]
    quantarena.run(sweep, force=True)
    rerun = stored_rows(tmp_path)
    assert [r[0] for r in rerun] == [r[0] for r in rows]
    assert all(new[2] > old[2] for new, old in zip(rerun, rows, strict=True))


def test_changed_option_is_a_new_cell_and_failed_cells_rerun(tmp_path, tiny_llama_dir):
    quantarena.run(config(tiny_llama_dir, tmp_path, ["fp32", "test-import-error"], executor="inline"))
    assert [r[1] for r in stored_rows(tmp_path)] == ["ok", "failed"]
    before = stored_rows(tmp_path)
    quantarena.run(config(tiny_llama_dir, tmp_path, ["fp32", "test-import-error", "own-int4"], executor="inline"))
    after = stored_rows(tmp_path)
    assert after[0] == before[0]  # fp32 reused
    assert after[1][0] == before[1][0] and after[1][2] > before[1][2]  # the failed cell ran again
    assert len(after) == 3


def test_crashing_backend_fails_only_its_cell(tmp_path, tiny_llama_dir):
    results = quantarena.run(config(tiny_llama_dir, tmp_path, ["test-segfault", "test-import-error", "own-int8"]))
    statuses = [(c.method, c.status) for c in results.cells]
    assert statuses == [("test-segfault", "failed"), ("test-import-error", "failed"), ("own-int8", "ok")]
    assert results.cells[0].reason == "worker process killed by SIGSEGV"
    assert results.cells[1].reason.startswith("ModuleNotFoundError: No module named 'quantarena_backend_that")
    saved = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert [c["status"] for c in saved] == ["failed", "failed", "ok"]


def test_hanging_cell_times_out(tmp_path, tiny_llama_dir):
    sweep = config(tiny_llama_dir, tmp_path, [{"name": "test-sleep", "seconds": 600}], cell_timeout_s=20)
    started = time.monotonic()
    (cell,) = quantarena.run(sweep).cells
    assert time.monotonic() - started < 60
    assert (cell.status, cell.reason) == ("failed", "timed out after 20 s")


def start_sweep(tmp_path: Path, model_dir: Path, sleep_s: int = 10) -> tuple[list[str], dict, subprocess.Popen]:
    """The CLI on three cells, the middle one sleeping ``sleep_s``, returned once the first cell is stored."""
    (tmp_path / "sweep.toml").write_text(f'plugins = ["{PLUGIN}"]\n')
    args = [
        sys.executable, "-m", "quantarena", "run", str(tmp_path / "sweep.toml"), "--model", str(model_dir),
        "--output-dir", str(tmp_path), "--method", "fp32", "--method", f"test-sleep:seconds={sleep_s}",
        "--method", "own-int8", "--task", "perplexity:max_tokens=120,max_length=40,stride=20",
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    sweep = subprocess.Popen(
        args,
        env=env,
        start_new_session=True,
        # As from a terminal: a sweep started from a background job of a non-interactive shell (`pytest &`
        # in a CI script) inherits SIGINT ignored, Python then installs no handler, and Ctrl-C does nothing.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sweep.poll() is None:
        if (tmp_path / STORE_FILE).exists() and len(stored_rows(tmp_path)) == 1:
            break
        time.sleep(0.1)
    assert sweep.poll() is None, sweep.stderr.read().decode()
    return args, env, sweep


def test_sigkill_mid_cell_loses_only_that_cell(tmp_path, tiny_llama_dir):
    args, env, sweep = start_sweep(tmp_path, tiny_llama_dir)
    os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and its cell's child, mid test-sleep
    sweep.wait()
    first = stored_rows(tmp_path)
    assert [r[1] for r in first] == ["ok"]

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming: 1 of 3 cells" in rerun.stderr
    rows = stored_rows(tmp_path)
    assert rows[0] == first[0]
    assert len({r[0] for r in rows}) == len(rows) == 3
    assert [c["method"] for c in json.loads((tmp_path / "results.json").read_text())["cells"]] == [
        "fp32", "test-sleep(seconds=10)", "own-int8",
    ]  # fmt: skip


def test_ctrl_c_stops_cleanly_keeping_finished_cells(tmp_path, tiny_llama_dir):
    _, _, sweep = start_sweep(tmp_path, tiny_llama_dir)
    os.killpg(sweep.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    _, stderr = sweep.communicate(timeout=60)
    assert sweep.returncode == 130
    assert "interrupted: finished cells are kept in" in stderr.decode()
    assert [r[1] for r in stored_rows(tmp_path)] == ["ok"]
    assert len(json.loads((tmp_path / "results.json").read_text())["cells"]) == 1


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (its workers, the fork server and theirs), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


def wait_until_gone(pids: set[int], seconds: float = 20) -> set[int]:
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pids)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_sigterm_stops_cleanly_keeping_finished_cells_and_no_worker(tmp_path, tiny_llama_dir):
    """SIGTERM is how systemd, Docker, Slurm and Kubernetes stop a job: handled as Ctrl-C, exit 143."""
    _, _, sweep = start_sweep(tmp_path, tiny_llama_dir)
    workers = descendants(sweep.pid)
    assert workers
    sweep.send_signal(signal.SIGTERM)
    _, stderr = sweep.communicate(timeout=60)
    assert sweep.returncode == 143
    lines = stderr.decode().strip().splitlines()
    assert lines[-1].startswith("terminated: finished cells are kept in") and "Traceback" not in stderr.decode()
    assert [r[1] for r in stored_rows(tmp_path)] == ["ok"]
    assert not wait_until_gone(workers)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_a_killed_sweep_leaves_no_worker_running(tmp_path, tiny_llama_dir):
    _, _, sweep = start_sweep(tmp_path, tiny_llama_dir)
    workers = descendants(sweep.pid)
    assert workers
    sweep.kill()  # the sweep alone, not its process group: its workers must not outlive it
    sweep.wait()
    assert not wait_until_gone(workers)


def test_a_second_run_into_the_same_dir_is_refused(tmp_path, tiny_llama_dir):
    args, env, sweep = start_sweep(tmp_path, tiny_llama_dir, sleep_s=120)
    try:
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: output dir {tmp_path} is in use by another quantarena run; wait for it, or use another --output-dir"
    ]
    assert [r[1] for r in stored_rows(tmp_path)] == ["ok"]


class DiskFull:
    """A connection whose writes fail as SQLite's do when the disk is full."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def execute(self, sql: str, params=()):
        if sql.lstrip().startswith("INSERT"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, params)

    def __enter__(self):
        return self.db.__enter__()

    def __exit__(self, *exc):
        return self.db.__exit__(*exc)

    def close(self):
        self.db.close()


def test_full_disk_stops_the_sweep_keeping_what_finished(tmp_path, tiny_llama_dir, monkeypatch):
    real_put = Store.put

    def put_then_fill_disk(self, key, result):
        if stored_rows(tmp_path):
            self._db = DiskFull(self._db)
        real_put(self, key, result)

    monkeypatch.setattr(Store, "put", put_then_fill_disk)
    sweep = config(tiny_llama_dir, tmp_path, ["fp32", "own-int8", "own-int4"], executor="inline")
    with pytest.raises(QuantarenaError, match=r"cannot write to the results store .*disk is full"):
        quantarena.run(sweep)
    assert [r[1] for r in stored_rows(tmp_path)] == ["ok"]
    assert [c["method"] for c in json.loads((tmp_path / "results.json").read_text())["cells"]] == ["fp32"]


def test_same_sweep_gives_bit_identical_quality(tmp_path, tiny_llama_dir, tiny_bert_dir, tiny_jsonl):
    def quality(out):
        sweep = quantarena.sweep_config(
            {
                "models": [str(tiny_llama_dir), str(tiny_bert_dir)],
                "methods": ["fp32", "own-int4", "torch-dynamic-int8"],
                "tasks": [PPL, {"name": "classification", "dataset": str(tiny_jsonl), "latency_examples": 2}],
                "output_dir": str(out),
                "executor": "inline",
            }
        )
        keep = ("perplexity", "nll_mean", "n_tokens", "accuracy", "f1", "confusion_matrix")
        return [({k: c.metrics.get(k) for k in keep}, c.per_example) for c in quantarena.run(sweep).cells]

    assert quality(tmp_path / "a") == quality(tmp_path / "b")


def test_ray_executor_on_a_local_cluster(tmp_path, tiny_llama_dir):
    pytest.importorskip("ray")
    sweep = config(tiny_llama_dir, tmp_path, ["fp32", "own-int8", "test-segfault"], executor="ray")
    cells = quantarena.run(sweep).cells
    assert [(c.method, c.status) for c in cells] == [("fp32", "ok"), ("own-int8", "ok"), ("test-segfault", "failed")]
    assert cells[2].reason.startswith("ray task failed")
    assert len(stored_rows(tmp_path)) == 3


def test_full_disk_for_the_views_keeps_the_store(tmp_path, tiny_llama_dir, monkeypatch):
    import errno

    import quantarena.sweep.api

    def write_report_on_a_full_disk(report, output_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(quantarena.sweep.api, "write_report", write_report_on_a_full_disk)
    sweep = config(tiny_llama_dir, tmp_path, ["fp32", "own-int8"], executor="inline")
    with pytest.raises(QuantarenaError, match=f"cannot write the results files in {tmp_path}: No space left on device"):
        quantarena.run(sweep)
    assert [r[1] for r in stored_rows(tmp_path)] == ["ok", "ok"]


def test_a_crash_in_one_task_fails_that_cell_and_the_rest_reload_the_variant(tmp_path, tiny_llama_dir):
    """The worker dies in the second of three tasks: that cell fails, the third runs in a fresh worker that
    reloads the variant from the checkpoint cache instead of quantizing it again."""
    tasks = [PPL, {"name": "test-crash"}, PPL | {"max_tokens": 80, "label": "ppl-80"}]
    cells = quantarena.run(config(tiny_llama_dir, tmp_path, ["own-int4"], tasks, cache_dir=str(tmp_path / "c"))).cells
    assert [(c.task_name, c.status) for c in cells] == [
        ("perplexity", "ok"), ("test-crash", "failed"), ("perplexity", "ok"),
    ]  # fmt: skip
    assert cells[1].reason == "worker process killed by SIGSEGV"
    assert [cells[0].variant_source, cells[2].variant_source] == ["quantized", "cache"]
    # The reloaded variant is the quantized one: same bytes, and its own quantization time, not the reload's.
    assert cells[2].measurements["weight_bytes"] == cells[0].measurements["weight_bytes"]
    assert cells[2].measurements["quantize_s"] == cells[0].measurements["quantize_s"]


def test_a_crash_while_quantizing_fails_every_task_of_that_variant_only(tmp_path, tiny_llama_dir):
    tasks = [PPL, PPL | {"max_tokens": 80, "label": "ppl-80"}]
    cells = quantarena.run(config(tiny_llama_dir, tmp_path, ["test-segfault", "own-int8"], tasks)).cells
    assert [(c.method, c.status) for c in cells] == [
        ("test-segfault", "failed"), ("own-int8", "ok"), ("test-segfault", "failed"), ("own-int8", "ok"),
    ]  # fmt: skip
    assert {c.reason for c in cells if c.status == "failed"} == {"worker process killed by SIGSEGV"}
