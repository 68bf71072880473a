"""The declared interfaces: a sink from outside the package plugs in through the format table; the served model is
resolved once and actors refuse a graph that changed; identities carry their version across an upgrade; a
programming slip keeps its traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from test_exactly_once import (  # noqa: F401 - clean_run: the module's clean run, a fixture
    ANSWER_COLUMNS,
    N_ROWS,
    assert_exactly_once,
    clean_run,
    committed,
    job,
    run_job,
    write_input,
)

pytestmark = pytest.mark.usefixtures("joined_ray")  # jobs join the suite's Ray node (conftest)

# A third format, defined here and nowhere in the package: every answer committed into one Parquet file, replaced
# whole. It stages through the folder protocol's stager and commits by writing one file; registering it is one
# call, and jobs/ is not touched.
ONE_FILE_SINK = '''
import os, sys
import pyarrow as pa, pyarrow.fs as pafs, pyarrow.parquet as pq
from pipeline.commit import OutputCommitter, OutputState
from pipeline.formats import Format, register
from pipeline.records import Manifest

class OneFileSink:
    def __init__(self, uri, rows_per_input_row, source):
        self.uri, self.path = uri, uri.removeprefix("onefile://")
        self.staged = OutputCommitter(pafs.LocalFileSystem(), self.path + ".qa", rows_per_input_row)
        self.columns = None
    def check_columns(self, names):
        self.columns = list(names)
    def inspect(self, mode, identity):
        return self.staged.inspect(mode, identity) if mode == "resume" else OutputState()
    def recorded_job(self):
        return self.staged.staged_job()
    def begin(self, mode, identity, stale=()):
        return self.staged.begin(mode, identity, stale)
    def renew_lease(self):
        self.staged.renew_lease()
    def release_lease(self):
        self.staged.release_lease()
    def commit(self, units, identity, report, adopted=(), interrupted=None):
        files = interrupted or self.staged.write_commit_list(units, adopted)
        parts = [pq.read_table(self.staged.staging + "/" + f["path"].rsplit("/", 1)[-1]) for f in files]
        table = pa.concat_tables(parts).replace_schema_metadata(None)
        assert table.column_names == self.columns, (table.column_names, self.columns)
        pq.write_table(table, self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)
        self.staged._delete_dir(self.staged.root)
        errors = table.num_rows - table.column("error").null_count
        return Manifest(**report, job=identity.written(), run=self.staged.run, rows_out=table.num_rows,
                        errors=errors, output_files=[{"path": self.path, "rows": table.num_rows}],
                        commit={"format": "onefile", "path": self.path})

register(Format("onefile", lambda uri: uri.startswith("onefile://"), sink=OneFileSink))
from jobs.answer import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_sink_from_outside_plugs_in_through_the_table(clean_run, tiny_model, tmp_path):  # noqa: F811
    """The one-file sink commits a whole job: every row once, the folder sink's answers, its own last line."""
    src, reference = clean_run
    target = tmp_path / "answers.parquet"
    done = subprocess.run([sys.executable, "-c", ONE_FILE_SINK, "--input", str(src), "--output",
                           f"onefile://{target}", "--model", str(tiny_model), "--rows-per-unit", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"; onefile {target}" in done.stdout
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["rows_in"] == summary["rows_out"] == N_ROWS and summary["errors"] == 1
    result = pq.read_table(target).sort_by("id")
    assert_exactly_once(result)
    assert result.select(ANSWER_COLUMNS).equals(reference.select(ANSWER_COLUMNS))
    assert not (tmp_path / "answers.parquet.qa").exists()  # its staging went with the commit


def test_actor_refuses_a_graph_changed_after_planning(tiny_model, tmp_path):
    """The driver resolves the model; an actor built from that value refuses the graph once its bytes changed."""
    import pyarrow.fs as pafs

    from jobs.config import JobConfig
    from jobs.plan import plan
    from jobs.ray_stage import ActorSettings, AnswerActor
    from pipeline.served import ModelChangedError

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    src = write_input(tmp_path / "in", 8)
    cfg = JobConfig(input=str(src), output=str(tmp_path / "out"), model=str(model), precision="fp32")
    job = plan(cfg)
    settings = ActorSettings(job.served, 1, job.columns, cfg.decode)
    actor = AnswerActor(pafs.LocalFileSystem(), settings)  # unchanged: it loads and answers
    assert actor.answer(pa.Table.from_pylist([job.units[0].as_row()])).num_rows == job.units[0].length
    with open(model / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelChangedError, match=r"graph file changed after the job planned it"):
        AnswerActor(pafs.LocalFileSystem(), settings)


def test_resume_across_an_identity_version_change(tiny_model, tmp_path, joined_ray):
    """A run by an earlier release (identity version 1) dies after staging; this release's resume says so in one
    line, keeps the staged units (the same job, read in version 1's form) and commits every row once. An
    identity of a version this release cannot read is refused, naming both versions."""
    src = write_input(tmp_path / "in")
    out = tmp_path / "out"
    common = ["--input", str(src), "--output", str(out), "--model", str(tiny_model), "--rows-per-unit", "4"]
    p = job(common, {"QA_FAULT_CRASH_AT": "stage:3", "QA_FAULT_IDENTITY_VERSION": "1"})
    p.communicate(timeout=300)
    assert joined_ray.wait_for_workers_of(p.pid) > 0
    staged = json.loads((out / "_staging" / "_job.json").read_text())
    assert "version" not in staged and "input_files" in staged  # version 1's flat form

    text = run_job(common + ["--mode", "resume"])
    assert "written by an earlier qa-batch release (job identity version 1, now 2); read in that form, it is " \
           "this job" in text, text
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows_staged_before"] >= 3 and manifest["job"]["version"] == 2
    assert_exactly_once(committed(out))

    p = job(common + ["--mode", "overwrite"], {"QA_FAULT_CRASH_AT": "stage:3"})
    p.communicate(timeout=300)
    assert joined_ray.wait_for_workers_of(p.pid) > 0
    staged = json.loads((out / "_staging" / "_job.json").read_text())
    (out / "_staging" / "_job.json").write_text(json.dumps({**staged, "version": 99}))
    p = job(common + ["--mode", "resume"])
    text, _ = p.communicate(timeout=300)
    assert p.returncode == 1 and "job identity version 99; this release writes version 2" in text, text


def test_committed_table_job_rerun_after_an_upgrade_adds_no_snapshot(tiny_model, tmp_path, monkeypatch):
    """A job committed to an Iceberg table by an earlier release (its snapshot carries version 1's hash) is found
    again after the upgrade: the re-run adds no snapshot, in every mode that keeps rows."""
    pytest.importorskip("pyiceberg", reason="needs the iceberg extra")
    from test_iceberg import JOB_KEY, sql_catalog

    cat, env = sql_catalog("up", tmp_path, f"file://{tmp_path}/warehouse")
    src = write_input(tmp_path / "in")
    common = ["--input", str(src), "--output", "iceberg://up/out.answers", "--model", str(tiny_model),
              "--rows-per-unit", "4"]
    run_job(common, {**env, "QA_FAULT_IDENTITY_VERSION": "1"})
    (snapshot,) = cat.load_table("out.answers").snapshots()
    assert snapshot.summary.get("qa_batch.identity_version") is None and snapshot.summary.get(JOB_KEY)
    for mode in ("error", "resume"):
        assert "nothing to do" in run_job(common + ["--mode", mode], env)
    assert len(cat.load_table("out.answers").snapshots()) == 1
    assert cat.load_table("out.answers").scan().to_arrow().num_rows == N_ROWS


def test_a_programming_slip_keeps_its_traceback(tmp_path):
    """A KeyError inside the job is not a user error: main lets it through (Python prints its traceback)."""
    script = textwrap.dedent(f"""
        import jobs.answer
        def slip(cfg):
            raise KeyError("no such key")
        jobs.answer.plan = slip
        jobs.answer.main(["--input", "x.parquet", "--output", {str(tmp_path / 'out')!r}])
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert "KeyError: 'no such key'" in done.stderr and "error: " not in done.stderr


def test_identity_forms():
    """An identity renders in version 1's form for Parquet and Iceberg inputs, not for formats added later; its
    keys follow the form; a recorded identity of another version compares in that version's form."""
    from conftest import identity_for

    from pipeline.config import DecodeSettings
    from pipeline.records import IDENTITY_VERSION, JobIdentity

    ident = identity_for("a")
    v1 = ident.as_version(1)
    assert v1["input_files"] == ident.input["files"] and v1["precision_choice"] == {"backend": "onnxruntime",
                                                                                    "precision": "fp32"}
    assert JobIdentity.from_json(ident.to_json()) == ident
    assert set(ident.keys()) == {1, IDENTITY_VERSION} and ident.keys()[1] != ident.keys()[IDENTITY_VERSION]
    assert ident.compare(v1).same and not identity_for("b").compare(v1).same
    assert v1["decode"] == {"max_answer_len": 30, "top_k": 1}  # as version 1 wrote it, settings added since left out
    limited = type(ident)(**{**vars(ident), "decode": DecodeSettings(max_context_chars=1000)})
    assert limited.as_version(1) is None  # a job version 1 could not have run
    other = JobIdentity({"format": "delta", "table": "t", "version": 3}, *list(vars(ident).values())[1:])
    assert other.as_version(1) is None and set(other.keys()) == {IDENTITY_VERSION}
    assert not ident.compare({"version": 99}).comparable
