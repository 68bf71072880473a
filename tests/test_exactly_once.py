"""Nothing lost, nothing twice: re-runs, a crash at every named point of the protocol then resume, a second
run on a live output, late writes of a dead run, actor crashes, bad files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, driver_log_tail

from pipeline.faults import EXIT_CODE

N_ROWS = 60
ANSWER_COLUMNS = ["id", "answer", "answer_start", "answer_end", "score", "probability", "error"]
pytestmark = pytest.mark.usefixtures("joined_ray")  # jobs join the suite's Ray node (conftest)


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
    """The job in a subprocess, on the Ray that RAY_ADDRESS names."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "jobs.answer", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def run_job(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> str:
    p = job(args, env_extra)
    out, _ = p.communicate(timeout=timeout)
    # A driver that Ray's core worker ended itself prints nothing of why: its driver log and its Ray log file say.
    assert p.returncode == 0, f"exit {p.returncode}: {out[-4000:]}\n{driver_log_tail()}\n{ray_log_tail(p.pid)}"
    return out


def ray_log_tail(pid: int, lines: int = 30) -> str:
    """The end of the job's own file of Ray's lines (jobs/connect.py: kept when the process did not end cleanly)."""
    import tempfile

    path = Path(tempfile.gettempdir()) / f"qa-batch-{pid}-ray.log"
    if not path.exists():
        return f"(no {path})"
    return f"{path}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def committed(out: Path) -> pa.Table:
    manifest = json.loads((out / "_manifest.json").read_text())
    table = pa.concat_tables([pq.read_table(out / f["path"]) for f in manifest["output_files"]])
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
    # Committed already: the re-run answers nothing, so it joins no cluster (a dead address would fail it).
    assert "nothing to do" in run_job(common + ["--mode", "resume", "--address", "127.0.0.1:9"])
    # row groups of 10 cut into units of at most 4 rows: 6 x (4 + 4 + 2); no leftovers from earlier runs
    assert len(list(out.glob("*.parquet"))) == 18


def crash(common: list[str], point: str, node) -> int:
    """Run the job on the suite's Ray node (``node``) into a crash point (QA_FAULT_CRASH_AT), then wait until
    none of its workers runs: Ray kills a dead driver's actors and write tasks, and until then they may still
    stage units (the late writes the protocol ignores, test_late_write_of_another_run_is_never_taken)."""
    p = job(common, {"QA_FAULT_CRASH_AT": point})
    p.communicate(timeout=300)
    assert node.wait_for_workers_of(p.pid) > 0
    return p.returncode


def reader_view(out: Path) -> dict | None:
    """What a reader following _manifest.json sees: the manifest, every file it lists complete; or None."""
    path = out / "_manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    for f in manifest["output_files"]:
        assert pq.ParquetFile(out / f["path"]).metadata.num_rows == f["rows"], f"{f['path']} missing or torn"
    return manifest


# (crash point, whether the output already holds a committed run that this one overwrites)
CRASHES = [("stage:3", False), ("commit-list", False), ("publish:5", True), ("manifest", True)]


@pytest.mark.parametrize(("point", "over_previous"), CRASHES)
def test_crash_point_then_resume(clean_run, joined_ray, tiny_model, tmp_path, point, over_previous):
    """The job dies at a named point of the protocol; a reader following the manifest saw the previous
    committed set or nothing, never a mix; one --mode resume commits every row exactly once, with a clean
    run's answers."""
    src, reference = clean_run
    out = tmp_path / "out"
    common = ["--input", str(src), "--output", str(out), "--model", str(tiny_model), "--rows-per-unit", "4"]
    previous = None
    if over_previous:
        shutil.copytree(clean_run_output(clean_run), out)
        manifest = (out / "_manifest.json").read_text().replace(str(clean_run_output(clean_run)), str(out))
        (out / "_manifest.json").write_text(manifest)  # the copy's manifest names the copy's files
        previous = reader_view(out)
        assert all("/" not in f["path"] for f in previous["output_files"])  # names, relative to the output
        common += ["--mode", "overwrite"]
    code = crash(common, point, joined_ray)
    assert code in (EXIT_CODE, -signal.SIGKILL), f"the job did not stop at {point} (exit {code})"
    seen = reader_view(out)
    if point == "manifest":  # the new manifest was in place: the new set, complete
        assert seen is not None and seen["run"] != previous["run"] and seen["rows_out"] == N_ROWS
    elif previous is not None:
        assert seen == previous  # the previous set, every file of it still there
    else:
        assert seen is None
    staged = list((out / "_staging").glob("part-*.parquet"))
    staged_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in staged)
    if point == "stage:3":
        assert 3 <= len(staged) < 18

    resumed = run_job([a for a in common if a not in ("--mode", "overwrite")] + ["--mode", "resume"])
    manifest = json.loads((out / "_manifest.json").read_text())
    result = committed(out)
    assert_exactly_once(result)
    assert result.select(ANSWER_COLUMNS).equals(reference.select(ANSWER_COLUMNS))
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(
        Path(f["path"]).name for f in manifest["output_files"])  # the previous commit's files are gone
    if point == "stage:3":  # the staged units were kept, only the rest answered
        assert manifest["units_answered_now"] == 18 - len(staged)
        assert manifest["rows_staged_before"] == staged_rows
    elif point == "manifest":  # only clean-up was left: the manifest in place is the crashed run's, not rewritten
        assert manifest == seen and "nothing to do" not in resumed
    else:  # everything was staged: the commit rolled forward, nothing answered again
        assert manifest["units_answered_now"] == 0 and "nothing to do" not in resumed


def clean_run_output(clean_run) -> Path:
    return Path(clean_run[0]).parent / "out"


def test_second_run_refuses_while_the_first_is_alive(clean_run, joined_ray, tiny_model, tmp_path):
    src, _ = clean_run
    out = tmp_path / "out"
    common = ["--input", str(src), "--output", str(out), "--model", str(tiny_model), "--rows-per-unit", "4",
              "--concurrency", "1"]
    first = job(common, {"QA_FAULT_SLOW_CALL_S": "2"})
    try:
        lease = out / "_staging" / "_lease.json"
        deadline = time.time() + 120
        while not lease.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        run_id = json.loads(lease.read_text())["run"]
        second = job(common + ["--mode", "resume"])
        text, _ = second.communicate(timeout=120)
        assert second.returncode == 1 and f"is being written by run {run_id}" in text, text
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
        joined_ray.wait_for_workers_of(first.pid)  # none of it goes on writing into the next test


def test_late_write_of_another_run_is_never_taken(tmp_path):
    """Run A dies with unit 0 staged and unit 1 half done; run B adopts unit 0 and redoes unit 1; a write of
    A arriving late (a zombie task) is not published, and the commit holds every row once."""
    import pyarrow.fs as pafs
    from conftest import identity_for

    from pipeline.commit import ROW_COLUMN, UNIT_COLUMN, OutputCommitter, pending_units
    from pipeline.units import ReadUnit

    fs, root, job_id = pafs.LocalFileSystem(), str(tmp_path / "out"), identity_for("x")
    units = [ReadUnit(0, "in", 0, 0, 3), ReadUnit(1, "in", 0, 3, 2)]

    def block(unit: int, rows: int, tag: str) -> pa.Table:
        return pa.table({"id": [f"{unit}-{i}" for i in range(rows)], "error": pa.array([None] * rows, pa.string()),
                         "by": [tag] * rows, UNIT_COLUMN: [unit] * rows, ROW_COLUMN: list(range(rows))})

    a = OutputCommitter(fs, root)
    a.inspect("error", job_id)
    a.begin("error", job_id)
    a.write_block(block(0, 3, "a"))
    a.write_block(block(1, 1, "a"))
    a.release_lease()  # run A is gone
    b = OutputCommitter(fs, root)
    pending, _, adopted, stale = pending_units(units, b.inspect("resume", job_id).staged)
    assert [u.index for u in pending] == [1]
    b.begin("resume", job_id, stale)
    b.write_block(block(1, 2, "b"))
    a.write_block(block(1, 2, "a-late"))  # the zombie
    manifest = b.commit(units, job_id, {}, adopted)
    rows = pa.concat_tables([pq.read_table(f"{root}/{f['path']}") for f in manifest.output_files]).to_pylist()
    assert sorted((r["id"], r["by"]) for r in rows) == [("0-0", "a"), ("0-1", "a"), ("0-2", "a"), ("1-0", "b"),
                                                        ("1-1", "b")]
    assert sorted(p.name for p in Path(root).glob("*.parquet")) == sorted(
        Path(f["path"]).name for f in manifest.output_files)


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
    text = run_job(["--input", str(src), "--output", str(out), "--model", str(tiny_model), "--skip-bad-files"])
    assert f"note: skipped 1 input file(s) not readable as Parquet (--skip-bad-files): {src / 'c.parquet'};" in text
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["skipped_bad_files"] == [str(src / "c.parquet")]
    assert_exactly_once(committed(out))
