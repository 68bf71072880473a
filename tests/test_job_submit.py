"""`ray job submit` to a real `ray start --head` cluster on 127.0.0.1, as users run nightly jobs."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pyarrow.parquet as pq
import pytest
from conftest import REPO
from multinode import RAY, LocalCluster


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A one-node cluster (`ray start --head`, 2 CPUs, the dashboard's job server), stopped afterwards by its
    process group whatever happens. Ray >= 2.59 turns token authentication on for such clusters: the cluster
    makes its own token and hands it to the `ray job` client, as a user's deployment would."""
    cluster = LocalCluster(tmp_path_factory.mktemp("ray"))
    try:
        cluster.start_head(num_cpus=2, dashboard=True)
        yield cluster.dashboard, cluster.env
    finally:
        cluster.stop()


def test_ray_job_submit_answers_sample(head_node, tiny_model, tmp_path):
    address, env = head_node
    out = tmp_path / "answers"
    job_id = f"qa-test-{uuid.uuid4().hex[:8]}"
    # As README says: the working directory ships in the runtime_env; env_vars reach the driver and actors
    # (here QA_MODEL picks the model, so no --model flag is given).
    runtime_env = {"working_dir": str(REPO), "excludes": ["out/", ".venv/", "*.safetensors", "model-fp32.onnx"],
                   "env_vars": {"QA_MODEL": str(tiny_model)}}
    submit = [RAY, "job", "submit", "--address", address, "--submission-id", job_id,
              "--runtime-env-json", json.dumps(runtime_env),
              "--", "python", "-m", "jobs.answer", "--input", "tests/data/sample.parquet", "--output", str(out),
              "--progress-every", "1"]
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, check=False)
    deadline = time.time() + 300
    status = ""
    while time.time() < deadline:
        status = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env,
                                capture_output=True, text=True, timeout=60, check=False).stdout.lower()
        if "succeeded" in status or "failed" in status or "stopped" in status:
            break
        time.sleep(2)
    assert f"job '{job_id}' succeeded" in status, f"{status}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    table = pq.read_table(out)
    source = pq.read_table(REPO / "tests/data/sample.parquet")
    assert table.num_rows == source.num_rows
    assert sorted(table.column("id").to_pylist()) == sorted(source.column("id").to_pylist())
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["q11"]["error"] == "question is null"
    assert rows["q12"]["error"] == "context is empty"
    assert all(rows[f"q{i:02d}"]["answer"] for i in range(1, 11))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows_in"] == manifest["rows_out"] == 12
    assert manifest["model"]["directory"] == str(tiny_model)
    logs = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                          text=True, timeout=60, check=False).stdout
    assert "done: 12 rows in, 12 rows out, 2 with errors" in logs, logs[-3000:]  # summary in `ray job logs`
    assert manifest["ray"]["cluster_cpus"] == 2  # it joined the running cluster, not a new local one
