"""Delta Lake tables in and out, on local disk and on moto's S3: rows exactly once, one commit per job carrying the
job's application transaction through crash points, re-runs and a concurrent writer; deletion vectors applied,
column mapping refused."""

from __future__ import annotations

import json
import struct
import uuid
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import identity_for
from test_exactly_once import N_ROWS, crash, run_job, write_input
from test_s3 import s3_env  # noqa: F401 - the moto server fixture

from pipeline.faults import EXIT_CODE
from pipeline.lake import TableError

pytest.importorskip("deltalake", reason="needs the delta extra")
from deltalake import DeltaTable, write_deltalake

from pipeline.formats import ReadOptions, find, open_source
from pipeline.formats.delta import APP_PREFIX, JOB_KEY, ROWS_KEY, STAGING_DIR

pytestmark = pytest.mark.usefixtures("joined_ray")  # jobs join the suite's Ray node (conftest)
ANSWERS = ["answer", "answer_start", "answer_end", "score", "probability", "error"]
IDS = [f"r{i:03d}" for i in range(N_ROWS)]


def input_rows(tmp: Path) -> pa.Table:
    src = write_input(tmp / "parquet")
    table = pa.concat_tables([pq.read_table(src / "a.parquet"), pq.read_table(src / "b.parquet")])
    return table.append_column("topic", pa.array(["kings" if i % 3 else "rivers" for i in range(N_ROWS)]))


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Path:
    """questions: 60 rows partitioned by topic, in two appends (versions 0 and 1, four data files)."""
    tmp = tmp_path_factory.mktemp("delta")
    rows = input_rows(tmp)
    write_deltalake(tmp / "questions", rows.slice(0, 30), partition_by=["topic"])
    write_deltalake(tmp / "questions", rows.slice(30), mode="append")
    return tmp


def args(model, src, out, *extra: str) -> list[str]:
    """A job's arguments; the precision is forced, so that a re-run of a committed job, which answers nothing,
    needs no cluster to choose one (a committed table job is known by its hash only)."""
    return ["--input", str(src), "--output", str(out), "--model", str(model), "--rows-per-unit", "4",
            "--precision", "fp32", *extra]


def job_commits(table: DeltaTable) -> list[dict]:
    """Commits of the table's history that carry a qa-batch job hash."""
    return [c for c in table.history() if c.get(JOB_KEY)]


def assert_once(rows: pa.Table, ids: list[str]) -> None:
    got = rows.column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(set(got)) == len(got), "lost or duplicated rows"


def assert_one_job_commit(table: DeltaTable) -> dict:
    """Exactly one commit carries a job; its application transaction is in the table's state."""
    (commit,) = job_commits(table)
    assert table.transaction_version(APP_PREFIX + commit[JOB_KEY]) == 1
    return commit


def read_with_pyarrow(table: DeltaTable, filesystem=None) -> pa.Table:
    """The committed files read as plain Parquet (the data files hold every column, partition columns too)."""
    paths = [u.removeprefix("s3://") for u in table.file_uris()]
    return pa.concat_tables([pq.read_table(p, filesystem=filesystem) for p in paths])


def test_table_in_table_out_and_rerun(lake, tiny_model):
    out = lake / "answers"
    common = args(tiny_model, lake / "questions", out, "--output-format", "delta")
    text = run_job(common)
    assert f"version 0 of {out}" in text
    table = DeltaTable(out)
    rows = table.to_pyarrow_table()
    assert_once(rows, IDS)
    assert rows.column_names == ["id", "question", "context", "topic", *ANSWERS]
    assert rows.filter(pc.equal(rows["id"], "r005"))["error"][0].as_py() == "question is null"
    assert rows.filter(pc.equal(rows["id"], "r003"))["topic"][0].as_py() == "rivers"  # from the input's log
    assert table.version() == 0 and table.metadata().partition_columns == ["topic"]
    adds = pa.table(table.get_add_actions()).to_pylist()
    assert {a["partition"]["topic"] for a in adds} == {"kings", "rivers"}
    commit = assert_one_job_commit(table)
    assert commit[ROWS_KEY] == N_ROWS and sum(a["num_records"] for a in adds) == N_ROWS
    plain = read_with_pyarrow(table)
    assert_once(plain, IDS)
    assert plain.sort_by("id").select(rows.column_names).equals(rows.sort_by("id"))
    assert not (out / STAGING_DIR).exists()

    for mode in ("error", "resume"):  # a re-run of the committed job adds nothing, in any mode
        assert "nothing to do" in run_job(common[:-2] + ["--mode", mode])  # an existing table: no --output-format
    assert DeltaTable(out).version() == 0


def dv_roaring(rows: list[int]) -> bytes:
    """Delta's serialized deletion vector: a RoaringBitmapArray (one 32-bit bitmap, array containers)."""
    containers: dict[int, list[int]] = {}
    for r in sorted(set(rows)):
        containers.setdefault(r >> 16, []).append(r & 0xFFFF)
    head = struct.pack("<II", 12346, len(containers))  # the portable format's cookie without run containers
    head += b"".join(struct.pack("<HH", k, len(v) - 1) for k, v in containers.items())
    offset, body, offsets = len(head) + 4 * len(containers), b"", b""
    for values in containers.values():
        offsets += struct.pack("<I", offset + len(body))
        body += struct.pack(f"<{len(values)}H", *values)
    return struct.pack("<iqi", 1681511377, 1, 0) + head + offsets + body  # magic, bitmaps, the bitmap's key


def table_with_deletion_vector(root: Path, rows: pa.Table, deleted: list[int]) -> None:
    """A Delta table (as Databricks writes them) of one data file, ``deleted`` rows marked in a deletion vector
    file. deltalake reads deletion vectors but does not write them."""
    (root / "_delta_log").mkdir(parents=True)
    pq.write_table(rows, root / "data.parquet", row_group_size=5)
    data = dv_roaring(deleted)
    dv = root / f"deletion_vector_{uuid.uuid4()}.bin"
    dv.write_bytes(b"\x01" + struct.pack(">i", len(data)) + data + struct.pack(">I", zlib.crc32(data)))
    types = {pa.string(): "string", pa.int64(): "long"}
    schema = {"type": "struct", "fields": [{"name": f.name, "type": types[f.type], "nullable": True, "metadata": {}}
                                           for f in rows.schema]}
    log = [{"protocol": {"minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": ["deletionVectors"],
                         "writerFeatures": ["deletionVectors"]}},
           {"metaData": {"id": str(uuid.uuid4()), "format": {"provider": "parquet", "options": {}},
                         "schemaString": json.dumps(schema), "partitionColumns": [], "createdTime": 0,
                         "configuration": {"delta.enableDeletionVectors": "true"}}},
           {"add": {"path": "data.parquet", "partitionValues": {}, "size": (root / "data.parquet").stat().st_size,
                    "modificationTime": 0, "dataChange": True, "stats": json.dumps({"numRecords": rows.num_rows}),
                    "deletionVector": {"storageType": "p", "pathOrInlineDv": dv.as_uri(), "offset": 1,
                                       "sizeInBytes": len(data), "cardinality": len(deleted)}}}]
    (root / "_delta_log" / "00000000000000000000.json").write_text("\n".join(json.dumps(a) for a in log) + "\n")


def test_deletion_vectors_where_and_select(tmp_path, tiny_model):
    """Deleted rows (a deletion vector across row groups) never come back; --where (a SQL predicate) and
    --select read exactly the matching rows and columns."""
    rows = pa.table({"id": [f"d{i:02d}" for i in range(20)], "question": ["who was born in paris?"] * 20,
                     "context": ["The king of France was born in Paris in 1789."] * 20, "n": list(range(20))})
    deleted = [3, 7, 8, 15]
    table_with_deletion_vector(tmp_path / "dv", rows, deleted)
    kept = [f"d{i:02d}" for i in range(20) if i not in deleted]

    source = open_source(str(tmp_path / "dv"), ReadOptions())
    units, _ = source.plan_units(4, ("id", "question", "context"))
    assert sum(u.length for u in units) == 16
    assert source.identity()["files"][0]["deleted_rows"] == 4

    out = tmp_path / "out"
    text = run_job(args(tiny_model, tmp_path / "dv", out, "--output-format", "delta",
                        "--where", "n >= 2 AND n < 18 AND id NOT IN ('d10')", "--select", "id,question,context"))
    assert "11 rows in" in text  # 2..17: 16 rows, less 4 deleted, less d10
    answered = DeltaTable(out).to_pyarrow_table()
    assert_once(answered, [i for i in kept if 2 <= int(i[1:]) < 18 and i != "d10"])
    assert answered.column_names == ["id", "question", "context", *ANSWERS]


WHERE = pa.table({"id": ["a", "b", "c", "d"], "n": [1, 2, None, 4], "day": pa.array([0, 1, 2, 3], pa.date32()),
                  "ts": pa.array([0, 10**15, None, 2 * 10**15], pa.timestamp("us", tz="UTC")),
                  "ok": [True, False, True, None], "s": ["x", "it's", None, "y"]})


@pytest.mark.parametrize(("where", "ids"), [
    ("n >= 2 AND n < 4", ["b"]),
    ("n BETWEEN 2 AND 4 OR id = 'a'", ["a", "b", "d"]),
    ("n NOT BETWEEN 2 AND 4", ["a"]),  # SQL: a null n matches neither
    ("NOT (n = 1) AND n IS NOT NULL", ["b", "d"]),
    ("n IS NULL", ["c"]),
    ("id NOT IN ('a', 'c')", ["b", "d"]),
    ("day >= '1970-01-03'", ["c", "d"]),
    ("ts > '2000-01-01 00:00:00'", ["b", "d"]),  # Delta timestamps are UTC
    ("ok", ["a", "c"]),
    ("NOT ok OR s = 'it''s'", ["b"]),
    ('"s" <> \'x\'', ["b", "d"]),
])
def test_where_predicates(where, ids):
    """--where's SQL predicates, with SQL's nulls, literals of the compared column's type."""
    from pipeline.formats.delta import parse_where

    expression, _ = parse_where(where, WHERE.schema)
    assert WHERE.filter(expression).column("id").to_pylist() == ids


@pytest.mark.parametrize(("where", "why"), [("n = ", "ends too early"), ("m = 1", "no column 'm'"),
                                            ("n = 'one'", "'one' is not a int64"), ("(n = 1", "expected \\)")])
def test_where_refused(where, why):
    from pipeline.formats.delta import parse_where

    with pytest.raises(TableError, match=why):
        parse_where(where, WHERE.schema)


def test_unreadable_tables_are_refused(tmp_path):
    """Column mapping (data files name columns col-<uuid>: deltalake's own pyarrow reader returns nulls) is
    refused, naming the feature; so is a reader feature this reader does not know."""
    rows = pa.table({"id": ["a", "b"], "question": ["q", "q"], "context": ["c", "c"]})
    write_deltalake(tmp_path / "mapped", rows, configuration={"delta.columnMapping.mode": "name"})
    with pytest.raises(TableError, match=r"column mapping \(delta.columnMapping.mode=name\) is not supported"):
        open_source(str(tmp_path / "mapped"), ReadOptions())

    write_deltalake(tmp_path / "widened", rows)
    log = tmp_path / "widened" / "_delta_log" / "00000000000000000000.json"
    actions = [json.loads(line) for line in log.read_text().splitlines()]
    for a in actions:
        if "protocol" in a:
            a["protocol"] = {"minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": ["typeWidening"],
                             "writerFeatures": ["typeWidening"]}
    log.write_text("\n".join(json.dumps(a) for a in actions) + "\n")
    with pytest.raises(TableError, match="reader feature 'typeWidening' is not supported"):
        open_source(str(tmp_path / "widened"), ReadOptions())


def test_claims_and_missing_extra(lake, tmp_path, monkeypatch):
    """A folder holding _delta_log/ is Delta without asking deltalake; without deltalake, one line naming the
    extra."""
    import sys

    from pipeline.formats import delta

    monkeypatch.setitem(sys.modules, "deltalake", None)  # import deltalake now raises ImportError
    assert find(str(lake / "questions"), None, "input").name == "delta"
    assert find(str(lake / "parquet"), None, "input").name == "parquet"
    assert find(str(tmp_path / "new"), None, "output").name == "parquet"
    with pytest.raises(ImportError, match=r'needs deltalake: pip install -e "\.\[delta\]"'):
        delta.load(str(lake / "questions"))


def test_resume_reads_the_pinned_version(tmp_path):
    """A source reopened for a resume reads the version the interrupted run recorded, not the table's latest."""
    rows = pa.table({"id": ["a", "b"], "question": ["q", "q"], "context": ["c", "c"]})
    write_deltalake(tmp_path / "t", rows)
    first = open_source(str(tmp_path / "t"), ReadOptions())
    write_deltalake(tmp_path / "t", rows, mode="append")
    latest = open_source(str(tmp_path / "t"), ReadOptions())
    assert (first.version, latest.version) == (0, 1) and len(latest.files) == 2
    recorded = {"version": 2, "input": first.identity()}  # what the interrupted run staged as its job
    again = latest.pinned(recorded)
    assert again.version == 0 and again.identity() == first.identity()
    assert latest.pinned({"version": 2, "input": {**first.identity(), "table": "/elsewhere"}}) is latest


def test_existing_table_must_fit(tmp_path):
    """Appending to a table refuses, naming the column, a column it lacks or a type that differs, before any
    staged file moves into the table."""
    from pipeline.commit import ROW_COLUMN, UNIT_COLUMN
    from pipeline.formats.delta import DeltaSink
    from pipeline.units import ReadUnit

    out = tmp_path / "t"
    write_deltalake(out, pa.table({"id": pa.array([1], pa.int64()), "topic": ["x"]}))
    sink = DeltaSink(str(out))
    with pytest.raises(TableError, match="has no column 'answer', which the job writes"):
        sink.check_columns(["id", "topic", "answer"])
    sink.check_columns(["id", "topic"])
    job = identity_for("x")
    sink.begin("error", job).write_block(pa.table({"id": ["a", "b"], "topic": ["x", "x"], UNIT_COLUMN: [0, 0],
                                                   ROW_COLUMN: [0, 1]}))
    with pytest.raises(TableError, match="""column 'id' is "long" in the table but "string" in the job's rows"""):
        sink.commit([ReadUnit(0, "in", 0, 0, 2)], job, {})
    assert DeltaTable(out).version() == 0
    assert [p.name for p in out.glob("*.parquet")] == [DeltaTable(out).file_uris()[0].rsplit("/", 1)[-1]]


@pytest.mark.parametrize("point", ["commit-list", "manifest"])
def test_crash_point_then_resume(lake, joined_ray, tiny_model, point):
    """Killed after the commit list is durable (no table yet) or after the Delta commit (version 0, complete);
    one --mode resume leaves exactly one commit, carrying the job's transaction, and every row once."""
    out = lake / f"crash_{point}"
    common = args(tiny_model, lake / "questions", out, "--output-format", "delta")
    code = crash(common, point, joined_ray)
    assert code in (EXIT_CODE, -9), f"the job did not stop at {point} (exit {code})"
    if point == "commit-list":
        assert not DeltaTable.is_deltatable(str(out))  # the old state: no table
        assert (out / STAGING_DIR).exists()
    else:
        assert DeltaTable(out).to_pyarrow_table().num_rows == N_ROWS  # the new version, whole
    # No --output-format: a folder holding an interrupted run's staging (no table yet) is a Delta output too.
    resumed = run_job(args(tiny_model, lake / "questions", out, "--mode", "resume"))
    assert "nothing to do" not in resumed
    table = DeltaTable(out)
    assert table.version() == 0
    assert_one_job_commit(table)
    assert_once(table.to_pyarrow_table(), IDS)
    assert not (out / STAGING_DIR).exists()


def test_concurrent_writer_between_plan_and_commit(lake, tiny_model, tmp_path):
    """Another writer appends to the output table right before our commit (QA_FAULT_DELTA_RACE): our commit
    loses (the log's next version exists), re-reads the table, finds no transaction of this job and commits
    once; its row and ours are all there."""
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("context", pa.string()),
                        ("topic", pa.string()), ("answer", pa.string()), ("answer_start", pa.int64()),
                        ("answer_end", pa.int64()), ("score", pa.float64()), ("probability", pa.float64()),
                        ("error", pa.string())])

    def row(i: str) -> pa.Table:
        return pa.Table.from_pylist([{"id": i, "question": "q", "context": "c"}], schema=schema)

    out = tmp_path / "race"
    write_deltalake(out, row("seed"))
    pq.write_table(row("other-writer"), tmp_path / "race.parquet")
    text = run_job(args(tiny_model, lake / "questions", out), {"QA_FAULT_DELTA_RACE": str(tmp_path / "race.parquet")})
    assert "another writer committed first" in text
    table = DeltaTable(out)
    assert_once(table.to_pyarrow_table(), ["seed", "other-writer", *IDS])
    assert table.version() == 2  # the seed, the other writer, ours
    assert assert_one_job_commit(table)["version"] == 2


def test_refresh_is_one_commit_replacing_the_rows_it_read(tmp_path, tiny_model):
    """--mode refresh into a Delta table: night one creates it; night two (the input table overwritten: contexts
    edited, rows deleted and added) is one commit that removes night one's files and adds exactly the current
    rows, the unchanged ones with night one's answers; the same night again adds no version."""
    contexts = ["The king of France was born in Paris in 1789.", "The river runs by the city in the year one."]
    rows = pa.table({"id": [f"n{i:02d}" for i in range(24)], "question": [f"who is the king {i}?" for i in range(24)],
                     "context": [contexts[i % 2] for i in range(24)], "shelf": [f"s{i % 3}" for i in range(24)]})
    write_deltalake(tmp_path / "docs", rows, partition_by=["shelf"])
    out = tmp_path / "answers"
    common = args(tiny_model, tmp_path / "docs", out, "--mode", "refresh", "--output-format", "delta")
    assert "refresh: every row is answered: no committed output yet" in run_job(common)
    before = DeltaTable(out).to_pyarrow_table()
    night_one = {a["path"] for a in pa.table(DeltaTable(out).get_add_actions()).to_pylist()}

    edited = rows.to_pylist()
    for r in edited[:2]:
        r["context"] += " It was rebuilt in the year two."
    new = [{"id": f"new{i}", "question": "where is the river?", "context": contexts[1], "shelf": "s0"} for i in range(3)]
    write_deltalake(tmp_path / "docs", pa.Table.from_pylist(edited[:-2] + new, schema=rows.schema), mode="overwrite")
    log = run_job(common)
    assert "take the committed answers" in log and "5 rows in" in log  # 2 edited + 3 new answered
    table = DeltaTable(out)
    assert table.version() == 1 and len(job_commits(table)) == 2
    after = table.to_pyarrow_table()
    assert_once(after, [r["id"] for r in edited[:-2] + new])
    assert not night_one & {a["path"] for a in pa.table(table.get_add_actions()).to_pylist()}  # all replaced
    kept = pa.array([f"n{i:02d}" for i in range(2, 22)])
    assert after.filter(pc.is_in(after["id"], kept)).sort_by("id").select(["id", *ANSWERS]).equals(
        before.filter(pc.is_in(before["id"], kept)).sort_by("id").select(["id", *ANSWERS]))
    assert "nothing to do" in run_job(common)
    assert DeltaTable(out).version() == 1


def test_tables_on_s3(s3_env, tiny_model, tmp_path):  # noqa: F811
    """Input and output tables on moto's S3: delta-rs commits with a conditional put (If-None-Match), which
    moto honours."""
    import os

    import pyarrow.fs as pafs

    options = {"AWS_ENDPOINT_URL": s3_env["AWS_ENDPOINT_URL"], "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    write_deltalake("s3://lake/delta/questions", input_rows(tmp_path), partition_by=["topic"],
                    storage_options=options)
    common = args(tiny_model, "s3://lake/delta/questions", "s3://lake/delta/answers", "--output-format", "delta")
    # The suite's Ray node carries the moto server's address and keys, as a real cluster's nodes carry theirs.
    run_job(common)
    table = DeltaTable("s3://lake/delta/answers", storage_options=options)
    assert_once(table.to_pyarrow_table(), IDS)
    assert_one_job_commit(table)
    assert all(u.startswith("s3://lake/delta/answers/part-") for u in table.file_uris())
    s3 = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"])
    assert_once(read_with_pyarrow(table, s3), IDS)
    assert s3.get_file_info(f"lake/delta/answers/{STAGING_DIR}").type == pafs.FileType.NotFound
    assert "nothing to do" in run_job(common + ["--mode", "resume"])
    assert DeltaTable("s3://lake/delta/answers", storage_options=options).version() == 0
