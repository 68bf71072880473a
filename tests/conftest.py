import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import write_model_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A dynamic-axes tiny BERT QA model directory with tokenizer.json."""
    return write_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_64(tmp_path_factory) -> Path:
    """The same weights with 64-token windows, so a paragraph spans many windows."""
    return write_model_dir(tmp_path_factory.mktemp("tiny64") / "model",
                           spec={"max_seq_len": 64, "doc_stride": 16, "max_query_len": 12})


# -- one Ray node for the suite's jobs -------------------------------------------------------------------------
# A job subprocess that starts its own local Ray pays 6-8 s for it on 2 cores, and 2-3 s more to stop it; joining
# a running node takes about 1 s, and the suite runs dozens of jobs. Modules that run jobs use `joined_ray`. After a
# run a test kills, the test waits until Ray has ended that job's workers (`LocalCluster.wait_for_workers_of`):
# until then they may still write. A worker Ray leaves running for a minute the test kills itself, with a warning.
# A job whose actors need this process's environment (the moto server's address) starts its own Ray
# (`local_ray_env`). The local start itself stays tested (test_driver, test_cluster_address).
SHARED_RAY_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


@pytest.fixture(scope="session")
def ray_node(tmp_path_factory):
    """A `ray start --head` node with this machine's CPUs (as a local Ray has), stopped by its process group."""
    from multinode import LocalCluster

    cluster = LocalCluster(tmp_path_factory.mktemp("ray-node"))
    SHARED_NODE_LOGS.append(cluster.temp / "ray" / "session_latest" / "logs")
    try:
        cluster.start_head(num_cpus=os.cpu_count() or 1)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def joined_ray(ray_node):
    """For one module: job subprocesses (and ray.init here) join the shared node through RAY_ADDRESS."""
    with pytest.MonkeyPatch.context() as mp:
        for var in SHARED_RAY_VARS[1:]:
            mp.setenv(var, ray_node.env[var])
        mp.setenv("RAY_ADDRESS", ray_node.address)
        yield ray_node


SHARED_NODE_LOGS: list[Path] = []  # the suite's Ray node's log folder, once started


def driver_log_tail(lines: int = 30) -> str:
    """The end of the newest driver log on the suite's Ray node. A job whose Ray core worker ends the process
    itself (exit 1, nothing on stdout or stderr) says why only there."""
    logs = sorted((p for d in SHARED_NODE_LOGS for p in d.glob("python-core-driver-*.log")),
                  key=lambda p: p.stat().st_mtime)
    if not logs:
        return "(no driver log on the suite's Ray node)"
    return f"{logs[-1]}:\n" + "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:])


def local_ray_env(env: dict) -> dict:
    """``env`` for a job that starts its own local Ray, whatever module it runs in."""
    return {k: v for k, v in env.items() if k not in SHARED_RAY_VARS}


def identity_for(tag: str):
    """A job identity standing for job ``tag`` (different tags: different jobs), for tests of the commit protocol
    alone."""
    from pipeline.config import Columns, DecodeSettings, WindowSettings
    from pipeline.precision import Variant
    from pipeline.records import JobIdentity, ModelHashes

    return JobIdentity({"format": "parquet", "files": [{"path": tag, "size": 1, "mtime_ns": 0}]},
                       ModelHashes("g" * 64, None, "t" * 64, None), Variant("onnxruntime", "fp32"), Columns(),
                       DecodeSettings(), WindowSettings(), 4)
