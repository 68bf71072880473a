"""Nothing lost, nothing twice: re-runs, driver kills with resume, actor crashes, bad files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

N_ROWS = 60
ANSWER_COLUMNS = ["id", "answer", "answer_start", "answer_end", "score", "probability", "error"]


def write_input(directory: Path, n: int = N_ROWS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    contexts = ["The king of France was born in Paris in 1789.", "The river runs by the city in the year one."]
    table = pa.table({"id": [f"r{i:03d}" for i in range(n)],
                      "question": [None if i == 5 else f"who is the king {i}?" for i in range(n)],
                      "context": [contexts[i % 2] for i in range(n)]})
    pq.write_table(table.slice(0, n // 2), directory / "a.parquet", row_group_size=10)
    pq.write_table(table.slice(n // 2), directory / "b.parquet", row_group_size=10)
    return directory


def job(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "jobs.answer", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def run_job(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> str:
    p = job(args, env_extra)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


def committed(out: Path) -> pa.Table:
    manifest = json.loads((out / "_manifest.json").read_text())
    table = pa.concat_tables([pq.read_table(f["path"]) for f in manifest["output_files"]])
    assert table.num_rows == manifest["rows_out"]
    assert not (out / "_staging").exists()
    return table.sort_by("id")


def assert_exactly_once(table: pa.Table, n: int = N_ROWS) -> None:
    ids = table.column("id").to_pylist()
    assert len(ids) == n and len(set(ids)) == n, "lost or duplicated rows"


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_model):
    base = tmp_path_factory.mktemp("clean")
    src = write_input(base / "in")
    run_job(["--input", str(src), "--output", str(base / "out"), "--model", str(tiny_model), "--rows-per-unit", "4"])
    return src, committed(base / "out")


def test_modes_and_identical_reruns(clean_run, tiny_model, tmp_path):
    src, reference = clean_run
    assert_exactly_once(reference)
    out = tmp_path / "out"
    common = ["--input", str(src), "--output", str(out), "--model", str(tiny_model), "--rows-per-unit", "4"]
    run_job(common)
    first = committed(out)
    assert first.select(ANSWER_COLUMNS).equals(reference.select(ANSWER_COLUMNS))
    p = job(common)
    text, _ = p.communicate(timeout=300)
    assert p.returncode != 0 and "--mode overwrite" in text
    run_job(common + ["--mode", "overwrite"])
    assert committed(out).select(ANSWER_COLUMNS).equals(reference.select(ANSWER_COLUMNS))
    assert "nothing to do" in run_job(common + ["--mode", "resume"])
    # row groups of 10 cut into units of at most 4 rows: 6 x (4 + 4 + 2); no leftovers from earlier runs
    assert len(list(out.glob("*.parquet"))) == 18


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_driver_killed_then_resumed(clean_run, tiny_model, tmp_path, seed):
    """SIGKILL the driver at a random moment after the first unit is staged; resume finishes the job,
    redoing only the units that were not staged."""
    src, reference = clean_run
    out = tmp_path / "out"
    # Two actors x 1.5 s per unit: 18 units take >= 13.5 s. The first staged file can lag the answers by
    # seconds (the write task waits for a worker process to start on busy cores), so the job must outlast
    # that lag plus the kill delay of up to 3 s on any machine.
    common = ["--input", str(src), "--output", str(out), "--model", str(tiny_model), "--rows-per-unit", "4",
              "--concurrency", "2", "--cpus-per-actor", "1"]
    p = job(common, {"QA_FAULT_SLOW_CALL_S": "1.5"}, start_new_session=True)
    deadline = time.time() + 240
    while not list((out / "_staging").glob("part-*.parquet")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 3.0))
    os.killpg(p.pid, signal.SIGKILL)  # the driver and everything it started in its session
    p.wait()
    # Ray worker processes that left the session notice the dead raylet and exit; wait for them.
    for _ in range(300):
        if subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True).returncode != 0:
            break
        time.sleep(0.1)
    time.sleep(1.0)
    staged = list((out / "_staging").glob("part-*.parquet"))
    staged_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in staged)
    assert not (out / "_manifest.json").exists()
    assert 0 < len(staged) < 18

    run_job(common + ["--mode", "resume"])
    manifest = json.loads((out / "_manifest.json").read_text())
    result = committed(out)
    assert_exactly_once(result)
    assert result.select(ANSWER_COLUMNS).equals(reference.select(ANSWER_COLUMNS))
    assert manifest["units_answered_now"] == 18 - len(staged)
    assert manifest["rows_staged_before"] == staged_rows


def test_actor_crash_is_retried_exactly_once(clean_run, tiny_model, tmp_path):
    src, reference = clean_run
    marker = tmp_path / "crashed"
    out = tmp_path / "out"
    run_job(["--input", str(src), "--output", str(out), "--model", str(tiny_model), "--rows-per-unit", "4"],
            {"QA_FAULT_CRASH_ON_CALL": "3", "QA_FAULT_MARKER": str(marker)})
    assert marker.exists(), "the fault was not injected"
    result = committed(out)
    assert_exactly_once(result)
    assert result.select(ANSWER_COLUMNS).equals(reference.select(ANSWER_COLUMNS))


def test_bad_input_file(tiny_model, tmp_path):
    src = write_input(tmp_path / "in")
    (src / "c.parquet").write_bytes(b"PAR1 this is not parquet at all")
    out = tmp_path / "out"
    p = job(["--input", str(src), "--output", str(out), "--model", str(tiny_model)])
    text, _ = p.communicate(timeout=300)
    assert p.returncode != 0 and f"input file {src / 'c.parquet'}" in text and "--skip-bad-files" in text
    assert not out.exists()
    run_job(["--input", str(src), "--output", str(out), "--model", str(tiny_model), "--skip-bad-files"])
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["skipped_bad_files"] == [str(src / "c.parquet")]
    assert_exactly_once(committed(out))
