"""The job on a real multi-node cluster on 127.0.0.1: a head that only drives (0 CPUs) and 1-CPU worker nodes,
which a test kills (a lost spot node) or adds (an autoscaler's new node) while the job runs.

One cluster for the module; each test first sets the number of running worker nodes it starts with
(``keep_workers``). Node faults come from hooks (pipeline/faults.py) rather than sleeps racing the job: a node
killed on an actor's k-th call, actors held while a node is added; ``QA_FAULT_SLOW_CALL_S`` stretches each
actor call (the tiny model answers a unit in milliseconds) so that units are in flight on every node.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from multinode import LocalCluster

from pipeline.cpu import cpu_class

N_ROWS = 200
ANSWER_COLUMNS = ("id", "answer", "answer_start", "answer_end", "score", "error")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_head()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> str:
    contexts = ["The king of France was born in Paris in 1789.", "The river runs by the city in the year one."]
    table = pa.table({"id": [f"r{i:03d}" for i in range(N_ROWS)],
                      "question": [f"who is the king {i}?" for i in range(N_ROWS)],
                      "context": [contexts[i % 2] for i in range(N_ROWS)]})
    path = tmp_path_factory.mktemp("questions") / "in.parquet"
    pq.write_table(table, path, row_group_size=50)
    return str(path)


def job(cluster, model, questions, out, *flags, env=None) -> list[str]:
    return [sys.executable, "-m", "jobs.answer", "--input", questions, "--output", str(out), "--model", str(model),
            "--rows-per-unit", "10", "--address", cluster.address, "--progress-every", "2", *flags]


def run_job(cluster, cmd, env=None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env={**cluster.env, **(env or {})}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def answers(out) -> pa.Table:
    """The committed rows, by id; each id exactly once."""
    manifest = json.loads((out / "_manifest.json").read_text())
    result = pq.read_table(out).select(ANSWER_COLUMNS).sort_by("id")
    ids = result.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == N_ROWS == manifest["rows_out"]
    return result


def worker_nodes(manifest: dict) -> list[dict]:
    """The manifest's nodes; none of them is the driver's (the head's)."""
    nodes = manifest["ray"]["nodes"]
    assert manifest["ray"]["driver_node"] not in {n["node"] for n in nodes}
    return nodes


@pytest.fixture(scope="module")
def clean_run(cluster, tiny_model, questions, tmp_path_factory):
    """A run on two worker nodes with nothing going wrong: its manifest and answers."""
    cluster.keep_workers(2)
    out = tmp_path_factory.mktemp("clean") / "out"
    # Half a second per unit: the tiny model answers a unit in milliseconds, so the first actor ready would take
    # all 20 before the other had loaded.
    run_job(cluster, job(cluster, tiny_model, questions, out), env={"QA_FAULT_SLOW_CALL_S": "0.5"})
    return json.loads((out / "_manifest.json").read_text()), answers(out)


def test_head_only_drives(clean_run):
    """Every row answered exactly once by actors on both worker nodes; the head (0 CPUs) runs none."""
    manifest, _ = clean_run
    assert manifest["ray"]["cluster_cpus"] == 2 and manifest["ray"]["initial_actors"] == 2
    nodes = worker_nodes(manifest)
    assert len(nodes) == 2 and all(n["actors_started"] >= 1 and n["rows_answered"] > 0 for n in nodes)
    assert sum(n["rows_answered"] for n in nodes) == N_ROWS
    assert all(n["cpu_class"] == cpu_class() and n["alive"] and n["actors_lost"] == 0 for n in nodes)


def test_node_lost_mid_run(cluster, tiny_model, questions, clean_run, tmp_path):
    """SIGKILL one worker node's process group when an actor starts its 3rd unit (of 20; a unit in flight on
    each node): the job finishes, every row once, the same answers as the clean run, and the manifest names the
    lost node and its lost actors."""
    _, victim = cluster.keep_workers(2)
    out = tmp_path / "out"
    t0 = time.time()
    done = run_job(cluster, job(cluster, tiny_model, questions, out),
                   env={"QA_FAULT_KILL_ON_CALL": f"3:{victim.pgid}", "QA_FAULT_SLOW_CALL_S": "1"})
    victim.kill()  # reap it; the hook killed it
    assert victim.process.returncode is not None
    assert answers(out).equals(clean_run[1])
    manifest = json.loads((out / "_manifest.json").read_text())
    nodes = worker_nodes(manifest)
    lost = [n for n in nodes if not n["alive"]]
    assert len(lost) == 1 and lost[0]["actors_lost"] == lost[0]["actors_started"] >= 1, nodes
    assert manifest["retries"]["crashed_rows"] == [], manifest["retries"]  # a lost node is not a poison row
    print(f"node lost: {time.time() - t0:.1f} s; nodes {nodes}; retries {manifest['retries']}\n{done.stdout}")


def staged(out) -> int:
    return len(list((out / "_staging").glob("part-*.parquet")))


def wait_until(condition, job: subprocess.Popen, what: str, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert job.poll() is None, f"the job ended before {what}"
        assert time.time() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.2)


def test_node_added_mid_run(cluster, tiny_model, questions, clean_run, tmp_path):
    """A job started on one worker node, its actor held after its first unit (QA_FAULT_HOLD_FILE); a second
    node joins, the pool grows onto it, and the new node's actor stages the next unit; then the hold ends. The
    manifest shows both nodes answering; the answers are the clean run's."""
    cluster.keep_workers(1)
    out, hold = tmp_path / "out", tmp_path / "hold"
    hold.touch()
    cmd = job(cluster, tiny_model, questions, out)
    env = {**cluster.env, "QA_FAULT_HOLD_FILE": str(hold)}
    t0 = time.time()
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        try:
            wait_until(lambda: staged(out) >= 1, p, "a first staged unit")
            added_at = time.time() - t0
            cluster.add_worker(1, wait=False)
            wait_until(lambda: staged(out) >= 2, p, "a unit staged by the new node's actor")  # the first is held
            # Both nodes' actors are held now: one --progress-every (2 s) more for a progress line that says so
            # (actors stage their own units, so the rest of the job may take less than that once released).
            time.sleep(2.5)
        finally:
            hold.unlink()
        stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert answers(out).equals(clean_run[1])
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["ray"]["cluster_cpus"] == 1  # when the job started answering
    nodes = worker_nodes(manifest)
    assert len(nodes) == 2 and all(n["rows_answered"] > 0 and n["alive"] for n in nodes), nodes
    assert "actors on 2 nodes" in stdout, stdout
    print(f"node added at {added_at:.1f} s, job {time.time() - t0:.1f} s; nodes {nodes}\n{stdout}")


def test_nodes_of_two_classes_get_one_recorded_choice(cluster, tiny_model, questions, tmp_path):
    """One worker node reads as Sapphire Rapids (AMX, bf16: a recorded flag set through QA_CPUINFO, which its
    worker processes inherit), one as an AVX2 EPYC. With made-up measurements in the model's card
    (test_precision_auto.CARD), --precision auto serves OpenVINO fp32 on both, the variant both classes keep
    most of their speed with (bf16 ruled out by the AVX2 node); the manifest records it, the classes it was
    chosen for, and each node's class."""
    from test_cpu_kernels import AVX2_EPYC, SAPPHIRE_RAPIDS
    from test_precision_auto import CARD, cpuinfo, model_with_card

    model = model_with_card(tiny_model, tmp_path, CARD)
    cluster.keep_workers(0)  # both read their class from a recorded flag set, whatever CPU this machine has
    cluster.add_worker(1, env={"QA_CPUINFO": cpuinfo(tmp_path, AVX2_EPYC)})
    cluster.add_worker(1, env={"QA_CPUINFO": cpuinfo(tmp_path, SAPPHIRE_RAPIDS)})
    out = tmp_path / "out"
    run_job(cluster, job(cluster, model, questions, out), env={"QA_FAULT_SLOW_CALL_S": "0.5"})
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["precision"]["backend"] == "openvino" and manifest["precision"]["precision"] == "fp32"
    assert manifest["precision"]["cpu_classes"] == ["amx", "avx2"] and manifest["precision"]["requested"] == "auto"
    assert manifest["job"]["variant"] == {"backend": "openvino", "precision": "fp32"}
    assert manifest["model"]["model_file"].endswith("model-fp32.onnx")
    assert sorted(n["cpu_class"] for n in worker_nodes(manifest) if n["rows_answered"]) == ["amx", "avx2"]
    assert len(answers(out)) == N_ROWS


# Last in the module: it leaves no worker node.
def test_no_workers_fails_clearly(cluster, tiny_model, questions, tmp_path):
    """A head with 0 CPUs and no worker node: the job says it waits, then fails with one line naming the timeout
    and the cluster's resources, having answered nothing."""
    cluster.keep_workers(0)
    out = tmp_path / "out"
    done = subprocess.run(job(cluster, tiny_model, questions, out, "--wait-for-workers", "4"), cwd=REPO,
                          env=cluster.env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "waiting for workers: 0/1 CPUs on 1 node(s)" in done.stdout, done.stdout
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--wait-for-workers 4 s" in error[0] and "resources:" in error[0], done.stderr
    assert not (out / "_manifest.json").exists()
