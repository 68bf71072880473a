"""s3:// input and output against a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import REPO

# This interpreter's own moto first: another one on PATH (a system Python's, an older moto) may not speak the S3 that
# this pyarrow expects (moto 5.2.1 answers a multipart upload's completion in a form pyarrow 26 reads as an error).
_OWN_MOTO = os.path.join(os.path.dirname(sys.executable), "moto_server")
MOTO = _OWN_MOTO if os.path.exists(_OWN_MOTO) else shutil.which("moto_server") or _OWN_MOTO
pytestmark = pytest.mark.skipif(not os.path.exists(MOTO), reason="needs moto[server] (the test extra)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    port = free_port()
    server = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("lake")
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        server.wait(timeout=10)


def s3fs() -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"])


def test_partitioned_dataset_in_answers_out(s3_env, tiny_model):
    fs = s3fs()
    for lang, n in (("en", 7), ("fr", 5)):
        table = pa.table({"id": [f"{lang}-{i}" for i in range(n)],
                          "question": ["who was born in paris?"] * n,
                          "context": ["The king of France was born in Paris in 1789."] * n})
        pq.write_table(table, f"lake/questions/lang={lang}/part-0.parquet", filesystem=fs, row_group_size=3)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **s3_env}
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
