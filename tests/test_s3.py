"""s3:// input and output against a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import MOTO, REPO

pytestmark = pytest.mark.skipif(not os.path.exists(MOTO), reason="needs moto[server] (the test extra)")


@pytest.fixture(scope="module")
def s3_env(s3_server):
    """The suite's S3 server (conftest) in this process's environment for one module: drivers started from here
    reach it, as the suite's Ray node's actors do."""
    if s3_server.missing:
        pytest.fail(s3_server.missing)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env.items():
            mp.setenv(k, v)
        yield s3_server.env


def s3fs() -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"])


def test_partitioned_dataset_in_answers_out(s3_env, tiny_model, joined_ray):
    fs = s3fs()
    for lang, n in (("en", 7), ("fr", 5)):
        table = pa.table({"id": [f"{lang}-{i}" for i in range(n)],
                          "question": ["who was born in paris?"] * n,
                          "context": ["The king of France was born in Paris in 1789."] * n})
        pq.write_table(table, f"lake/questions/lang={lang}/part-0.parquet", filesystem=fs, row_group_size=3)
    env = {**os.environ, **s3_env}  # the suite's Ray node (joined_ray), which has the S3 server's settings
    cmd = [sys.executable, "-m", "jobs.answer", "--input", "s3://lake/questions/", "--output", "s3://lake/answers",
           "--model", str(tiny_model), "--rows-per-unit", "2"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with fs.open_input_stream("lake/answers/_manifest.json") as f:
        manifest = json.loads(f.read())
    assert manifest["rows_in"] == manifest["rows_out"] == 12
    files = [f"lake/answers/{f['path']}" for f in manifest["output_files"]]
    assert all(f["path"].startswith("part-") for f in manifest["output_files"])  # relative to the output
    leftovers = [i.path for i in fs.get_file_info(pafs.FileSelector("lake/answers", recursive=True))
                 if "_staging" in i.path]
    assert leftovers == []
    out = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in files])
    assert sorted(out.column("id").to_pylist()) == sorted([f"en-{i}" for i in range(7)] + [f"fr-{i}" for i in range(5)])
    assert {(r["id"][:2], r["lang"]) for r in out.to_pylist()} == {("en", "en"), ("fr", "fr")}  # partition keys kept
    assert all(r["answer"] and r["error"] is None for r in out.to_pylist())

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode != 0 and "--mode overwrite" in again.stdout + again.stderr
    resumed = subprocess.run(cmd + ["--mode", "resume"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300, check=False)
    assert resumed.returncode == 0 and "nothing to do" in resumed.stdout

    # A new partition lands: --mode refresh answers its rows only and keeps the committed answers on S3.
    pq.write_table(pa.table({"id": ["de-0", "de-1", "de-2"], "question": ["who was born in paris?"] * 3,
                             "context": ["The queen was born in the first year of the war."] * 3}),
                   "lake/questions/lang=de/part-0.parquet", filesystem=fs)
    refreshed = subprocess.run(cmd + ["--mode", "refresh"], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=300, check=False)
    assert refreshed.returncode == 0, refreshed.stdout[-3000:] + refreshed.stderr[-3000:]
    with fs.open_input_stream("lake/answers/_manifest.json") as f:
        manifest = json.loads(f.read())
    assert (manifest["refresh"]["rows_reused"], manifest["refresh"]["rows_answered"]) == (12, 3)
    now = pa.concat_tables([pq.read_table(f"lake/answers/{f['path']}", filesystem=fs)
                            for f in manifest["output_files"]])
    assert sorted(now.column("id").to_pylist()) == sorted(out.column("id").to_pylist() + ["de-0", "de-1", "de-2"])
    assert now.filter(pa.compute.is_in(now.column("id"), out.column("id"))).sort_by("id").select(
        ["id", "lang", "answer", "score", "probability"]).equals(out.sort_by("id").select(
        ["id", "lang", "answer", "score", "probability"]))


def test_commit_protocol_on_s3(s3_env):
    """Staged parts become visible only at commit; an incomplete unit blocks the commit; resume keeps
    complete units and redoes the rest."""
    from pipeline.commit import ROW_COLUMN, UNIT_COLUMN, OutputCommitter, OutputState, pending_units
    from pipeline.units import ReadUnit

    fs = s3fs()
    committer = OutputCommitter(fs, "lake/protocol")
    from conftest import identity_for

    job = identity_for("x")
    units = [ReadUnit(0, "in", 0, 0, 3), ReadUnit(1, "in", 0, 3, 2)]
    assert committer.inspect("error", job) == OutputState()
    committer.begin("error", job)

    def block(unit: int, rows: int, first: int = 0) -> pa.Table:
        return pa.table({"id": [f"{unit}-{first + i}" for i in range(rows)], UNIT_COLUMN: [unit] * rows,
                         ROW_COLUMN: list(range(first, first + rows))})

    committer.write_block(block(0, 3))
    committer.write_block(block(1, 1))  # unit 1 half done
    with pytest.raises(RuntimeError, match="units \\[1\\] incomplete"):
        committer.commit(units, job, {})
    assert fs.get_file_info("lake/protocol/_manifest.json").type == pafs.FileType.NotFound
    committer.release_lease()  # as the driver does when its run fails

    resumed = OutputCommitter(fs, "lake/protocol")
    state = resumed.inspect("resume", job)
    assert state.committed is None and state.commit_list is None
    pending, staged_rows, adopted, stale = pending_units(units, state.staged)
    assert [u.index for u in pending] == [1] and staged_rows == 3
    assert [(p.unit, p.rows) for p in adopted] == [(0, 3)]
    assert [(p.unit, p.rows) for p in stale] == [(1, 1)]  # the half-done unit's part goes before it is redone
    resumed.begin("resume", job, stale)
    resumed.write_block(block(1, 2))
    manifest = resumed.commit(units, job, {}, adopted)
    assert manifest.rows_out == 5
    ids = sorted(i for f in manifest.output_files
                 for i in pq.read_table(f"lake/protocol/{f['path']}", filesystem=fs).column("id").to_pylist())
    assert ids == ["0-0", "0-1", "0-2", "1-0", "1-1"]
    with pytest.raises(FileExistsError, match="different job"):
        OutputCommitter(fs, "lake/protocol").inspect("resume", identity_for("y"))
