"""The driver's steps one by one, without a cluster: plan (no Ray at all), the actor's core, commit; the flags
made from JobConfig; and a first run that shows only our own lines."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from jobs.config import JobConfig, add_flags, from_args


def write_input(tmp_path, n: int = 13):
    table = pa.table({"id": [f"r{i:02d}" for i in range(n)],
                      "question": [None if i == 4 else f"who is the king {i}?" for i in range(n)],
                      "context": ["The king of France was born in Paris in 1789."] * n})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=6)
    return table


def test_plan_needs_no_ray(tiny_model, tmp_path):
    """plan() in a fresh interpreter with a forced --precision: units from the footers, the job identity, the
    served model resolved, a refused column; Ray never imported and no inference session opened (counted)."""
    write_input(tmp_path)
    pq.write_table(pa.table({"id": ["a"], "q": ["x"]}), tmp_path / "bad.parquet")
    script = textwrap.dedent(f"""
        import json, sys
        import onnxruntime, openvino
        sessions = []
        class Counted(onnxruntime.InferenceSession):
            def __init__(self, *a, **k):
                sessions.append("onnxruntime")
                super().__init__(*a, **k)
        onnxruntime.InferenceSession = Counted
        compile_model = openvino.Core.compile_model
        openvino.Core.compile_model = lambda *a, **k: sessions.append("openvino") or compile_model(*a, **k)
        from jobs.config import JobConfig
        from jobs.plan import ColumnError, plan
        p = plan(JobConfig(input={str(tmp_path / 'in.parquet')!r}, output={str(tmp_path / 'out')!r},
                           model={str(tiny_model)!r}, rows_per_unit=4, precision="fp32"))
        try:
            plan(JobConfig(input={str(tmp_path / 'bad.parquet')!r}, output={str(tmp_path / 'out2')!r},
                           model={str(tiny_model)!r}))
            refused = None
        except ColumnError as exc:
            refused = str(exc)
        print(json.dumps({{"units": [(u.row_group, u.offset, u.length) for u in p.units],
                          "pending": len(p.pending), "rows_in": p.rows_in, "identity": p.identity.to_json(),
                          "graph": str(p.served.graph), "refused": refused, "ray": "ray" in sys.modules,
                          "sessions": sessions}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    # row groups of 6, 6, 1 rows cut into units of at most 4
    assert got["units"] == [[0, 0, 4], [0, 4, 2], [1, 0, 4], [1, 4, 2], [2, 0, 1]]
    assert got["pending"] == 5 and got["rows_in"] == 13
    identity = got["identity"]
    stat = (tmp_path / "in.parquet").stat()
    assert identity["version"] == 2 and identity["input"] == {
        "format": "parquet", "files": [{"path": str(tmp_path / "in.parquet"), "size": stat.st_size,
                                        "mtime_ns": stat.st_mtime_ns}]}
    assert identity["rows_per_unit"] == 4 and identity["columns"] == {"id": "id", "question": "question",
                                                                      "context": "context"}
    assert len(identity["model"]["graph_sha256"]) == len(identity["model"]["tokenizer_sha256"]) == 64
    assert identity["variant"] == {"backend": "onnxruntime", "precision": "fp32"}
    assert got["graph"] == str(tiny_model / "model.onnx")
    assert "bad.parquet: no column 'question'" in got["refused"] and "--context-column" in got["refused"]
    assert got["ray"] is False and got["sessions"] == []
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_actor_and_commit_without_a_cluster(tiny_model, tmp_path):
    """The answering actor's class called directly on read units, its rows staged and committed by the
    driver's commit step: the same answers as the pure stage, one output row per input row."""
    import ray

    from jobs.answer import commit
    from jobs.choose import choose_variant
    from jobs.execute import Execution
    from jobs.plan import plan
    from jobs.ray_stage import ActorSettings, AnswerActor
    from pipeline.answer import Answerer
    from pipeline.backends import load_model
    from pipeline.commit import ROW_COLUMN, UNIT_COLUMN
    from pipeline.precision import NodeCpu, Variant

    table = write_input(tmp_path)
    cfg = JobConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=str(tiny_model),
                    rows_per_unit=4)
    job = plan(cfg)
    assert job.served is None and job.identity is None  # --precision auto: chosen for the nodes, next
    job = choose_variant(job, [NodeCpu.here()])  # for this machine's CPU
    assert job.identity.variant == Variant("onnxruntime", "fp32")  # all it can serve
    settings = ActorSettings(job.served, 1, job.columns, cfg.decode)
    stager = job.sink.begin(cfg.mode, job.identity)
    actor = AnswerActor(pafs.LocalFileSystem(), settings, output=stager)
    for unit in job.pending[:1]:
        answered = actor.answer(pa.Table.from_pylist([unit.as_row()]))
        assert answered.column(UNIT_COLUMN).to_pylist() == [unit.index] * unit.length
        assert answered.column(ROW_COLUMN).to_pylist() == list(range(unit.length))
    for unit in job.pending:  # the actor stages what it answers, and says what it staged
        staged = actor(pa.Table.from_pylist([unit.as_row()]))
        assert staged.to_pylist() == [{"unit": unit.index, "first_row": 0, "rows": unit.length}]
    assert not ray.is_initialized()

    manifest = commit(job, Execution(), started=0.0)
    out = pq.read_table(tmp_path / "out").sort_by("id")
    assert manifest.rows_in == manifest.rows_out == out.num_rows == 13
    assert manifest.errors == 1 and out.column("error").to_pylist()[4] == "question is null"
    on_disk = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert on_disk["errors"] == 1 and on_disk["rows_out"] == 13  # written once, complete
    spec, session = load_model(str(tiny_model))
    direct = Answerer(spec, session)(table)
    assert out.column("answer").to_pylist() == direct.column("answer").to_pylist()
    assert out.column("answer_start").to_pylist() == direct.column("answer_start").to_pylist()
    answered_twice = 13 + job.pending[0].length  # the first unit: once unstaged, once staged
    assert actor.answerer.times.rows == answered_twice and actor.input_rows == answered_twice


def test_flags_come_from_the_config():
    """Every JobConfig default is the flag's default; nested settings get their own flags; a bad value is
    refused by the config's validation."""
    p = argparse.ArgumentParser()
    add_flags(p)
    cfg = from_args(p.parse_args(["--input", "i", "--output", "o"]))
    assert cfg == JobConfig(input="i", output="o")
    cfg = from_args(p.parse_args(["--input", "i", "--output", "o", "--id-column", "doc", "--top-k", "3",
                                  "--max-seq-len", "128", "--progress-every", "2", "--skip-bad-files"]))
    assert (cfg.columns.id, cfg.columns.question, cfg.decode.top_k, cfg.windows.as_dict()) == (
        "doc", "question", 3, {"max_seq_len": 128})
    assert cfg.progress_every_s == 2.0 and cfg.skip_bad_files
    with pytest.raises(SystemExit):
        p.parse_args(["--input", "i", "--output", "o", "--mode", "append"])  # choices from pipeline.commit.MODES
    with pytest.raises(ValueError, match="--wide needs --questions"):
        from_args(p.parse_args(["--input", "i", "--output", "o", "--wide"]))

    from jobs import evaluate

    q = argparse.ArgumentParser()
    add_flags(q, skip=evaluate.NOT_JOB_FLAGS)
    flags = {a.dest for a in q._actions}
    assert {"batch_tokens", "precision", "decode__max_answer_len", "columns__id"} <= flags
    assert not flags & {"input", "output", "mode"}


def test_first_run_prints_only_our_lines(tmp_path):
    """The README's first run: at default verbosity every line is ours (summary, progress), none from Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "jobs.answer", "--input", "tests/data/sample.parquet"]
    done = subprocess.run(cmd + ["--output", str(tmp_path / "quiet")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    ours = [line for line in lines if line.startswith(("done: ", "progress: ", '{"rows_in"'))]
    assert lines == ours and lines[0].startswith("done: 12 rows in, 12 rows out, 2 with errors"), lines
    assert json.loads(lines[-1])["rows_out"] == 12
