"""The Python API (pipeline/api.py, docs/guides/python-api.md): a DataFrame and an Arrow table answered in this
process equal the job's output for the same rows, and a job run from Python with a typed config returns its
Manifest, its ``--precision auto`` choosing what the API's auto chooses on this machine."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from test_exactly_once import run_job

from pipeline.api import QA, answer
from pipeline.config import OUTPUT_COLUMNS, TOP_ANSWERS_COLUMN, ColumnError

SAMPLE = REPO / "tests" / "data" / "sample.parquet"  # README's first run: 12 rows, 2 with errors
pytestmark = pytest.mark.usefixtures("joined_ray")  # jobs join the suite's Ray node (conftest)


@pytest.fixture(scope="module")
def job_output(tmp_path_factory, tiny_model):
    """The job's committed answers over SAMPLE, at a pinned precision (the tiny model's float ONNX graph)."""
    out = tmp_path_factory.mktemp("api") / "out"
    run_job(["--input", str(SAMPLE), "--output", str(out), "--model", str(tiny_model), "--precision", "fp32"])
    return out


def test_a_dataframe_is_answered_as_the_job_answers_it(job_output, tiny_model):
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(SAMPLE)
    df.index = pd.Index([f"row{i}" for i in reversed(range(len(df)))], name="key")  # an index of the caller's own
    got = answer(df, tiny_model, precision="fp32")

    assert isinstance(got, pd.DataFrame) and got.index.equals(df.index)
    assert list(got.columns) == list(df.columns) + list(OUTPUT_COLUMNS)
    pd.testing.assert_frame_equal(got[df.columns], df)  # the caller's columns come back untouched
    assert "answer" not in df.columns  # and the caller's frame is not changed
    # Exactly what pandas reads from the job's output: values (scores bit for bit) and dtypes.
    expected = pd.read_parquet(job_output).sort_values("id", ignore_index=True)
    pd.testing.assert_frame_equal(got.sort_values("id", ignore_index=True), expected, check_exact=True)
    assert got["error"].notna().sum() == 2
    mixed = df.assign(context=[*df["context"][:-1], 3])  # no Parquet column holds this: refused, not guessed at
    with pytest.raises(ColumnError, match="column 'context' mixes text with other values: row 11 holds int 3"):
        answer(mixed, tiny_model, precision="fp32")


def test_an_arrow_table_is_answered_as_the_job_answers_it(job_output, tiny_model):
    table = pq.read_table(SAMPLE)
    qa = QA(tiny_model, precision="fp32")  # a service's object: one session, many calls
    got = qa(table)

    assert isinstance(got, pa.Table)
    assert got.column_names == table.column_names + list(OUTPUT_COLUMNS)
    assert got.select(table.column_names).equals(table)
    expected = pq.read_table(job_output).sort_by("id")
    assert got.sort_by("id").to_pylist() == expected.to_pylist()
    assert qa(table.slice(3, 4)).to_pylist() == got.slice(3, 4).to_pylist()  # one row per row, in order, again
    assert str(qa.served.variant) == str(qa.served.choice.variant)


def test_top_k_columns_and_refusals(tiny_model):
    table = pq.read_table(SAMPLE).rename_columns(["id", "q", "ctx", "topic"])
    qa = QA(tiny_model, precision="fp32", columns={"question": "q", "context": "ctx"}, top_k=3)
    got = qa(table)
    assert got.column_names[-1] == TOP_ANSWERS_COLUMN and qa.output_columns[-1] == TOP_ANSWERS_COLUMN
    first = got.slice(0, 1).to_pylist()[0]
    assert first[TOP_ANSWERS_COLUMN][0]["answer"] == first["answer"]
    with pytest.raises(ColumnError, match="no column 'q'"):
        answer(pq.read_table(SAMPLE), tiny_model, precision="fp32", columns={"question": "q"})
    with pytest.raises(ColumnError, match="already has output column 'answer'"):
        qa(got.drop_columns([TOP_ANSWERS_COLUMN]))
    with pytest.raises(TypeError, match="pyarrow Table or a pandas DataFrame"):
        qa(table.to_pylist())
    with pytest.raises(ValueError, match="precision must be one of"):
        QA(tiny_model, precision="fp16")


def test_a_job_run_from_python_returns_its_manifest(tiny_model, tmp_path):
    """``run(JobConfig(...))`` from Python code, in a process of its own: Ray reads its authentication settings
    when it is first imported, and this test process imported it before the suite's node set them."""
    import json
    import subprocess
    import sys

    from pipeline.records import Manifest

    out = tmp_path / "out"
    script = ("import json\n"
              "from jobs.answer import run\n"
              "from jobs.config import JobConfig\n"
              f"manifest = run(JobConfig(input={str(SAMPLE)!r}, output={str(out)!r}, model={str(tiny_model)!r}))\n"
              "print('MANIFEST ' + json.dumps(manifest.to_json()))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("MANIFEST "))
    manifest = Manifest.from_json(json.loads(line[len("MANIFEST "):]))
    assert isinstance(manifest, Manifest)
    assert (manifest.rows_in, manifest.rows_out, manifest.errors) == (12, 12, 2)
    qa = QA(tiny_model)  # auto here: the job's rule, for this machine's CPU
    served = qa.served.choice
    assert (manifest.precision["backend"], manifest.precision["precision"]) == \
        (served.variant.backend, served.variant.precision)
    assert manifest.precision["cpu_classes"] == list(served.cpu_classes)
    table = pq.read_table(SAMPLE)
    assert qa(table).sort_by("id").to_pylist() == pq.read_table(out).sort_by("id").to_pylist()
