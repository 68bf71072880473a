import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
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
# The node carries the suite's S3 server's address and keys (`s3_server`), as a real cluster's nodes carry their
# own S3 settings, so that S3 jobs join it too.
# The local start itself stays tested (test_driver, test_cluster_address).
SHARED_RAY_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


@pytest.fixture(scope="session")
def ray_node(tmp_path_factory, s3_server):
    """A `ray start --head` node with this machine's CPUs (as a local Ray has), stopped by its process group."""
    from multinode import LocalCluster

    cluster = LocalCluster(tmp_path_factory.mktemp("ray-node"))
    SHARED_NODE_LOGS.append(cluster.temp / "ray" / "session_latest" / "logs")
    try:
        cluster.start_head(num_cpus=os.cpu_count() or 1, env=s3_server.env)
        yield cluster
    finally:
        cluster.stop()


# This interpreter's own moto first: another one on PATH (a system Python's, an older moto) may not speak the S3 that
# this pyarrow expects (moto 5.2.1 answers a multipart upload's completion in a form pyarrow 26 reads as an error).
_OWN_MOTO = os.path.join(os.path.dirname(sys.executable), "moto_server")
MOTO = _OWN_MOTO if os.path.exists(_OWN_MOTO) else shutil.which("moto_server") or _OWN_MOTO
S3_BUCKET = "lake"  # each module keeps to its own prefix in it


@dataclass(frozen=True)
class S3Server:
    """The suite's S3 server as tests see it: the environment variables that reach it (address and keys), or
    why there is none (moto not installed, or it did not start: the S3 tests then skip or fail saying so, and
    the suite's Ray node starts without it)."""

    env: dict[str, str]
    missing: str = ""


def _listening(port: int, process: subprocess.Popen, seconds: float) -> bool:
    """Whether ``process`` accepts connections on ``port`` within ``seconds`` (False at once if it exits)."""
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


@pytest.fixture(scope="session")
def s3_server():
    """The suite's S3-compatible server (moto) on 127.0.0.1 with the bucket ``lake``, stopped at the end of the
    session; modules set its variables for their drivers with ``s3_env`` (test_s3)."""
    if not os.path.exists(MOTO):
        yield S3Server({}, "needs moto[server] (the test extra)")
        return
    from multinode import free_ports

    (port,) = free_ports(1)
    server = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        if not _listening(port, server, 30.0):
            yield S3Server({}, f"{MOTO} on 127.0.0.1:{port} did not start within 30 s (exit {server.poll()})")
            return
        endpoint = f"http://127.0.0.1:{port}"
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(S3_BUCKET)
        yield S3Server({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    finally:
        server.terminate()
        server.wait(timeout=10)


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


def identity_for(tag: str):
    """A job identity standing for job ``tag`` (different tags: different jobs), for tests of the commit protocol
    alone."""
    from pipeline.config import Columns, DecodeSettings, WindowSettings
    from pipeline.precision import Variant
    from pipeline.records import JobIdentity, ModelHashes

    return JobIdentity({"format": "parquet", "files": [{"path": tag, "size": 1, "mtime_ns": 0}]},
                       ModelHashes("g" * 64, None, "t" * 64, None), Variant("onnxruntime", "fp32"), Columns(),
                       DecodeSettings(), WindowSettings(), 4)
