"""--mode refresh: a night's changes answered, every other committed answer reused, exactly once at every crash
point; the output equals a full run's on the new input."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_exactly_once import crash, run_job

from pipeline.faults import EXIT_CODE

pytestmark = pytest.mark.usefixtures("joined_ray")
CONTEXTS = ["The king of France was born in Paris in 1789.", "The river runs by the city in the year one.",
            "The queen was born in the first year of the war."]
ANSWERS = ["answer", "answer_start", "answer_end", "score", "probability", "error"]


def night_one(directory: Path) -> Path:
    """Three files of 20 rows, row groups of 8."""
    directory.mkdir(parents=True)
    for f in range(3):
        n = 20
        pq.write_table(pa.table({"id": [f"f{f}-{i:02d}" for i in range(n)],
                                 "question": [f"who is the king {i} of {f}?" for i in range(n)],
                                 "context": [CONTEXTS[(i + f) % 3] for i in range(n)],
                                 "shelf": [f] * n}), directory / f"part-{f}.parquet", row_group_size=8)
    return directory


def night_two(directory: Path) -> dict:
    """part-0: a passthrough column changed, no text; part-1: rewritten with 4 contexts edited and 3 rows
    deleted; part-2: removed; part-3: new, 6 rows. Returns what changed."""
    t = pq.read_table(directory / "part-0.parquet")
    pq.write_table(t.set_column(3, "shelf", pa.array([100] * t.num_rows)), directory / "part-0.parquet")
    rows = pq.read_table(directory / "part-1.parquet").to_pylist()
    for r in rows[:4]:
        r["context"] += " It was rebuilt in the year two."
    pq.write_table(pa.Table.from_pylist(rows[:-3]), directory / "part-1.parquet", row_group_size=8)
    (directory / "part-2.parquet").unlink()
    pq.write_table(pa.table({"id": [f"new-{i}" for i in range(6)], "question": [f"where is {i}?" for i in range(6)],
                             "context": ["The city is on the river of France."] * 6, "shelf": [3] * 6}),
                   directory / "part-3.parquet")
    return {"edited": {r["id"] for r in rows[:4]}, "deleted": {r["id"] for r in rows[-3:]},
            "new": {f"new-{i}" for i in range(6)}, "rows": 20 + 17 + 6}


def rows_of(out: Path, finished: bool = True) -> pa.Table:
    """The committed rows, as a reader following the manifest reads them; ``finished``: no staging left."""
    manifest = json.loads((out / "_manifest.json").read_text())
    table = pa.concat_tables([pq.read_table(out / Path(f["path"]).name) for f in manifest["output_files"]])
    assert table.num_rows == manifest["rows_out"] and not (finished and (out / "_staging").exists())
    ids = list(zip(*(table.column(c).to_pylist() for c in ("id", "question_id") if c in table.column_names)))
    assert len(ids) == len(set(ids)), "a row twice"
    return table.sort_by("id")


def manifest_of(out: Path) -> dict:
    return json.loads((out / "_manifest.json").read_text())


@pytest.fixture(scope="module")
def nights(tmp_path_factory, tiny_model):
    """Night one refreshed into an empty output (a full run), then the input of night two, and a full run of
    night two's input (the reference)."""
    base = tmp_path_factory.mktemp("nights")
    src = night_one(base / "in")
    first = base / "night-one"
    log = run_job(args(src, first, tiny_model))
    assert "refresh: every row is answered: no committed output yet" in log
    changes = night_two(src)
    run_job(args(src, base / "full", tiny_model, mode="overwrite"))
    return src, first, rows_of(first), rows_of(base / "full"), changes


def args(src: Path | str, out: Path | str, model: Path, mode: str = "refresh", *more: str) -> list[str]:
    return ["--input", str(src), "--output", str(out), "--model", str(model), "--rows-per-unit", "8",
            "--mode", mode, *more]


def copy_output(first: Path, to: Path) -> Path:
    shutil.copytree(first, to)  # the manifest names files by absolute path: refresh finds them next to it
    return to


def test_refresh_answers_exactly_the_changed_rows(nights, tiny_model, tmp_path):
    src, first, before, full, changes = nights
    out = copy_output(first, tmp_path / "out")
    log = run_job(args(src, out, tiny_model))
    assert "refresh: rows whose question and context are unchanged take the committed answers" in log
    manifest = manifest_of(out)
    changed = len(changes["edited"]) + len(changes["new"])
    assert manifest["refresh"]["rows_reused"] == changes["rows"] - changed
    assert manifest["refresh"]["rows_answered"] == changed
    assert manifest["refresh"]["answered_because"] == {"new or edited question or context": changed}
    assert 0 < manifest["refresh"]["reuse_pass_s"] < manifest["durations_s"]["total"]
    assert manifest["stages"]["input_rows"] == changed  # what the model was given: the changed rows only
    assert "kept by --mode refresh" in manifest["precision"]["reason"]  # auto keeps the committed variant
    after = rows_of(out)
    # The same rows, answers and current passthrough values as a full run on the new input.
    assert after.equals(full.select(after.column_names)) and after.schema.names == full.schema.names
    ids = set(after.column("id").to_pylist())
    assert not ids & changes["deleted"] and changes["new"] <= ids
    assert set(after.filter(pa.compute.starts_with(after.column("id"), "f0-")).column("shelf").to_pylist()) == {100}
    # Reused rows are the committed ones, exactly.
    kept = sorted(ids - changes["edited"] - changes["new"])
    old = before.filter(pa.compute.is_in(before.column("id"), pa.array(kept))).select(["id", *ANSWERS])
    assert after.filter(pa.compute.is_in(after.column("id"), pa.array(kept))).select(["id", *ANSWERS]).equals(old)

    # The same night again: nothing to do, no cluster needed (a dead address would fail it).
    assert "nothing to do" in run_job(args(src, out, tiny_model, "refresh", "--address", "127.0.0.1:9"))
    # Another decoding setting: every row answered, and the run says why.
    log = run_job(args(src, out, tiny_model, "refresh", "--max-answer-len", "5"))
    assert "refresh: every row is answered: the decoding settings changed" in log
    manifest = manifest_of(out)
    assert manifest["refresh"]["rows_reused"] == 0 and manifest["stages"]["input_rows"] == changes["rows"]
    assert manifest["refresh"]["answered_because"] == {"the decoding settings changed": "every row"}


# (crash point, what a reader following the manifest sees afterwards: night one's set or the refreshed one)
CRASHES = [("stage:1", "before"), ("stage:2", "before"), ("commit-list", "before"), ("publish:1", "before"),
           ("manifest", "after")]


@pytest.mark.parametrize(("point", "seen"), CRASHES)
def test_refresh_crash_then_resume(nights, tiny_model, tmp_path, joined_ray, point, seen):
    """stage:1 falls in the reuse pass (its first staged part), stage:2 in the answering, the others in the
    commit; --mode resume (or refresh) finishes the refresh: every row once, the full run's answers."""
    src, first, before, full, changes = nights
    out = copy_output(first, tmp_path / "out")
    code = crash(args(src, out, tiny_model), point, joined_ray)
    assert code in (EXIT_CODE, -signal.SIGKILL), f"the job did not stop at {point} (exit {code})"
    visible = rows_of(out, finished=False)
    assert visible.equals(before if seen == "before" else full.select(visible.column_names))
    # The nightly command itself (--mode refresh) finishes its own interrupted run, as --mode resume does.
    resumed = run_job(args(src, out, tiny_model, "refresh" if point == "commit-list" else "resume"))
    assert "nothing to do" not in resumed
    after = rows_of(out)
    assert after.equals(full.select(after.column_names))
    assert manifest_of(out)["refresh"].get("rows_reused", 0) == changes["rows"] - 10
    if point == "commit-list":  # everything was staged: only the commit was left
        assert manifest_of(out)["units_answered_now"] == 0


def test_fan_out_refresh_answers_only_the_added_question(tiny_model, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(12)], "context": [CONTEXTS[i % 3] for i in range(12)]}),
                   docs / "d.parquet")
    questions = tmp_path / "q.parquet"
    pq.write_table(pa.table({"question_id": ["who", "when"], "question": ["who is the king?", "when was he born?"]}),
                   questions)
    out = tmp_path / "out"
    common = ["--input", str(docs), "--output", str(out), "--model", str(tiny_model), "--questions",
              str(questions), "--rows-per-unit", "5", "--mode", "refresh"]
    run_job(common)
    night_one = rows_of(out)
    pq.write_table(pa.table({"question_id": ["who", "when", "where"],
                             "question": ["who is the king?", "when was he born?", "where is the river?"]}), questions)
    run_job(common)
    manifest = manifest_of(out)
    assert manifest["refresh"]["rows_reused"] == 24 and manifest["refresh"]["rows_answered"] == 12
    assert manifest["stages"]["input_rows"] == 12  # (document, question) rows given to the model: the new question's
    after = rows_of(out).sort_by([("id", "ascending"), ("question_id", "ascending")])
    assert after.num_rows == 36 and after.column_names == night_one.column_names
    full = tmp_path / "full"
    run_job([*common[:-2], "--output", str(full)])
    reference = rows_of(full).sort_by([("id", "ascending"), ("question_id", "ascending")])
    assert after.equals(reference)


def test_refresh_of_an_iceberg_table(nights, tiny_model, tmp_path):
    """An Iceberg table partitioned by a column in, one partitioned like it out (SQLite catalog): night one creates
    the output; night two (the input table overwritten with night two's rows) is one overwrite snapshot holding
    exactly the current rows, each data file in one partition, with the full run's answers."""
    pytest.importorskip("pyiceberg", reason="needs the iceberg extra")
    from test_iceberg import sql_catalog

    from pipeline.formats.iceberg import JOB_KEY

    cat, env = sql_catalog("qa", tmp_path, f"file://{tmp_path}/warehouse")
    files = night_one(tmp_path / "in")
    rows = pa.concat_tables([pq.read_table(f) for f in sorted(files.glob("*.parquet"))])
    cat.create_namespace("src")
    source = cat.create_table("src.docs", schema=rows.schema)
    with source.update_spec() as spec:
        spec.add_identity("shelf")
    source.append(rows)
    table_uri = "iceberg://qa/out.answers"
    run_job(args("iceberg://qa/src.docs", table_uri, tiny_model), env)
    first = cat.load_table("out.answers").current_snapshot()
    changes = night_two(files)
    source.overwrite(pa.concat_tables([pq.read_table(f) for f in sorted(files.glob("*.parquet"))]))
    log = run_job(args("iceberg://qa/src.docs", table_uri, tiny_model), env)
    assert "take the committed answers" in log
    table = cat.load_table("out.answers")
    snapshot = table.current_snapshot()
    assert snapshot.parent_snapshot_id == first.snapshot_id and snapshot.summary.operation.value == "overwrite"
    assert snapshot.summary.get(JOB_KEY) and int(snapshot.summary["added-records"]) == changes["rows"]
    assert [str(f.transform) for f in table.spec().fields] == ["identity"]
    for task in table.scan().plan_files():  # one partition per file, the file's rows all of it
        shelves = pq.read_table(task.file.file_path.removeprefix("file://"), columns=["shelf"]).column("shelf")
        assert set(shelves.to_pylist()) == {task.file.partition[0]}
    got = table.scan().to_arrow().sort_by("id")
    _, _, _, full, _ = nights
    assert got.equals(full.select(got.column_names).cast(got.schema))
    assert "nothing to do" in run_job(args("iceberg://qa/src.docs", table_uri, tiny_model), env)
    assert cat.load_table("out.answers").current_snapshot().snapshot_id == snapshot.snapshot_id


def test_wide_refresh_answers_the_edited_documents(tiny_model, tmp_path):
    """--wide: a document keeps its row of answers while its context and the question set are unchanged; a new
    question answers every document again, and says why."""
    docs = tmp_path / "docs"
    docs.mkdir()
    table = pa.table({"id": [f"d{i}" for i in range(10)], "context": [CONTEXTS[i % 3] for i in range(10)]})
    pq.write_table(table, docs / "d.parquet")
    questions = tmp_path / "q.parquet"
    pq.write_table(pa.table({"question_id": ["who", "when"], "question": ["who is the king?", "when was he born?"]}),
                   questions)
    out = tmp_path / "out"
    common = ["--input", str(docs), "--output", str(out), "--model", str(tiny_model), "--questions", str(questions),
              "--wide", "--rows-per-unit", "4", "--mode", "refresh"]
    run_job(common)
    contexts = table.column("context").to_pylist()
    contexts[3] += " The war was long."
    pq.write_table(table.set_column(1, "context", pa.array(contexts)), docs / "d.parquet")
    run_job(common)
    manifest = manifest_of(out)
    assert (manifest["refresh"]["rows_reused"], manifest["refresh"]["rows_answered"]) == (9, 1)
    full = tmp_path / "full"
    run_job([*common[:-2], "--output", str(full)])
    assert rows_of(out).equals(rows_of(full))
    pq.write_table(pa.table({"question_id": ["who", "when", "where"],
                             "question": ["who is the king?", "when was he born?", "where is the river?"]}), questions)
    log = run_job(common)
    assert "every row is answered: the fan-out questions changed" in log
    assert rows_of(out).column_names[-7:] == ["answer_who", "score_who", "answer_when", "score_when", "answer_where",
                                              "score_where", "error"]
