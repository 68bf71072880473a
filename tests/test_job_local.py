"""The whole job on a local Ray: rows in == rows out, ids kept, bad rows carry an error."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from jobs.answer import parse_args, run
from jobs.config import JobConfig
from jobs.plan import ColumnError
from jobs.pool import LARGE_MODEL_BYTES, actor_layout
from pipeline.answer import Answerer
from pipeline.backends import load_model
from pipeline.config import Columns


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def input_table(n: int) -> pa.Table:
    contexts = ["The king of France was born in Paris in 1789.", "The river runs by the city. " * 40]
    questions = [f"who is the king {i}?" if i % 5 else "where is the river?" for i in range(n)]
    q = pa.array(questions)
    c = pa.array([contexts[i % 2] for i in range(n)])
    # bad rows: null question, empty context, whitespace question
    q = pa.array([None if i == 3 else ("   " if i == 7 else v) for i, v in enumerate(q.to_pylist())])
    c = pa.array(["" if i == 4 else v for i, v in enumerate(c.to_pylist())])
    return pa.table({"doc_id": [f"row-{i:03d}" for i in range(n)], "q": q, "ctx": c,
                     "extra": list(range(n)), "nested": [{"k": i} for i in range(n)]})


def test_job_answers_every_row_once(local_ray, tiny_model, tmp_path):
    table = input_table(37)
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(table.slice(0, 20), src / "part-0.parquet", row_group_size=8)
    pq.write_table(table.slice(20), src / "part-1.parquet", row_group_size=8)
    out = tmp_path / "out"
    cfg = parse_args(["--input", str(src / "part-*.parquet"), "--output", str(out), "--model", str(tiny_model),
                      "--id-column", "doc_id", "--question-column", "q", "--context-column", "ctx",
                      "--concurrency", "2", "--cpus-per-actor", "1", "--rows-per-unit", "5"])
    manifest = run(cfg)

    result = pq.read_table(out)
    assert manifest.rows_in == manifest.rows_out == result.num_rows == 37
    assert sorted(result.column("doc_id").to_pylist()) == table.column("doc_id").to_pylist()
    assert len(set(result.column("doc_id").to_pylist())) == 37
    assert result.column_names[:5] == ["doc_id", "q", "ctx", "extra", "nested"]
    by_id = {r["doc_id"]: r for r in result.to_pylist()}
    assert by_id["row-003"]["error"] == "question is null" and by_id["row-003"]["answer"] is None
    assert by_id["row-004"]["error"] == "context is empty"
    assert by_id["row-007"]["error"] == "question is empty"
    assert manifest.errors == 3
    for r in by_id.values():
        assert r["extra"] == int(r["doc_id"][4:]) and r["nested"] == {"k": r["extra"]}
        if r["error"] is None:
            assert r["ctx"][r["answer_start"]:r["answer_end"]] == r["answer"]

    # The job's answers are the pure stage's answers.
    spec, session = load_model(str(tiny_model))
    direct = Answerer(spec, session, Columns("doc_id", "q", "ctx"))(table)
    for r in direct.to_pylist():
        got = by_id[r["doc_id"]]
        assert (got["answer"], got["answer_start"], got["error"]) == (r["answer"], r["answer_start"], r["error"])
        if r["score"] is not None:
            assert got["score"] == pytest.approx(r["score"], abs=1e-4)

    on_disk = json.loads((out / "_manifest.json").read_text())
    assert on_disk["rows_out"] == 37 and on_disk["model"]["sha256"] == spec.identity()["sha256"]
    assert sum(f["rows"] for f in on_disk["output_files"]) == 37
    assert on_disk["read_units"] == 10  # row groups of 8 cut into units of at most 5 rows
    assert on_disk["stages"]["rows"] == 37
    assert on_disk["stages"]["actors"] == 2 and on_disk["stages"]["model_load"] > 0  # summed over both actors
    durations = on_disk["durations_s"]
    assert 0 < durations["until_first_actor_ready"] < durations["answer_and_write"] <= durations["total"]


def test_refuses_missing_column_and_existing_output(local_ray, tiny_model, tmp_path):
    pq.write_table(pa.table({"id": [1], "question": ["q"]}), tmp_path / "in.parquet")
    with pytest.raises(ColumnError, match="no column 'context'"):
        run(JobConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "o"), model=str(tiny_model)))
    pq.write_table(pa.table({"id": [1], "question": ["q"], "context": ["c"]}), tmp_path / "in.parquet")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        run(JobConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "o"), model=str(tiny_model)))
    assert (tmp_path / "o" / "x").read_text() == "keep me"


def test_fan_out_long_and_wide(local_ray, tiny_model, tmp_path, capsys):
    docs = pa.table({"id": ["d1", "d2", "d3"], "title": ["a", "b", "c"],
                     "context": ["The king of France was born in Paris in 1789.", "The river runs by the city.", ""]})
    questions = pa.table({"question_id": ["who", "where", "when"],
                          "question": ["who was born?", "where is the river?", "what year?"]})
    pq.write_table(docs, tmp_path / "docs.parquet")
    pq.write_table(questions, tmp_path / "q.parquet")
    common = ["--input", str(tmp_path / "docs.parquet"), "--questions", str(tmp_path / "q.parquet"),
              "--model", str(tiny_model), "--progress-every", "0.2", "--rows-per-unit", "2"]
    long_manifest = run(parse_args(common + ["--output", str(tmp_path / "long")]))
    long = pq.read_table(tmp_path / "long").to_pylist()
    assert long_manifest.rows_in == 3 and long_manifest.rows_out == 9 and len(long) == 9
    assert [(r["id"], r["question_id"]) for r in long] == [(d, q) for d in ("d1", "d2", "d3")
                                                           for q in ("who", "where", "when")]
    assert all(r["title"] for r in long)
    assert [r["error"] for r in long if r["id"] == "d3"] == ["context is empty"] * 3

    # Each (document, question) answer equals asking that question of that document alone.
    spec, session = load_model(str(tiny_model))
    single = Answerer(spec, session)(pa.table({"question": ["where is the river?"],
                                               "context": ["The river runs by the city."]})).to_pylist()[0]
    got = next(r for r in long if (r["id"], r["question_id"]) == ("d2", "where"))
    assert (got["answer"], got["answer_start"]) == (single["answer"], single["answer_start"])

    run(parse_args(common + ["--output", str(tmp_path / "wide"), "--wide"]))
    wide = pq.read_table(tmp_path / "wide")
    assert wide.num_rows == 3
    assert wide.column_names == ["id", "title", "context", "answer_who", "score_who", "answer_where",
                                 "score_where", "answer_when", "score_when", "error"]
    rows = wide.to_pylist()
    assert rows[1]["answer_where"] == single["answer"]
    assert rows[2]["error"] == "who: context is empty; where: context is empty; when: context is empty"
    out = capsys.readouterr().out
    assert "done: 3 rows in, 9 rows out, 3 with errors" in out
    progress = [line for line in out.splitlines() if line.startswith("progress: ")]
    assert progress and all("/3 rows (" in line and "rows/s, ETA" in line for line in progress)


def test_bf16_is_refused_with_onnxruntime():
    with pytest.raises(ValueError, match="bf16 runs on the OpenVINO backend"):
        JobConfig(input="in", output="out", backend="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        JobConfig(input="in", output="out", precision="fp16")


def test_actor_layout_defaults_and_overrides():
    small, large = 23 * 2**20, LARGE_MODEL_BYTES
    assert actor_layout(16, None, None, small) == (16, 1)  # one single-threaded actor per CPU
    assert actor_layout(16, None, None, large) == (4, 4)  # big graphs: fewer copies, 4 threads each
    assert actor_layout(2, None, None, large) == (1, 2)  # never more CPUs per actor than the cluster has
    assert actor_layout(16, 2, None, small) == (2, 8)  # only --concurrency: the CPUs are shared out
    assert actor_layout(16, None, 3, small) == (5, 3)  # only --cpus-per-actor: as many actors as fit
    assert actor_layout(16, 3, 2, large) == (3, 2)  # both: as given
