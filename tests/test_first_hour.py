"""No trap on the way (issue 35): an input without an id column gets derived, stable ids; a 0-row input commits a
file with the output's schema; a re-run with nothing to do prints no old figures; a moved output reads through its
manifest; Ray's own lines stay in the job's log file when a worker dies; DuckDB reads an output as the docs say."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_exactly_once import job, run_job

pytestmark = pytest.mark.usefixtures("joined_ray")  # jobs join the suite's Ray node (conftest)

ANSWERED = ["answer", "answer_start", "answer_end", "score", "probability", "error"]
ANSWER_TYPES = [pa.string(), pa.int64(), pa.int64(), pa.float64(), pa.float64(), pa.string()]
CONTEXT = "The king of France was born in Paris in 1789."


def write_without_ids(directory: Path) -> Path:
    """Seven rows without an id column: a.parquet (rows 0-3, row groups of 2) and sub/b.parquet (rows 0-2)."""
    table = pa.table({"question": [f"who is the king {i}?" for i in range(7)], "context": [CONTEXT] * 7,
                      "n": list(range(7))})
    (directory / "sub").mkdir(parents=True)
    pq.write_table(table.slice(0, 4), directory / "a.parquet", row_group_size=2)
    pq.write_table(table.slice(4), directory / "sub" / "b.parquet")
    return directory


def duckdb_reads(sql: str) -> pa.Table:
    result = duckdb.connect().sql(sql)
    return result.to_arrow_table() if hasattr(result, "to_arrow_table") else result.fetch_arrow_table()  # < 1.4


def through_manifest(out: Path) -> pa.Table:
    """The committed set as a reader following the manifest sees it: files named relative to the output."""
    manifest = json.loads((out / "_manifest.json").read_text())
    return pq.read_table([str(out / f["path"]) for f in manifest["output_files"]])


@pytest.fixture(scope="module")
def answered_twice(tmp_path_factory, tiny_model):
    """The input without ids answered twice (Ray's lines when a worker dies: tests/test_poison_rows.py)."""
    base = tmp_path_factory.mktemp("first-hour")
    src = write_without_ids(base / "in")
    common = ["--model", str(tiny_model), "--rows-per-unit", "2", "--input", str(src)]
    first = run_job(common + ["--output", str(base / "one")])
    run_job(common + ["--output", str(base / "two")])
    return src, base / "one", base / "two", first


def test_an_input_without_ids_gets_stable_unique_ids(answered_twice):
    src, one, two, text = answered_twice
    assert "note: input" in text and "has no column 'id'" in text
    first, second = (pq.read_table(o).sort_by("n") for o in (one, two))
    ids = first.column("id").to_pylist()
    assert ids == ["a.parquet:0", "a.parquet:1", "a.parquet:2", "a.parquet:3",
                   "sub/b.parquet:0", "sub/b.parquet:1", "sub/b.parquet:2"]
    assert second.column("id").to_pylist() == ids and len(set(ids)) == len(ids)
    assert first.column_names[0] == "id" and first.schema.field("id").type == pa.string()
    assert first.column_names[-len(ANSWERED):] == ANSWERED and first.column("error").null_count == 7
    # Joinable back to the input row: DuckDB's file name (below the input folder) and row number.
    joined = duckdb_reads(
        f"SELECT o.id, i.n FROM read_parquet('{src}/**/*.parquet', filename=true, file_row_number=true) i "
        f"JOIN read_parquet('{one}/*.parquet') o ON o.id = replace(i.filename, '{src}/', '') || ':' || "
        "i.file_row_number ORDER BY i.n")
    assert joined.column("id").to_pylist() == ids and joined.column("n").to_pylist() == list(range(7))


def test_duckdb_reads_a_committed_output_as_the_docs_say(answered_twice):
    _, one, _, _ = answered_twice
    expected = pq.read_table(one).sort_by("id")
    folder = duckdb_reads(f"SELECT * FROM read_parquet('{one}/*.parquet') ORDER BY id")
    assert folder.to_pylist() == expected.to_pylist()
    manifest = duckdb_reads(
        f"SET VARIABLE files = (SELECT list('{one}/' || f.path) FROM "
        f"(SELECT unnest(output_files) AS f FROM read_json('{one}/_manifest.json'))); "
        "SELECT * FROM read_parquet(getvariable('files')) ORDER BY id")
    assert manifest.to_pylist() == expected.to_pylist()


def test_a_moved_output_reads_through_its_manifest(answered_twice, tiny_model, tmp_path):
    src, _, two, _ = answered_twice
    moved = tmp_path / "elsewhere" / "answers"
    shutil.copytree(two, moved)
    manifest = json.loads((moved / "_manifest.json").read_text())
    assert all(f["path"].startswith("part-") and "/" not in f["path"] for f in manifest["output_files"])
    assert through_manifest(moved).sort_by("id").equals(pq.read_table(two).sort_by("id"))
    # The job still knows it there: a resume has nothing to do, and says so without the earlier run's figures.
    text = run_job(["--model", str(tiny_model), "--rows-per-unit", "2", "--input", str(src), "--output", str(moved),
                    "--mode", "resume"])
    assert "nothing to do" in text and "durations_s" not in text and "questions_per_s" not in text, text


@pytest.mark.parametrize("mode", ["resume", "refresh"])
def test_a_rerun_with_nothing_to_do_prints_no_old_figures(answered_twice, tiny_model, mode):
    src, _, two, _ = answered_twice
    before = (two / "_manifest.json").read_text()
    p = job(["--model", str(tiny_model), "--rows-per-unit", "2", "--input", str(src), "--output", str(two),
             "--mode", mode])
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 0, text
    lines = text.strip().splitlines()
    said = (f"nothing to do: output {two} already holds this job's committed answers (7 rows, 0 with errors, "
            f"committed by run {json.loads(before)['run']}: manifest {two}/_manifest.json)")
    assert [line for line in lines if not line.startswith("note: input")] == [said], text
    assert (two / "_manifest.json").read_text() == before


def test_a_0_row_input_commits_a_file_with_the_output_schema(tiny_model, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("context", pa.string()),
                        ("day", pa.date32())])
    pq.write_table(schema.empty_table(), src / "night.parquet")
    out = tmp_path / "out"
    # --precision: nothing to answer and nothing to choose for, so no Ray either
    text = run_job(["--model", str(tiny_model), "--precision", "fp32", "--input", str(src), "--output", str(out)])
    assert "done: 0 rows in, 0 rows out" in text
    expected = pa.schema(list(schema) + [pa.field(n, t) for n, t in zip(ANSWERED, ANSWER_TYPES, strict=True)])
    manifest = json.loads((out / "_manifest.json").read_text())
    assert [(f["rows"], f["path"].startswith("part-")) for f in manifest["output_files"]] == [(0, True)]
    for table in (pq.read_table(out), through_manifest(out)):
        assert table.num_rows == 0 and table.schema.equals(expected), table.schema
    read = duckdb.connect().sql(f"SELECT * FROM read_parquet('{out}/*.parquet')")
    assert read.columns == expected.names and read.fetchall() == []
    assert [str(t) for t in read.types][-6:] == ["VARCHAR", "BIGINT", "BIGINT", "DOUBLE", "DOUBLE", "VARCHAR"]
