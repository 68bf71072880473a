"""The job on a real multi-node cluster on 127.0.0.1: a head that only drives (0 CPUs) and two worker nodes."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from multinode import LocalCluster

N_ROWS = 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_head()
        c.add_worker(1)
        c.add_worker(1)
        yield c
    finally:
        c.stop()


def test_head_only_drives(cluster, tiny_model, tmp_path):
    """Every row answered exactly once on the worker nodes' CPUs; the head (0 CPUs) runs no answering actor."""
    contexts = ["The king of France was born in Paris in 1789.", "The river runs by the city in the year one."]
    table = pa.table({"id": [f"r{i:03d}" for i in range(N_ROWS)],
                      "question": [f"who is the king {i}?" for i in range(N_ROWS)],
                      "context": [contexts[i % 2] for i in range(N_ROWS)]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=50)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.answer", "--input", str(tmp_path / "in.parquet"), "--output", str(out),
           "--model", str(tiny_model), "--rows-per-unit", "25", "--address", cluster.address]
    done = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    result = pq.read_table(out)
    ids = result.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == N_ROWS == manifest["rows_out"]
    assert manifest["ray"]["cluster_cpus"] == 2 and manifest["ray"]["concurrency"] == 2
