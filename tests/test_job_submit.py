"""`ray job submit` to a real `ray start --head` cluster on 127.0.0.1, as users run nightly jobs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A one-node cluster; stopped afterwards whatever happens.

    Ray >= 2.59 turns token authentication on for local clusters: the test makes its own token and
    hands it to the cluster and to the `ray job` client, as a user's deployment would.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex)
    gcs, dash = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray")
    start = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "2",
             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--temp-dir", str(temp), "--disable-usage-stats"]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


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
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
    deadline = time.time() + 300
    status = ""
    while time.time() < deadline:
        status = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env,
                                capture_output=True, text=True, timeout=60).stdout.lower()
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
                          text=True, timeout=60).stdout
    assert "done: 12 rows in, 12 rows out, 2 with errors" in logs, logs[-3000:]  # summary in `ray job logs`
    assert manifest["ray"]["cluster_cpus"] == 2  # it joined the running cluster, not a new local one
