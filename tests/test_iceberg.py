"""iceberg:// tables in and out, on a real SQL catalog (a SQLite file): rows exactly once, one snapshot per job
through crash points, re-runs and a concurrent writer; a warehouse on a local folder and on moto's S3."""

from __future__ import annotations

import pyarrow as pa
import pytest
from test_exactly_once import N_ROWS, crash, job, run_job, write_input
from test_s3 import s3_env  # noqa: F401 - the moto server fixture

from pipeline.faults import EXIT_CODE

pytest.importorskip("pyiceberg", reason="needs the iceberg extra")
from pyiceberg.catalog import load_catalog

from pipeline.formats.iceberg import JOB_KEY, STAGING_DIR

pytestmark = pytest.mark.usefixtures("joined_ray")  # jobs join the suite's Ray node (conftest)
ANSWERS = ["answer", "answer_start", "answer_end", "score", "probability", "error"]


def sql_catalog(name: str, tmp, warehouse: str, **props: str):
    """A SQL catalog on tmp/catalog.db, and the PYICEBERG_CATALOG__* variables that configure it for a job
    (pyiceberg reads its environment once, at import: this process passes the properties instead)."""
    props = {"uri": f"sqlite:///{tmp}/catalog.db", "warehouse": warehouse, **props}
    env = {f"PYICEBERG_CATALOG__{name.upper()}__{k.upper().replace('.', '__').replace('-', '_')}": v
           for k, v in props.items()}
    return load_catalog(name, **props), env


def input_rows(tmp) -> pa.Table:
    import pyarrow.parquet as pq

    src = write_input(tmp / "parquet")
    table = pa.concat_tables([pq.read_table(src / "a.parquet"), pq.read_table(src / "b.parquet")])
    return table.append_column("topic", pa.array(["kings" if i % 3 else "rivers" for i in range(N_ROWS)]))


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """Catalog "qa" on SQLite, warehouse a local folder; src.questions: 60 rows partitioned by topic, in two
    appends (four data files)."""
    tmp = tmp_path_factory.mktemp("lake")
    cat, env = sql_catalog("qa", tmp, f"file://{tmp}/warehouse")
    cat.create_namespace("src")
    rows = input_rows(tmp)
    table = cat.create_table("src.questions", schema=rows.schema)
    with table.update_spec() as spec:  # partitioned: the output table is partitioned like it
        spec.add_identity("topic")
    table.append(rows.slice(0, 30))
    table.append(rows.slice(30))
    return cat, env


def args(model, src: str, out: str, *extra: str) -> list[str]:
    return ["--input", src, "--output", out, "--model", str(model), "--rows-per-unit", "4", *extra]


def job_snapshots(table) -> list:
    """Snapshots of the table's history that carry a qa-batch job hash."""
    return [s for s in table.snapshots() if s.summary and s.summary.get(JOB_KEY)]


def assert_once(rows: pa.Table, ids: list[str]) -> None:
    got = rows.column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(set(got)) == len(got), "lost or duplicated rows"


def test_table_in_table_out_and_rerun(lake, tiny_model):
    cat, env = lake
    common = args(tiny_model, "iceberg://qa/src.questions", "iceberg://qa/out.answers")
    run_job(common, env)
    table = cat.load_table("out.answers")
    rows = table.scan().to_arrow()
    assert_once(rows, [f"r{i:03d}" for i in range(N_ROWS)])
    assert rows.column_names == ["id", "question", "context", "topic", *ANSWERS]
    assert rows.filter(pa.compute.equal(rows["id"], "r005"))["error"][0].as_py() == "question is null"
    assert [(f.name, str(f.transform)) for f in table.spec().fields] == [("topic", "identity")]
    assert {t.file.partition[0] for t in table.scan().plan_files()} == {"kings", "rivers"}
    (snapshot,) = job_snapshots(table)
    assert snapshot.summary["added-records"] == str(N_ROWS)
    assert not (lake_dir(table) / STAGING_DIR).exists()

    for mode in ("error", "resume"):  # a re-run of the committed job adds nothing, in any mode
        assert "nothing to do" in run_job(common + ["--mode", mode], env)
    assert len(cat.load_table("out.answers").snapshots()) == 1


def lake_dir(table):
    from pathlib import Path

    return Path(table.location().removeprefix("file://"))


def test_where_and_select(lake, tiny_model):
    """A filter whose rows are scattered (every third row) and a projection: exactly the matching rows,
    with the projected columns; a schema that does not fit an existing table is refused, naming the column."""
    cat, env = lake
    common = args(tiny_model, "iceberg://qa/src.questions", "iceberg://qa/out.kings",
                  "--where", "topic = 'kings' and id < 'r040'", "--select", "id,question,context")
    out = run_job(common, env)
    rows = cat.load_table("out.kings").scan().to_arrow()
    assert_once(rows, [f"r{i:03d}" for i in range(40) if i % 3])
    assert rows.column_names == ["id", "question", "context", *ANSWERS]
    assert "26 rows in" in out
    p = job(args(tiny_model, "iceberg://qa/src.questions", "iceberg://qa/out.kings"), env)  # with "topic"
    text, _ = p.communicate(timeout=300)
    assert p.returncode == 1 and "has no column 'topic'" in text, text


@pytest.mark.parametrize("point", ["commit-list", "manifest"])
def test_crash_point_then_resume(lake, joined_ray, tiny_model, point, monkeypatch):
    """Killed after the commit list is durable (the table still absent) or after the Iceberg commit (the new
    snapshot, complete); one --mode resume leaves exactly one snapshot with the job's hash, every row once."""
    cat, env = lake
    name = f"out.crash_{point.replace('-', '_')}"
    common = args(tiny_model, "iceberg://qa/src.questions", f"iceberg://qa/{name}")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code = crash(common, point, joined_ray)
    assert code in (EXIT_CODE, -9), f"the job did not stop at {point} (exit {code})"
    if point == "commit-list":
        assert not cat.table_exists(name)  # the old state: no table
    else:
        assert cat.load_table(name).scan().to_arrow().num_rows == N_ROWS  # the new snapshot, whole
    resumed = run_job(common + ["--mode", "resume"], env)
    assert "nothing to do" not in resumed
    table = cat.load_table(name)
    assert len(job_snapshots(table)) == 1 and len(table.snapshots()) == 1
    assert_once(table.scan().to_arrow(), [f"r{i:03d}" for i in range(N_ROWS)])
    assert not (lake_dir(table) / STAGING_DIR).exists()


def test_concurrent_writer_between_plan_and_commit(lake, tiny_model, tmp_path):
    """Another writer appends to the output table right before our commit (QA_FAULT_ICEBERG_RACE): our commit
    loses the compare-and-swap, re-reads the table and commits once; its row and ours are all there."""
    import pyarrow.parquet as pq

    cat, env = lake
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("context", pa.string()),
                        ("topic", pa.string()), ("answer", pa.string()), ("answer_start", pa.int64()),
                        ("answer_end", pa.int64()), ("score", pa.float64()), ("probability", pa.float64()),
                        ("error", pa.string())])
    table = cat.create_table("out.race", schema=schema)

    def row(i: str) -> pa.Table:
        return pa.Table.from_pylist([{"id": i, "question": "q", "context": "c"}], schema=schema)

    table.append(row("seed"))
    pq.write_table(row("other-writer"), tmp_path / "race.parquet")
    out = run_job(args(tiny_model, "iceberg://qa/src.questions", "iceberg://qa/out.race"),
                  {**env, "QA_FAULT_ICEBERG_RACE": str(tmp_path / "race.parquet")})
    assert "another writer committed first" in out
    table = cat.load_table("out.race")
    assert_once(table.scan().to_arrow(), ["seed", "other-writer"] + [f"r{i:03d}" for i in range(N_ROWS)])
    assert len(job_snapshots(table)) == 1 and len(table.snapshots()) == 3


def test_warehouse_on_s3(s3_env, tiny_model, tmp_path):  # noqa: F811
    endpoint = s3_env["AWS_ENDPOINT_URL"]
    lake, env = sql_catalog("s3lake", tmp_path, "s3://lake/warehouse", **{
        "s3.endpoint": endpoint, "s3.access-key-id": "testing", "s3.secret-access-key": "testing",
        "s3.region": "us-east-1"})
    lake.create_namespace("src")
    rows = input_rows(tmp_path)
    lake.create_table("src.questions", schema=rows.schema).append(rows)
    common = args(tiny_model, "iceberg://s3lake/src.questions", "iceberg://s3lake/out.answers")
    # The suite's Ray node carries the moto server's address and keys, as a real cluster's nodes carry theirs.
    run_job(common, env)
    table = lake.load_table("out.answers")
    assert table.location().startswith("s3://lake/warehouse/")
    assert_once(table.scan().to_arrow(), [f"r{i:03d}" for i in range(N_ROWS)])
    assert len(job_snapshots(table)) == 1
    assert all(t.file.file_path.startswith("s3://lake/warehouse/out/answers/data/")
               for t in table.scan().plan_files())
